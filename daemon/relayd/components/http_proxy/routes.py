"""Compiled services (routes), per-listener routers, and the state the protocols share."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from relayd.auth.base import AuthMethod, BrowserLogin, Identity

from .config import ServiceConfig
from .exchange import REPLACED
from .http1 import HOP_BY_HOP
from .membership import Membership
from .pages import DEFAULT_PAGES
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from .counters import Counters

_AUTH_CACHE_MAX = 10000


class Core:
    """What every connection of one component shares."""

    def __init__(self, loop: asyncio.AbstractEventLoop, counters: Counters, keepalive_timeout: float,
                 auth_cache_ttl: float, upstream_idle: int, use_splice: bool = True) -> None:
        from . import splice

        self.loop = loop
        self.splice = use_splice and splice.AVAILABLE
        self.counters = counters
        self.keepalive_timeout = keepalive_timeout
        self.auth_cache_ttl = auth_cache_ttl
        self.upstream_idle = upstream_idle
        self.connections: set[Any] = set()
        self._none_left: asyncio.Event | None = None  # made by no_connections(), set by connection_gone()
        self.tasks: set[asyncio.Task] = set()
        self.access: logging.Logger | None = None  # the access logger when access_log = true
        self.membership = Membership(counters, self.forget_credentials)
        self.members = self.membership.pairs  # for core.auth_result: a set lookup per request
        self.auth_caches: dict[str, dict[bytes, tuple[Identity, float]]] = {}
        self.stopping = False
        # Lower-case names of the identity headers: a client's Connection header may not list them.
        self.protected_headers: frozenset[bytes] = frozenset()
        self.pages = DEFAULT_PAGES  # the component's HTML pages (pages_dir)

    def connection_gone(self, conn: Any) -> None:
        self.connections.discard(conn)
        if not self.connections and self._none_left is not None:
            self._none_left.set()

    async def no_connections(self) -> None:
        """Return once no client connection is left (what a drain waits for: no polling)."""
        if self.connections:
            if self._none_left is None or self._none_left.is_set():
                self._none_left = asyncio.Event()
            await self._none_left.wait()

    def forget_credentials(self) -> None:
        """Users changed through the management API: ask the auth method again."""
        for cache in self.auth_caches.values():
            cache.clear()


class Route:
    """One service, compiled for the request path."""

    def __init__(self, name: str, config: ServiceConfig, auth: AuthMethod, core: Core,
                 identity_headers: tuple[str, str], https_port: int | None) -> None:
        self.name = name
        self.config = config
        self.auth = auth
        self.core = core
        self.prefix = config.prefix
        self.names = frozenset(config.server_names)
        url = urlsplit(config.to)
        self.to_path = url.path
        self.tls = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.tls else 80)
        self.host_header = (url.netloc.rsplit("@", 1)[-1]).encode()
        self.default_host = config.server_names[0] if config.server_names else "localhost"
        self.https_port = https_port
        user_h, email_h = identity_headers
        self.user_header = user_h.encode() + b": "
        self.email_header = email_h.encode() + b": "
        self.strip_headers = HOP_BY_HOP | REPLACED | {b"authorization", user_h.lower().encode(),
                                                       email_h.lower().encode()}
        self.hsts = b"Strict-Transport-Security: max-age=%d" % int(config.hsts) if config.hsts else b""
        self.idle: list[UpstreamConnection] = []
        self.ssl_context = self._client_ssl() if self.tls else None
        self.anonymous = (Identity(sub="anonymous", method=auth.name, anonymous=True)
                          if auth.allows_anonymous else None)
        self.cache = core.auth_caches.setdefault(auth.name, {})
        self.cacheable = auth.cacheable
        # Cookie sessions (globus_login): the typed capability, or None.
        # Through Any: mypy would type the narrowed auth as an ad-hoc "subclass of AuthMethod and
        # BrowserLogin", which mypyc compiles to a check that rejects every such method.
        method: Any = auth
        self.browser_login: BrowserLogin | None = method if isinstance(method, BrowserLogin) else None
        self.browser = self.browser_login is not None
        self.cookie_prefixes: tuple[bytes, ...] = ()  # relayd's own cookies, never sent upstream

    def strip_session_cookies(self, prefixes: tuple[bytes, ...]) -> None:
        self.cookie_prefixes = prefixes
        if prefixes:
            self.strip_headers = self.strip_headers | {b"cookie"}

    def _client_ssl(self) -> ssl.SSLContext:
        cfg = self.config
        context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        if not cfg.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    # -- auth --------------------------------------------------------------------------------

    def cached_identity(self, authorization: bytes | None) -> Identity | None:
        if self.anonymous is not None:
            return self.anonymous
        if authorization is None:
            return None
        entry = self.cache.get(authorization)
        if entry is not None and entry[1] > self.core.loop.time():
            return entry[0]
        return None

    async def authenticate(self, authorization: bytes | None) -> Identity:
        identity = await self.auth.authenticate(authorization.decode("latin-1") if authorization else None)
        ttl = self.core.auth_cache_ttl
        # Only password checks are cached here (they cost a thread hop and a database read);
        # token methods keep their own caches, which also respect each token's expiry.
        if ttl > 0 and authorization is not None and self.cacheable:
            if len(self.cache) >= _AUTH_CACHE_MAX:
                self.cache.clear()
            self.cache[authorization] = (identity, self.core.loop.time() + ttl)
        return identity

    # -- upstream connections ------------------------------------------------------------------

    def pool_get(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.readable():
                # Bytes (or the close) the upstream sent after its last response, not yet seen by
                # the event loop: they would be taken for the answer to the next request.
                conn.drop()
                continue
            return conn
        return None

    def pool_put(self, conn: UpstreamConnection) -> None:
        if conn.closed:
            return
        if len(self.idle) < self.core.upstream_idle and not self.core.stopping:
            # It may have been paused for a slow client in the exchange's last moments; an idle
            # connection must read (to notice the upstream closing it) and be ready for reuse.
            conn.transport.resume_reading()  # type: ignore[union-attr]
            self.idle.append(conn)
        else:
            conn.drop()

    async def connect(self) -> UpstreamConnection:
        loop = self.core.loop
        cfg = self.config
        server_hostname = (cfg.tls_server_name or self.host) if self.tls else None
        if cfg.unix_socket:
            coro = loop.create_unix_connection(UpstreamConnection, str(cfg.unix_socket),
                                               ssl=self.ssl_context, server_hostname=server_hostname)
        else:
            coro = loop.create_connection(UpstreamConnection, self.host, self.port,
                                          ssl=self.ssl_context, server_hostname=server_hostname)
        _, protocol = await asyncio.wait_for(coro, cfg.connect_timeout or None)
        return protocol

    def close_idle(self) -> None:
        for conn in self.idle:
            conn.drop()
        self.idle.clear()


class Router:
    """The services of one listener; ``routes`` is replaced as a whole when services change."""

    def __init__(self, core: Core, listener: str, discovery: Any) -> None:
        self.core = core
        self.listener = listener
        self.routes: list[Route] = []
        self.browser_paths: dict[str, Any] = {}  # login/logout paths of browser auth methods
        self._discovery = discovery

    def set_routes(self, routes: list[Route]) -> None:
        paths = {}
        for route in routes:
            login = route.browser_login
            if login is not None:
                paths[login.config.login_path] = route.auth
                paths[login.config.logout_path] = route.auth
        self.browser_paths = paths
        self.routes = routes

    def discovery(self, hostname: str) -> bytes:
        methods = []
        for route in self.routes:
            if (not route.names or hostname in route.names) and route.auth not in methods:
                methods.append(route.auth)
        return json.dumps(self._discovery(methods)).encode()
