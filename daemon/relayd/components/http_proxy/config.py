"""Configuration of ``kind = "http_proxy"`` components and their services."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_validator,
)

from relayd.component import ComponentConfig
from relayd.config.types import AuthRef, ListenerRef, Seconds, _read_secret

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


NO_TOKEN = "none"  # noqa: S105 - the word that disables the token, not a token


def _management_token(value: Any) -> Any:
    """A secret as usual, or the literal "none" (written as such, not read from a file): no token."""
    if value is None:
        raise ValueError(f'a token is required; token = "{NO_TOKEN}" serves the API without one '
                         "(loopback listeners only)")
    if value == NO_TOKEN:
        return None
    if not isinstance(value, (str, SecretStr)):
        raise ValueError("expected a string")
    return _read_secret(value)


ManagementToken = Annotated[
    SecretStr | None,
    BeforeValidator(_management_token),
    WithJsonSchema({"type": "string"}, mode="validation"),
]


class ManagementConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    listener: ListenerRef = Field(description="loopback listener serving the ya-runtime-http-auth "
                                  "compatible management API")
    token: ManagementToken = Field(
        description="bearer token clients must send (Authorization: Bearer ...): inline, "
        "'credential:NAME' or 'file:/path'; \"none\" serves the API without a token, as "
        "ya-runtime-http-auth does (loopback listeners only: any local process may then manage "
        "the proxy)")

    @field_serializer("token")
    def _show_token(self, value: SecretStr | None) -> Any:
        return NO_TOKEN if value is None else value

    @property
    def tokenless(self) -> bool:
        return self.token is None


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
    access_log: bool = Field(
        False, description="log one line per request to the logger relayd.access.NAME (client address, user, service, method, path without the query, status, bytes each way, duration; never credentials)"
    )
    flush_interval: Seconds = Field(1.0, gt=0, le=1.0, description="seconds between counter flushes to SQLite")
    max_endpoints_per_user: int = Field(1000, ge=1, description="distinct endpoint keys counted per user; "
                                        "more go to the '(other)' bucket")
    auth_cache_ttl: Seconds = Field(10.0, description="seconds a successful basic-auth password check is reused "
                                    "for the same credentials; 0 = ask the user database every time")
    keepalive_timeout: Seconds = Field(75.0, description="seconds an idle client connection is kept open")
    splice: bool = Field(True, description="forward large fixed-length response bodies between plain "
                         "(non-TLS) sockets with splice(2), inside the kernel")
    upstream_idle: int = Field(64, ge=0, description="idle upstream connections kept per upstream")
    pages_dir: Path | None = Field(None, description="directory of Jinja2 templates replacing the built-in HTML "
                                   "pages browsers get (error.html, signin.html, signed_out.html, consent.html, "
                                   "unreachable.html, base.html); sandboxed, autoescaped")

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
        if self.management is not None:
            # The API server and the proxy would both accept on it, each getting some connections.
            mgmt = self.management.listener
            users = [f"services.{n}.listeners" for n, s in self.services.items() if mgmt in s.listeners]
            users += ["extra_listeners"] if mgmt in self.extra_listeners else []
            if users:
                raise ValueError(f"management.listener {mgmt!r} is also a proxy listener ({', '.join(users)}): "
                                 "the management API needs a listener of its own")
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


# -- checks across tables (HttpProxyComponent.config_problems, run when the configuration is loaded) ------

def is_loopback_bind(bind: str) -> bool:
    """Whether a listener `bind` can only be reached from this host (unix socket or loopback IP)."""
    if bind.startswith("unix:"):
        return True
    host = bind.rpartition(":")[0].strip("[]") if ":" in bind else ""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # "PORT" (every address) or a host name
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _is_browser_login(auth: Any) -> bool:
    """An auth method whose login the proxy drives on its listeners (globus_login)."""
    return all(hasattr(auth, key) for key in ("login_path", "logout_path", "cookie_name"))


def browser_clash(a: Any, b: Any) -> str | None:
    """What two browser-login methods on one listener would share (paths, cookies), or None."""
    paths = sorted({a.login_path, a.logout_path} & {b.login_path, b.logout_path})
    if paths:
        return f"the path {paths[0]!r} (login_path/logout_path)"
    cookies_a = {a.cookie_name, a.cookie_name + "_login"}
    cookies = sorted(cookies_a & {b.cookie_name, b.cookie_name + "_login"})
    if cookies:
        return f"the cookie {cookies[0]!r} (cookie_name, and cookie_name + '_login' during a login)"
    return None


def browser_clashes(uses: list[tuple[str, str, Any, tuple[str | int, ...]]]) -> list[tuple[tuple[str | int, ...], str]]:
    """(path, message) for each pair of browser-login methods used on one listener that clash.

    `uses`: (listener, auth name, auth config, key path of the service using it), in order."""
    problems = []
    first: dict[tuple[str, str], tuple[Any, tuple[str | int, ...]]] = {}
    reported: set[frozenset[str]] = set()
    for listener, auth_name, auth, path in uses:
        if not _is_browser_login(auth) or (listener, auth_name) in first:
            continue
        for (other_listener, other_name), (other, other_path) in first.items():
            if other_listener != listener or other_name == auth_name or {other_name, auth_name} in reported:
                continue
            shared = browser_clash(other, auth)
            if shared:
                reported.add(frozenset({other_name, auth_name}))
                problems.append((path, (f"auth methods {other_name!r} and {auth_name!r} both log browsers in "
                                        f"on listener {listener!r} ({_service_of(other_path)} and "
                                        f"{_service_of(path)}) and share {shared}: logins and logouts would go "
                                        f"to the wrong method; give auth.{auth_name} its own login_path, "
                                        "logout_path and cookie_name")))
        first[(listener, auth_name)] = (auth, path)
    return problems


def _service_of(path: tuple[str | int, ...]) -> str:
    return f"service {path[1]!r}" if len(path) > 1 and path[0] == "services" else "a service"


def config_problems(config: HttpProxyConfig, settings: Any) -> list[tuple[tuple[str | int, ...], str]]:
    problems: list[tuple[tuple[str | int, ...], str]] = []
    management = config.management
    if management is not None:
        listener = settings.listeners.get(management.listener)
        bind = listener.bind if listener is not None else None
        if bind is not None and not is_loopback_bind(bind):
            what = ('token = "none" (no token) is only allowed on a loopback listener'
                    if management.tokenless else "the management API is only served on a loopback listener")
            problems.append((("management", "listener"),
                             (f"{what}: listener {management.listener!r} binds {bind!r}; use 127.0.0.1:PORT, "
                              "[::1]:PORT or unix:PATH (the API creates users and reads billing data)")))
    uses: list[tuple[str, str, Any, tuple[str | int, ...]]] = []
    for name, service in config.services.items():
        auth_name = service.auth or config.auth
        auth = settings.auth.get(auth_name) if auth_name else None
        if auth is None or auth_name is None:
            continue
        path: tuple[str | int, ...] = ("services", name, "auth") if service.auth else ("services", name)
        uses += [(listener, auth_name, auth, path) for listener in service.listeners]
    problems += browser_clashes(uses)
    return problems
