"""Configuration of ``[components.NAME] kind = "stream"``."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from relayd.component import ComponentConfig
from relayd.config.types import AuthRef, ListenerRef, Seconds

# Bytes per second for one unit of the `rate` field of a Request. SciStream never enforced
# `rate` and its docs disagree on the unit; "--rate=20000 is 20 MB/s" makes it kB/s.
RATE_UNITS: dict[str, float] = {
    "kB/s": 1_000.0,
    "KiB/s": 1_024.0,
    "kbit/s": 125.0,
    "Mbit/s": 125_000.0,
    "MB/s": 1_000_000.0,
}


class DataTLSConfig(BaseModel):
    """Mutual TLS between the two facilities' stream components (security = "tls")."""

    model_config = ConfigDict(extra="forbid")

    cert: Path = Field(description="PEM certificate chain this facility presents to the other")
    key: Path = Field(description="PEM private key of cert")
    ca: Path = Field(description="PEM CA bundle that signed the other facility's certificate")
    verify_hostname: bool = Field(
        True,
        description="outbound: the remote listener's certificate must name the host or IP dialled",
    )


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "*")


class StreamConfig(ComponentConfig):
    kind: Literal["stream"]
    listener: ListenerRef = Field(
        description="listener serving the scistream.Control gRPC service (TLS if the listener has tls)"
    )
    auth: AuthRef = Field(
        description="auth method for every RPC (token in the 'authorization' metadata); "
        "reference a method = \"none\" entry to run without authentication"
    )
    scope_id: str | None = Field(
        None,
        description="scope named in authentication errors ('... invalid for scope ID'); "
        "default: the auth method's client_id, else its name",
    )
    data_bind: str = Field(
        "0.0.0.0", description="IP address the data-plane ports bind ('0.0.0.0' or '::' for all)"
    )
    advertise: str | None = Field(
        None,
        description="host or IP put in the listeners returned to clients; required when "
        "data_bind is a wildcard, default data_bind",
    )
    ports: str = Field("5100-5200", description="data-plane port range 'FIRST-LAST' (inclusive)")
    security: Literal["plain", "tls"] = Field(
        "plain", description="data plane between facilities: 'plain' TCP, or 'tls' (mutual TLS)"
    )
    tls: DataTLSConfig | None = Field(None, description="certificates for security = \"tls\"")
    hello_timeout: Seconds = Field(180.0, description="how long req waits for the session's hello")
    connect_timeout: Seconds = Field(10.0, description="timeout to connect (and TLS handshake) to a target")
    max_num_conn: int = Field(64, ge=1, le=1024, description="largest num_conn a request may ask for")
    max_sessions: int = Field(1024, ge=1, description="sessions (in setup or active) at once")
    max_sessions_per_identity: int = Field(
        32, ge=1, description="sessions (in setup or active) one identity may hold at once"
    )
    max_ports_per_identity: int = Field(
        64, ge=1, description="data-plane ports one identity's sessions may hold at once"
    )
    allowed_targets: list[str] = Field(
        ["0.0.0.0/0", "::/0"],
        description="addresses sessions may forward to: 'CIDR', 'CIDR:PORT', 'CIDR:FIRST-LAST' or "
        "'[V6CIDR]:PORTS'; loopback, link-local (cloud metadata) and unspecified addresses are "
        "refused unless an entry inside them lists them (e.g. '127.0.0.1/32:5000-5999')",
    )
    rate_unit: Literal["kB/s", "KiB/s", "kbit/s", "Mbit/s", "MB/s", "off"] = Field(
        "off",
        description="'off' (default) accepts and ignores a request's rate like SciStream (s2uc "
        "always sends 10000); a unit enforces rate in it (per direction, summed over the "
        "session's connections; 0 means unlimited)",
    )
    access_log: bool = Field(
        False, description="log one line per session when it ends to the logger relayd.access.NAME (uid, identity, role, targets, reason, bytes each way, connections, duration; never credentials)"
    )
    splice: bool = Field(
        True,
        description="forward in two threads per connection, so sessions use several cores: with "
        "splice(2) (kernel zero-copy) for security = \"plain\", with OpenSSL outside the GIL for "
        "\"tls\"; false forwards on the event loop",
    )
    buffer_size: int = Field(
        1 << 20, ge=65536, description="bytes queued per connection before reading from its peer pauses"
    )

    @field_validator("ports")
    @classmethod
    def _port_range(cls, value: str) -> str:
        first, sep, last = value.partition("-")
        try:
            lo, hi = int(first), int(last if sep else first)
        except ValueError:
            raise ValueError("expected 'FIRST-LAST', e.g. '5100-5200'") from None
        if not (1 <= lo <= hi <= 65535):
            raise ValueError("ports must satisfy 1 <= FIRST <= LAST <= 65535")
        return value

    @field_validator("allowed_targets")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        from relayd.components.stream.model import parse_target_rule

        for item in value:
            parse_target_rule(item)
        return value

    @field_validator("data_bind")
    @classmethod
    def _ip(cls, value: str) -> str:
        if value == "*":
            return "0.0.0.0"
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("data_bind must be an IP address (e.g. '0.0.0.0', '::', '10.0.0.5')") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StreamConfig:
        if self.advertise is None and _is_wildcard(self.data_bind):
            raise ValueError(
                f"data_bind {self.data_bind!r} is a wildcard: set 'advertise' to the address clients "
                "of the other facility reach this host at"
            )
        if self.security == "tls" and self.tls is None:
            raise ValueError("security = \"tls\" needs a [tls] table with cert, key and ca")
        return self

    @property
    def port_range(self) -> tuple[int, int]:
        first, _, last = self.ports.partition("-")
        return int(first), int(last or first)

    @property
    def advertised_host(self) -> str:
        return self.advertise or self.data_bind

    @property
    def rate_factor(self) -> float | None:
        """Bytes/s per rate unit, or None when rate is ignored."""
        return None if self.rate_unit == "off" else RATE_UNITS[self.rate_unit]
