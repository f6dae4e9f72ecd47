"""Configuration of ``kind = "http_proxy"`` components and their services."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from relayd.component import ComponentConfig
from relayd.config.types import AuthRef, ListenerRef, Seconds, Secret

from .mapping import normalize_prefix, overlap

SERVICE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_HEADER_NAME = r"^[A-Za-z0-9-]+$"


class ServiceConfig(BaseModel):
    """One proxied service: where it is reachable, where it forwards, who may use it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    description: str = Field("", description="free text shown by `relayctl service info`")
    server_names: list[str] = Field(
        default_factory=list,
        description="Host names / addresses this service answers for (Host header, without port); "
        "empty: any host",
    )
    listeners: list[ListenerRef] = Field(
        min_length=1, description="listeners (plain HTTP and/or TLS) the service is reachable on"
    )
    from_: str = Field("/", alias="from", description="public path prefix, segment-aware "
                       "('/acme' matches '/acme' and '/acme/x', not '/acmefoo')")
    to: str = Field(description="upstream URL, http:// or https://; its path replaces the `from` prefix")
    unix_socket: Path | None = Field(
        None, description="connect to the upstream through this unix socket instead of the `to` host"
    )
    cert: Path | None = Field(None, description="PEM certificate of this service on TLS listeners, chosen "
                              "by SNI among its server_names (default: the listener's)")
    key: Path | None = Field(None, description="PEM private key of `cert`")
    tls_verify: bool = Field(True, description="verify an https upstream's certificate and name")
    ca_file: Path | None = Field(None, description="CA bundle for an https upstream (default: system CAs)")
    tls_server_name: str | None = Field(None, description="SNI and verified name of an https upstream "
                                        "(default: the `to` host)")
    auth: AuthRef | None = Field(None, description="auth method (default: the component's `auth`)")
    members_only: bool = Field(
        False, description="only users added to this service (management API / relayctl import) may use it"
    )
    pass_credentials: bool = Field(False, description="forward the client's Authorization header upstream")
    preserve_host: bool = Field(False, description="send the client's Host upstream instead of the `to` host")
    connect_timeout: Seconds = Field(5.0, description="seconds to connect to the upstream (504 after)")
    read_timeout: Seconds = Field(60.0, description="seconds the upstream may stay silent while a response "
                                  "is awaited or streamed (504 before the response starts); "
                                  "not applied to WebSocket tunnels")
    total_timeout: Seconds = Field(0.0, description="seconds a whole exchange may take; 0 = no limit "
                                   "(not applied to WebSocket tunnels)")
    max_body: int = Field(1 << 30, ge=0, description="largest request body in bytes (413 above); 0 = no limit")
    websocket: bool = Field(True, description="pass WebSocket (Upgrade) requests through")
    redirect_https: bool = Field(False, description="on plain HTTP listeners, redirect (308) to the "
                                 "service's first TLS listener")
    hsts: Seconds = Field(0.0, description="Strict-Transport-Security max-age sent over TLS; 0 = off")

    @field_validator("from_")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or "#" in value:
            raise ValueError("must be a path starting with '/', without query")
        return value

    @field_validator("to")
    @classmethod
    def _to(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value

    @field_validator("server_names")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return [v.lower().strip("[]") for v in value]

    @model_validator(mode="after")
    def _cert_pair(self) -> ServiceConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("`cert` and `key` go together")
        if self.cert is not None and not self.server_names:
            raise ValueError("a service `cert` is chosen by SNI: it needs `server_names`")
        return self

    @property
    def prefix(self) -> str:
        return normalize_prefix(self.from_)


class IdentityHeaders(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Field("X-Forwarded-User", pattern=_HEADER_NAME, description="header carrying the user name")
    email: str = Field("X-Forwarded-Email", pattern=_HEADER_NAME, description="header carrying the e-mail")


class ManagementConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    listener: ListenerRef = Field(description="loopback listener serving the ya-runtime-http-auth "
                                  "compatible management API")
    token: Secret = Field(description="bearer token clients must send (Authorization: Bearer ...)")


class HttpProxyConfig(ComponentConfig):
    kind: Literal["http_proxy"]
    auth: AuthRef | None = Field(None, description="default auth method of the services")
    services: dict[str, ServiceConfig] = Field(default_factory=dict, description="services by name")
    identity_headers: IdentityHeaders = Field(
        default_factory=IdentityHeaders, description="upstream identity header names (client copies are removed)"
    )
    extra_listeners: list[ListenerRef] = Field(
        default_factory=list, description="listeners served even without configured services, for services "
        "created through the management API (which may only use listeners this component serves)")
    management: ManagementConfig | None = Field(None, description="management API on a TCP listener")
    state_db: Path | None = Field(None, description="SQLite state (runtime services, members, counters); "
                                  "default <state_dir>/http_proxy-<NAME>.sqlite3")
    flush_interval: Seconds = Field(1.0, gt=0, le=1.0, description="seconds between counter flushes to SQLite")
    max_endpoints_per_user: int = Field(1000, ge=1, description="distinct endpoint keys counted per user; "
                                        "more go to the '(other)' bucket")
    auth_cache_ttl: Seconds = Field(10.0, description="seconds a successful basic-auth password check is reused "
                                    "for the same credentials; 0 = ask the user database every time")
    keepalive_timeout: Seconds = Field(75.0, description="seconds an idle client connection is kept open")
    splice: bool = Field(True, description="forward large fixed-length response bodies between plain "
                         "(non-TLS) sockets with splice(2), inside the kernel")
    upstream_idle: int = Field(64, ge=0, description="idle upstream connections kept per upstream")

    @field_validator("services")
    @classmethod
    def _service_names(cls, value: dict[str, ServiceConfig]) -> dict[str, ServiceConfig]:
        for name in value:
            if not re.match(SERVICE_NAME, name):
                raise ValueError(f"service name {name!r} must match {SERVICE_NAME}")
        return value

    @model_validator(mode="after")
    def _no_overlap(self) -> HttpProxyConfig:
        problem = find_overlap(list(self.services.items()))
        if problem:
            raise ValueError(problem)
        if any(s.auth is None for s in self.services.values()) and self.auth is None:
            raise ValueError("services without their own `auth` need the component's `auth`")
        return self


def conflicts(a: ServiceConfig, b: ServiceConfig) -> bool:
    """Two services conflict when one request could match both."""
    if not set(a.listeners) & set(b.listeners):
        return False
    if a.server_names and b.server_names and not set(a.server_names) & set(b.server_names):
        return False
    return overlap(a.prefix, b.prefix)


def find_overlap(services: list[tuple[str, ServiceConfig]]) -> str | None:
    for i, (name_a, a) in enumerate(services):
        for name_b, b in services[i + 1:]:
            if conflicts(a, b):
                return (f"services {name_a!r} (from {a.from_!r}) and {name_b!r} (from {b.from_!r}) "
                        "overlap on a shared listener")
    return None
