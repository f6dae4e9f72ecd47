"""``kind = "http_proxy"``: an authenticating reverse proxy with per-user usage counters.

Services (``[components.NAME.services.SERVICE]``) map a public path prefix on one or more
listeners to an upstream URL. The management API (compatible with ya-runtime-http-auth's)
is served on the control socket under ``/v1/components/NAME/`` and, optionally, on a loopback
TCP listener with a bearer token. See relayd.toml(5), section HTTP PROXY.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relayd.accept_gate import GatedServer, serve_gated
from relayd.auth import discovery
from relayd.component import Component, ComponentConfig, Context
from relayd.httpserve import HttpService
from relayd.lifecycle import State, drain, with_unread_bytes
from relayd.listeners import port_of
from relayd.logsetup import access_logger

from .config import HttpProxyConfig, ServiceConfig, browser_clashes, config_problems, conflicts
from .counters import Counters
from .manage import ManagementAPI
from .metrics import proxy_metrics
from .pages import Pages
from .proxy import ClientConnection
from .routes import Core, Route, Router
from .service_tls import ServiceCertificates
from .sync import make_store, start_watcher

if TYPE_CHECKING:
    from relayd.auth.base import AuthMethod
    from relayd.state.pg import Watcher

__all__ = ["HttpProxy", "HttpProxyComponent", "HttpProxyConfig"]
FIRST_REQUEST_GRACE = 2.0  # seconds a connection accepted just before a stop has to send its request


@dataclass
class Service:
    name: str
    config: ServiceConfig
    origin: str  # "config" or "runtime"
    created_at: float
    definition: dict[str, Any] = field(default_factory=dict)  # as created through the API


def _discovery(methods: list[Any]) -> dict[str, Any]:
    return discovery.document(methods)


class HttpProxyComponent(Component):
    Config = HttpProxyConfig
    config: HttpProxyConfig

    def __init__(self, name: str, config: HttpProxyConfig, context: Context) -> None:
        super().__init__(name, config, context)
        # Every attribute here, no I/O (relayd.lifecycle): stop() is safe after a failed start.
        cfg = config
        self.db_path = cfg.state_db or Path(context.state_dir) / f"http_proxy-{name}.sqlite3"
        self.watcher: Watcher | None = None  # other nodes' changes ([state] url = PostgreSQL)
        self.counters = Counters(make_store(self), cfg.max_endpoints_per_user)
        self.core = Core(asyncio.get_running_loop(), self.counters, cfg.keepalive_timeout, cfg.auth_cache_ttl,
                         cfg.upstream_idle, cfg.splice)
        names = cfg.identity_headers
        self.core.protected_headers = frozenset({names.user.lower().encode(), names.email.lower().encode()})
        self.core.access = access_logger(name) if cfg.access_log else None
        self.servers: list[tuple[str, GatedServer]] = []
        self.routers: dict[str, Router] = {}
        self.services: dict[str, Service] = {}
        self.allowed_listeners: set[str] = set()
        self.mgmt_http: HttpService | None = None
        self.certificates = ServiceCertificates(self.log)  # services' own, chosen by SNI
        self.membership = self.core.membership  # who may use which service (membership.py)
        self.api = ManagementAPI(self)

    async def start(self) -> None:
        cfg = self.config
        await self.counters.start(cfg.flush_interval)
        if cfg.pages_dir is not None:
            self.core.pages = Pages(cfg.pages_dir)
            self.core.pages.check()
        try:
            await self._load_services()
            self.load_service_certs(strict=True)
            for lname in self._listener_names():
                await self._serve(lname)
            if cfg.management:
                listener = self.context.listener(cfg.management.listener)
                if not listener.is_loopback:
                    # The API creates users and reads billing data: never on a public address.
                    raise ValueError(f"management listener {cfg.management.listener!r} must be loopback "
                                     f"or a unix socket (it is {', '.join(listener.addresses)})")
                self.mgmt_http = HttpService(self._handle_management)
                await self.mgmt_http.serve(listener)
        except BaseException:
            await self._close_everything()
            raise
        self.watcher = start_watcher(self)  # other nodes' changes ([state] url = PostgreSQL)

    # -- services --------------------------------------------------------------------------

    async def _load_services(self) -> None:
        store = self.counters.store
        self.allowed_listeners = set(self.config.extra_listeners)
        for scfg in self.config.services.values():
            self.allowed_listeners.update(scfg.listeners)
        for name, scfg in self.config.services.items():
            created = await self.counters.call(store.created_at, name)
            self.services[name] = Service(name, scfg, "config", created)
        self.membership.replace_all(await self.counters.call(store.members))
        for name, definition, created in await self.counters.call(store.services):
            try:
                scfg = ServiceConfig.model_validate(definition)
                self.check_service(name, scfg)
            except Exception as exc:  # e.g. the configuration now has a conflicting service
                self.log.warning("runtime service %r not loaded: %s", name, exc)
                continue
            self.services[name] = Service(name, scfg, "runtime", created, definition)
        self.rebuild_routes()

    def _listener_names(self) -> list[str]:
        names: list[str] = list(self.config.extra_listeners)
        for service in self.services.values():
            for listener in service.config.listeners:
                if listener not in names:
                    names.append(listener)
        return names

    def check_service(self, name: str, scfg: ServiceConfig) -> None:
        """Raise ValueError if a new service cannot be added next to the existing ones."""
        for listener in scfg.listeners:
            if listener not in self.context.listeners:
                raise ValueError(f"no listener named {listener!r}")
            if listener not in self.allowed_listeners:
                raise ValueError(f"listener {listener!r} is not served by component {self.name!r} "
                                 "(add it to its extra_listeners)")
        auth = scfg.auth or self.config.auth
        if auth not in self.context.auth:
            raise ValueError(f"no auth method named {auth!r}")
        for other in self.services.values():
            if other.name != name and conflicts(scfg, other.config):
                raise ValueError(f"Service '{other.name}' is already bound to '{other.config.from_}'")
        # Browser logins (globus_login) of two methods on one listener must not share paths or cookies.
        uses: list[tuple[str, str, Any, tuple[str | int, ...]]] = []
        others = [(s.name, s.config) for s in self.services.values() if s.name != name]
        for sname, service in others + [(name, scfg)]:  # the new one last: the clash is reported on it
            aname = service.auth or self.config.auth
            method = self.context.auth.get(aname) if aname else None
            if method is not None and aname is not None:
                uses += [(lname, aname, method.config, ("services", sname)) for lname in service.listeners]
        for path, message in browser_clashes(uses):
            if path[:2] == ("services", name):
                raise ValueError(message)

    def auth_of(self, scfg: ServiceConfig) -> AuthMethod:
        """A service's auth method: its own, else the component's."""
        name = scfg.auth or self.config.auth
        assert name is not None, "checked: HttpProxyConfig (configured services), check_service (runtime ones)"
        return self.context.auth_method(name)

    def rebuild_routes(self) -> None:
        routers: dict[str, list[Route]] = {}
        for service in self.services.values():
            scfg = service.config
            auth = self.auth_of(scfg)
            https_port = None
            for lname in scfg.listeners:
                listener = self.context.listeners[lname]
                if listener.ssl_context is not None and https_port is None:
                    https_port = _port(listener.addresses)
            names = (self.config.identity_headers.user, self.config.identity_headers.email)
            route = Route(service.name, scfg, auth, self.core, names, https_port)
            for lname in scfg.listeners:
                routers.setdefault(lname, []).append(route)
        # Session cookies of browser logins are removed from every service's requests: they are
        # set for the whole host, whichever service the browser visits.
        prefixes: set[bytes] = set()
        for routes in routers.values():
            for route in routes:
                if route.browser_login is not None:
                    name = route.browser_login.config.cookie_name.encode()
                    prefixes.update({name + b"=", name + b"_login="})
        for routes in routers.values():
            for route in routes:
                route.strip_session_cookies(tuple(sorted(prefixes)))
        for lname, routes in routers.items():
            router = self.routers.get(lname)
            if router is None:
                router = self.routers[lname] = Router(self.core, lname, _discovery)
            old = {r.name: r for r in router.routes}
            for route in routes:  # keep pooled upstream connections of unchanged routes
                previous = old.get(route.name)
                if previous is not None and previous.config == route.config:
                    route.idle = previous.idle
            router.set_routes(routes)
        for lname, router in self.routers.items():
            if lname not in routers:
                router.set_routes([])

    async def _serve(self, lname: str) -> None:
        if any(name == lname for name, _ in self.servers):
            return
        listener = self.context.listener(lname)
        router = self.routers.get(lname)
        if router is None:
            router = self.routers[lname] = Router(self.core, lname, _discovery)
        tls = listener.ssl_context is not None
        context = self.certificates.server_context(listener, lname) if tls else None
        # Under the listener's max_connections: the gate sets each connection's on_closed.
        server = await serve_gated(listener, lambda: ClientConnection(router, tls), ssl=context)
        self.servers.append((lname, server))
        self.log.info("http_proxy listening on %s (listener %s)",
                      ", ".join(f"{listener.scheme}://{a}" for a in listener.addresses), lname)

    # -- TLS: the listener pool re-reads listener certificates on every reload; services' own
    # certificates are re-read by reloaded() ----------------------------------------------------

    def reloaded(self) -> None:
        self.load_service_certs()

    def load_service_certs(self, strict: bool = False) -> None:
        """(Re-)read the certificates of services with their own cert/key: after services
        change and on reload. ``strict`` (at start): raise on a bad one; else log it and keep
        that service's old certificate."""
        self.certificates.load([(s.name, s.config) for s in self.services.values()], strict)

    # -- lifecycle ---------------------------------------------------------------------------

    async def stop(self, drain_timeout: float) -> None:
        core = self.core
        core.stopping = True
        for _, server in self.servers:
            server.close()
        # On a reload, idle connections move to the component that replaces this one (with
        # whatever part of a request they hold); the others finish what they were asked and
        # close. On a stop, one accepted just before is still served its first request.
        successor = self._successor()
        for conn in list(core.connections):
            router = successor.routers.get(conn.router.listener) if successor else None
            if router is None or not conn.handover(router):
                conn.drain()

        async def idle() -> None:
            if not await drain(core.no_connections(), min(drain_timeout, FIRST_REQUEST_GRACE)):
                # Connections that never asked anything are not waited for; one whose request
                # is in its socket, not yet read, has asked.
                quiet = [conn.transport for conn in core.connections if conn.idle and conn.transport]
                asking = with_unread_bytes(quiet)
                for transport in quiet:
                    if transport not in asking:
                        transport.close()
                await core.no_connections()

        await drain(idle(), drain_timeout)
        for conn in list(core.connections):
            if conn.ex is not None:
                conn.state.abort(conn.ex)  # records its counters
            elif conn.transport:
                conn.transport.abort()
        await self._close_everything()

    def _successor(self) -> HttpProxyComponent | None:
        """The http_proxy of the same name in the generation serving now, if not this one."""
        daemon = self.context.daemon
        if daemon is None:
            return None
        other = daemon.serving_component(self.name)
        if isinstance(other, HttpProxyComponent) and other is not self and daemon.state_of(other) is State.SERVING:
            return other
        return None

    async def _close_everything(self) -> None:
        for _, server in self.servers:
            server.close()
        self.servers.clear()
        for router in self.routers.values():
            for route in router.routes:
                route.close_idle()
        for task in list(self.core.tasks):
            task.cancel()
        if self.mgmt_http:
            mgmt_http, self.mgmt_http = self.mgmt_http, None
            await mgmt_http.stop(0)
        if self.watcher is not None:
            watcher, self.watcher = self.watcher, None
            await watcher.stop()
        await self.counters.close()

    # -- status, metrics, control --------------------------------------------------------------

    @classmethod
    def config_problems(cls, name: str, config: ComponentConfig,
                        settings: Any) -> list[tuple[tuple[str | int, ...], str]]:
        assert isinstance(config, HttpProxyConfig)  # the runtime passes this class's Config
        return config_problems(config, settings)

    def warnings(self) -> list[str]:
        management = self.config.management
        if management is None or not management.tokenless:
            return []
        listener = self.context.listeners.get(management.listener)
        where = ", ".join(listener.addresses) if listener is not None else management.listener
        return [(f"MANAGEMENT TOKEN DISABLED: the management API on listener {management.listener!r} ({where}) "
                 "accepts requests without a token (token = \"none\"): any local process or user can create "
                 "services and users and read billing data")]

    def listener_names(self) -> set[str]:
        names = set(self._listener_names())
        if self.config.management:
            names.add(self.config.management.listener)
        return names

    def status(self) -> dict[str, Any]:
        totals = self.counters.totals()
        return {
            "services": len(self.services),
            "connections": len(self.core.connections),
            "requests": sum(row[0] for row in totals.values()),
        }

    def clients(self) -> list[dict[str, Any]]:
        out = []
        for conn in list(self.core.connections):
            ex = conn.ex
            out.append({
                "peer": conn.peer, "listener": conn.router.listener, "tls": conn.tls,
                "service": ex.route.name if ex and ex.route else "", "user": ex.user if ex else "",
                "request": f"{ex.req.method.decode()} {ex.target}"[:120] if ex else "(idle)",
                "websocket": bool(ex and ex.tunnel),
            })
        return out

    def metrics(self):
        return proxy_metrics(self.name, self.counters)

    async def control(self, request: web.Request, path: str) -> web.StreamResponse | None:
        if path.startswith("browser-sessions"):
            return await self._browser_sessions(request, path)
        return await self.api.handle(request, path)

    def browser_methods(self) -> list[Any]:
        methods: list[Any] = []
        for router in self.routers.values():
            for route in router.routes:
                if route.browser and route.auth not in methods:
                    methods.append(route.auth)
        return methods

    async def _browser_sessions(self, request: web.Request, path: str) -> web.StreamResponse | None:
        """``relayctl sessions --browser`` and ``relayctl logout-user``: never tokens or ids."""
        methods = self.browser_methods()
        if path == "browser-sessions" and request.method == "GET":
            rows = [{"auth": m.name, **row} for m in methods for row in m.list_sessions()]
            return web.json_response({"component": self.name, "sessions": rows})
        if path == "browser-sessions/logout" and request.method == "POST":
            try:
                identity = str((await request.json())["identity"])
            except (ValueError, KeyError, TypeError):
                return web.json_response({"message": 'send {"identity": ID or USERNAME}'}, status=400)
            ended = sum(m.end_sessions_of(identity) for m in methods)
            return web.json_response({"component": self.name, "identity": identity, "ended": ended})
        return None

    async def _handle_management(self, request: web.BaseRequest) -> web.StreamResponse:
        management = self.config.management
        assert management is not None
        if management.token is None:  # token = "none": loopback only (checked at load and start)
            return await self.api.handle(request, request.path.lstrip("/"))
        token = management.token.get_secret_value().encode()
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token):
            return web.json_response({"message": "a valid 'Authorization: Bearer <token>' is required"},
                                     status=401, headers={"WWW-Authenticate": 'Bearer realm="relayd"'})
        return await self.api.handle(request, request.path.lstrip("/"))


def _port(addresses: list[str]) -> int | None:
    """The port of the first TCP address."""
    return next((port for port in map(port_of, addresses) if port is not None), None)


# The name this class had (entry point metadata of an install made before the rename names it).
HttpProxy = HttpProxyComponent
