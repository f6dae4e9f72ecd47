"""Scope maps: which Globus scope a server address requires.

    [scope_maps.sites.servers]
    "s2cs.example.org" = "https://auth.globus.org/scopes/<client id>/scistream"
    "10.16.42.61:5000" = "https://auth.globus.org/scopes/<other id>/scistream"
    "[2001:db8::5]:5000" = "..."

Keys are ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 literal; hosts are
compared after normalisation (lower case, no trailing dot, canonical IP text), never resolved:
``localhost`` and ``127.0.0.1`` are different keys. ``host:port`` beats ``host``. An address
found in no map is an error naming the address and the line to add (SciStream's map silently
sent the literal "INVALID_TOKEN" instead).

Used by components that call other servers (through ``Context.scope_maps``) and by relayctl
(``relayd.cli.auth_commands``), where a map overrides the server's discovery document.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")


class UnmappedServer(LookupError):
    """No scope is known for a server; ``str()`` says how to add one."""

    def __init__(self, address: str, where: str = "[scope_maps.NAME.servers]") -> None:
        self.address = address
        super().__init__(
            f"no Globus scope is mapped for server {address!r}: add a line "
            f'"{address}" = "<scope string>" under {where} '
            "(or log in with an explicit --scope)")


def split_address(address: str) -> tuple[str, int | None]:
    """Parse 'host', 'host:port', '[v6]', '[v6]:port' or a bare IPv6 literal; normalise the host.

    Raises ValueError with a message suitable for a config error.
    """
    text = address.strip()
    for prefix in ("https://", "http://", "wss://", "ws://", "grpcs://", "grpc://"):
        if text.lower().startswith(prefix):
            text = text[len(prefix):].split("/", 1)[0]
            break
    port: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {address!r}: expected '[IPv6]' or '[IPv6]:port'")
        port = rest[1:] if rest else None
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"bad address {address!r}: {host!r} is not an IPv6 address") from None
    elif text.count(":") > 1:
        try:
            host = str(ipaddress.IPv6Address(text))
        except ValueError:
            raise ValueError(f"bad address {address!r}: IPv6 with a port needs brackets, '[v6]:port'") from None
    else:
        host, sep, port_text = text.partition(":")
        port = port_text if sep else None
        host = host.lower().rstrip(".")
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            if not _HOSTNAME.match(host):
                raise ValueError(f"bad address {address!r}: {host!r} is not a host name or IP address") from None
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {address!r}: port must be 1-65535")
    return host, int(port)


def format_address(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def normalize_address(address: str) -> str:
    return format_address(*split_address(address))


def normalize_servers(servers: Mapping[str, str]) -> dict[str, str]:
    """Validate and normalise a map's keys; two keys meaning the same address are an error."""
    out: dict[str, str] = {}
    for key, scope in servers.items():
        norm = normalize_address(key)
        if norm in out:
            raise ValueError(f"{key!r} and another key both mean {norm!r}")
        if not scope.strip():
            raise ValueError(f"empty scope for {key!r}")
        out[norm] = scope.strip()
    return out


def lookup(maps: Mapping[str, Any], address: str, *, names: list[str] | None = None,
           where: str | None = None) -> str:
    """The scope for ``address`` in the given scope maps (all of them, or ``names`` in order).

    ``maps`` values are ScopeMapConfig objects (``.servers``) or plain dicts of servers.
    Raises ValueError for an unparsable address and UnmappedServer when nothing matches.
    """
    host, port = split_address(address)
    exact, bare = format_address(host, port), format_address(host, None)
    chosen = [maps[n] for n in names] if names is not None else list(maps.values())
    tables = [normalize_servers(getattr(m, "servers", m)) for m in chosen]
    for key in (exact, bare):
        for table in tables:
            if key in table:
                return table[key]
    if where is None:
        only = names[0] if names and len(names) == 1 else (next(iter(maps)) if len(maps) == 1 else "NAME")
        where = f"[scope_maps.{only}.servers]"
    raise UnmappedServer(exact, where)
