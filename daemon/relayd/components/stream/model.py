"""Sessions and the rules of the SciStream control protocol, free of I/O.

A session is created by ``req`` (state ``setup``), completed by its ``hello`` (``ready``),
given targets by ``update`` (``active``; a later update re-targets new connections) and ended
by ``release``, by the hello timeout, or by shutdown (``released``). Violations raise
:class:`StreamError` carrying the gRPC status the service answers with.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from grpclib.const import Status

ROLES = ("PROD", "CONS")
MAX_UID = 128


class StreamError(Exception):
    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_hostport(value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError with a reason otherwise."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)  # ValueError if not an IPv6 literal
    elif ":" in host:
        raise ValueError(f"{value!r}: write IPv6 addresses as [ADDR]:PORT")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: port must be 1-65535")
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_targets(values: list[str], what: str) -> list[tuple[str, int]]:
    if not values:
        raise StreamError(Status.INVALID_ARGUMENT, f"{what} is empty")
    try:
        return [parse_hostport(v) for v in values]
    except ValueError as exc:
        raise StreamError(Status.INVALID_ARGUMENT, f"{what}: {exc}") from None


def round_robin(targets: list[tuple[str, int]], slots: int) -> list[tuple[str, int]]:
    """Target of each of the session's ports: port i forwards to targets[i % len(targets)]."""
    return [targets[i % len(targets)] for i in range(slots)]


def check_request(uid: str, role: str, num_conn: int, rate: int, max_num_conn: int) -> None:
    check_uid(uid)
    if role not in ROLES:
        raise StreamError(Status.INVALID_ARGUMENT, f"role must be PROD or CONS, not {role!r}")
    if not 1 <= num_conn <= max_num_conn:
        raise StreamError(Status.INVALID_ARGUMENT, f"num_conn must be 1-{max_num_conn}, not {num_conn}")
    if rate < 0:
        raise StreamError(Status.INVALID_ARGUMENT, f"rate must not be negative, not {rate}")


def check_uid(uid: str) -> None:
    if not uid or len(uid) > MAX_UID or not uid.isprintable():
        raise StreamError(Status.INVALID_ARGUMENT, f"uid must be 1-{MAX_UID} printable characters")


@dataclass
class Session:
    uid: str
    role: str
    num_conn: int
    rate: int  # as requested, in the component's rate unit; 0 = unlimited
    rate_bps: float | None  # enforced bytes/s per direction, None = unlimited
    owner: str  # Identity.sub of the creator
    owner_name: str | None
    listeners: list[str]  # advertised "host:port" of the session's ports
    state: str = "setup"
    prod_listeners: list[str] = field(default_factory=list)  # from hello
    targets: list[tuple[str, int]] = field(default_factory=list)  # per port, after update
    created_at: float = field(default_factory=time.time)
    bytes_to_target: int = 0
    bytes_from_target: int = 0
    connections: int = 0
    connections_total: int = 0

    def check_owner(self, sub: str, action: str) -> None:
        if sub != self.owner:
            raise StreamError(Status.PERMISSION_DENIED,
                              f"session {self.uid} belongs to another identity; it cannot {action} it")

    def as_row(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "role": self.role,
            "state": self.state,
            "owner": self.owner_name or self.owner,
            "listeners": ",".join(self.listeners),
            "targets": ",".join(format_hostport(h, p) for h, p in self.targets),
            "bytes_to_target": self.bytes_to_target,
            "bytes_from_target": self.bytes_from_target,
            "connections": self.connections,
            "rate": self.rate,
            "age_s": round(time.time() - self.created_at, 1),
        }


# Addresses a session may only reach when an allowed_targets entry inside them lists them: the
# gateway's own loopback services, link-local (cloud metadata at 169.254.169.254), "this host".
GUARDED_NETWORKS: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]] = [
    (ipaddress.ip_network("127.0.0.0/8"), "loopback"),
    (ipaddress.ip_network("::1/128"), "loopback"),
    (ipaddress.ip_network("169.254.169.254/32"), "cloud metadata"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local"),
    (ipaddress.ip_network("fe80::/10"), "link-local"),
    (ipaddress.ip_network("fd00:ec2::254/128"), "cloud metadata"),
    (ipaddress.ip_network("100.100.100.200/32"), "cloud metadata"),
    (ipaddress.ip_network("0.0.0.0/8"), "unspecified"),
    (ipaddress.ip_network("::/128"), "unspecified"),
    (ipaddress.ip_network("224.0.0.0/4"), "multicast"),
    (ipaddress.ip_network("ff00::/8"), "multicast"),
]


def parse_target_rule(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int, int]:
    """'CIDR', 'CIDR:PORT', 'CIDR:LO-HI', '[V6CIDR]:PORTS' -> (network, lo, hi); ValueError otherwise."""
    text = value.strip()
    ports = ""
    if text.startswith("["):
        net, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r}: expected [IPV6/PREFIX]:PORTS")
        ports = rest[1:]
    elif text.count(":") == 1:
        net, _, ports = text.partition(":")
    else:
        net = text
    try:
        network = ipaddress.ip_network(net, strict=False)
    except ValueError:
        raise ValueError(f"{value!r}: {net!r} is not an IP address or CIDR network") from None
    lo, hi = 1, 65535
    if ports:
        first, sep, last = ports.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"{value!r}: ports must be PORT or FIRST-LAST")
        lo, hi = int(first), int(last if sep else first)
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"{value!r}: ports must satisfy 1 <= FIRST <= LAST <= 65535")
    return network, lo, hi


class TargetPolicy:
    """Which addresses and ports a session may forward to (the allowed_targets setting)."""

    def __init__(self, rules: list[str]) -> None:
        self.rules = [parse_target_rule(r) for r in rules]

    def refusal(self, address: str, port: int) -> str | None:
        """None if `address`:`port` may be dialled, else the reason it may not."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address!r} is not an IP address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        guard = next((what for net, what in GUARDED_NETWORKS if ip.version == net.version and ip in net), None)
        for network, lo, hi in self.rules:
            if ip.version != network.version or ip not in network or not lo <= port <= hi:
                continue
            # A wide entry (0.0.0.0/0) does not open loopback or metadata: only an entry that
            # lies inside the guarded range names it on purpose.
            if guard is None or any(network.subnet_of(net)  # type: ignore[arg-type]  # same version
                                    for net, _ in GUARDED_NETWORKS
                                    if net.version == network.version and ip in net):
                return None
        if guard is not None:
            return (f"{guard} address {format_hostport(str(ip), port)} is refused unless "
                    "allowed_targets lists it")
        return f"{format_hostport(str(ip), port)} is not in allowed_targets"
