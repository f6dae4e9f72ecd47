"""The management API, route for route compatible with ya-runtime-http-auth's.

    GET/POST        services                      list / create (409 if the name or `from` is taken)
    GET/DELETE      services/S                    one service / delete a runtime-created one
    GET/POST        services/S/users              members / add {"username", "password"} (409 if exists)
    GET/DELETE      services/S/users/U            one member / remove it
    GET             services/S/users/U/stats      {"requests": N, "bytesIn", "bytesOut", "statuses"}
    GET             services/S/users/U/endpoints/stats   {"<path>": N, ...}
    GET             services/S/info               what `relayctl service info` prints (relayd)
    GET/POST        services/S/members            relayd: members / add an existing user {"username"}
    DELETE          services/S/members/U          relayd: end a membership (the user stays)
    GET             stats[/S[/U]]                 current totals; top-level "requests" is
                                                  {"requests": N}, as in the original's GlobalStats
    GET             usage[/S[/U]]                 relayd: the same, every "requests" a number
    GET             history[/S[/U]]               relayd: every incarnation, with its totals

Errors are ``{"message": "..."}``. Unlike the original, "not found" is 404 (it answered 400);
503 when the state database cannot take a change (the disk is full; PostgreSQL is unreachable).

Users live in the service's ``basic`` auth method's user store; membership (which service a
user was added to) and counters live in the component's state database. A user created again
(``POST .../users``, as the runtime does for every new agreement) and a service created again
start new *incarnations*: the compatible routes (``users/U/stats``, ``endpoints/stats``,
``stats``, ``usage``) report the current incarnation, from 0 at its creation; ``history``
keeps every incarnation's totals with its created and deleted times. Counters are never
removed: deleting a user keeps what it was counted, still readable until it is created again.

A service created here is echoed back as the client sent it, field by field (absent stays
absent, ``null`` stays ``null``), plus ``createdAt``, the certificate's ``hash`` (output-only,
as in the original) and relayd's ``listeners`` and ``origin``: the runtime's restart path
(re-create, 409, compare with GET) then finds the same service.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from relayd.auth.base import ManagesUsers
from relayd.listeners import port_of

from . import usage
from .compat import ApiError, CompatError, cert_info, echo_service, parse_service, rfc3339
from .config import SERVICE_NAME, ServiceConfig
from .store import NCOL, StoreConflict, row_dict

if TYPE_CHECKING:
    from relayd.auth.base import AuthMethod, UserDatabase

    from . import HttpProxyComponent, Service


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


class ManagementAPI:
    def __init__(self, component: HttpProxyComponent) -> None:
        self.c = component
        self.requests: dict[str, Any] | None = None  # runtime service -> the JSON it was created with

    async def handle(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        parts = [p for p in path.split("/") if p]
        try:
            if self.requests is None:
                self.requests = await self.c.counters.call(self.c.counters.store.service_requests)
            return await self._route(request, request.method, parts)
        except ApiError as exc:
            return _json({"message": exc.message}, exc.status)
        except StoreConflict as exc:  # another node made the same name a moment ago
            return _json({"message": str(exc)}, 409)
        except (sqlite3.Error, OSError) as exc:  # disk full, PostgreSQL unreachable: nothing was changed
            self.c.log.error("management API %s %s: state database %s: %s", request.method, path,
                             self.c.counters.store.where, exc)
            return _json({"message": f"the state database cannot take this change now: {exc}"}, 503)
        except Exception:  # a bug: log it here, answer JSON there, never a traceback
            self.c.log.exception("management API %s %s failed", request.method, path)
            return _json({"message": "internal error"}, 500)

    async def _route(self, request: web.BaseRequest, method: str, parts: list[str]) -> web.StreamResponse:
        n = len(parts)
        if n >= 1 and parts[0] in ("stats", "usage", "history") and method == "GET" and n <= 3:
            if parts[0] == "history":
                return _json(await usage.history(self.c, *parts[1:]))
            return _json(await usage.stats(self.c, parts[1] if n > 1 else None, parts[2] if n > 2 else None,
                                           compat=parts[0] == "stats"))
        if not parts or parts[0] != "services" or n > 6:
            raise ApiError(404, "no such management route")
        if n == 1:
            if method == "GET":
                return _json([self.service_json(s) for s in self.c.services.values()])
            if method == "POST":
                return _json(await self.create_service(await self._body(request)))
        elif n == 2:
            service = self._service(parts[1])
            if method == "GET":
                return _json(self.service_json(service))
            if method == "DELETE":
                await self.delete_service(service)
                return _json(None)
        elif n == 3 and parts[2] == "info" and method == "GET":
            return _json(self.service_info(self._service(parts[1])))
        elif parts[2] == "members" and n <= 4:
            service = self._service(parts[1])
            if n == 3 and method == "GET":
                return _json(self._members(service.name))
            if n == 3 and method == "POST":
                return _json(await self.add_member(service, await self._body(request)))
            if n == 4 and method == "GET":
                self._member(service.name, parts[3])
                return _json(self._user_json(service.name, parts[3]))
            if n == 4 and method == "DELETE":
                self._member(service.name, parts[3])
                await self.c.membership.remove(service.name, parts[3])
                return _json(None)
        elif parts[2] == "users":
            service = self._service(parts[1])
            if n == 3 and method == "GET":
                return _json(self._members(service.name))
            if n == 3 and method == "POST":
                return _json(await self.add_user(service, await self._body(request)))
            user = parts[3] if n >= 4 else ""
            if n == 4 and method == "GET":
                self._member(service.name, user)
                return _json(self._user_json(service.name, user))
            if n == 4 and method == "DELETE":
                await self.remove_user(service, user)
                return _json(None)
            if n == 5 and parts[4] == "stats" and method == "GET":
                await usage.member_or_counted(self.c, service.name, user)
                rows = await self.c.counters.current(service.name, user)
                return _json(row_dict(rows[0]["values"] if rows else [0] * NCOL))
            if n == 6 and parts[4:] == ["endpoints", "stats"] and method == "GET":
                await usage.member_or_counted(self.c, service.name, user)
                rows = await self.c.counters.current(service.name, user, endpoints=True)
                if request.query.get("detail"):
                    return _json({r["endpoint"]: row_dict(r["values"]) for r in rows})
                return _json({r["endpoint"]: r["values"][0] for r in rows})
        raise ApiError(404 if method in ("GET", "POST", "DELETE") else 405, "no such management route")

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    async def _body(request: web.BaseRequest) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise ApiError(400, "the request body must be JSON") from None

    def _service(self, name: str) -> Service:
        service = self.c.services.get(name)
        if service is None:
            raise ApiError(404, f"Service '{name}' not found")
        return service

    def _member(self, service: str, user: str) -> None:
        if not self.c.membership.is_member(service, user):
            raise ApiError(404, f"User '{user}' not found")

    def _members(self, service: str) -> list[dict[str, Any]]:
        return [self._user_json(service, u) for u in self.c.membership.users_of(service)]

    def _user_json(self, service: str, user: str) -> dict[str, Any]:
        return {"username": user, "createdAt": rfc3339(self.c.membership.joined(service, user))}

    def _users_store(self, service: Service) -> UserDatabase:
        auth = self._auth(service)
        if not isinstance(auth, ManagesUsers):
            raise ApiError(400, f"service '{service.name}' uses auth method '{auth.name}' "
                                f"({auth.describe()['method']}), which has no user store")
        return auth.users

    def _auth(self, service: Service) -> AuthMethod:
        return self.c.auth_of(service.config)

    # -- service JSON ----------------------------------------------------------------------

    def service_json(self, service: Service) -> dict[str, Any]:
        """A runtime service: what its client sent (see echo_service); a configured one: its
        CreateService shape as ya-runtime-http-auth's serde would write it, plus relayd's keys."""
        request = (self.requests or {}).get(service.name) if service.origin == "runtime" else None
        if isinstance(request, dict):
            return echo_service(request, service.name, service.created_at, service.config.listeners,
                                service.origin, _cert_hash)
        return self._effective_json(service)

    def _effective_json(self, service: Service) -> dict[str, Any]:
        scfg = service.config
        https, http, cert = [], [], None
        for lname in scfg.listeners:
            listener = self.c.context.listeners.get(lname)
            if listener is None:
                continue
            if listener.ssl_context is not None:
                https += listener.addresses
                tls = listener.config.tls
                if cert is None and scfg.cert is not None:
                    cert = {"hash": _cert_hash(scfg.cert) or "", "path": str(scfg.cert), "keyPath": str(scfg.key)}
                elif cert is None and tls is not None:
                    cert = {"hash": _cert_hash(tls.cert) or "", "path": str(tls.cert), "keyPath": str(tls.key)}
            else:
                http += listener.addresses
        auth = scfg.auth or self.c.config.auth
        method = getattr(self.c.context.auth.get(auth or ""), "config", None) if auth in self.c.context.auth else None
        return {
            "name": service.name,
            "description": scfg.description,
            "serverName": scfg.server_names,
            "bindHttps": https or None,
            "bindHttp": http or None,
            "cert": cert,
            "auth": {"method": method.method} if method is not None else None,
            "authName": auth,
            "from": scfg.from_,
            "to": scfg.to,
            "requestTimeout": None,
            "responseTimeout": int(scfg.read_timeout * 1000) if scfg.read_timeout else None,
            "cpuThreads": None,
            "user": None,
            "createdAt": rfc3339(service.created_at),
            "listeners": scfg.listeners,
            "origin": service.origin,
        }

    def service_info(self, service: Service) -> dict[str, Any]:
        """What `service info` printed in ya-runtime-http-auth, plus DER/SPKI pins."""
        full = self._effective_json(service)
        info: dict[str, Any] = {
            "name": service.name,
            "serverName": full["serverName"],
            "createdAt": full["createdAt"],
            "portHttps": sorted({port_of(a) for a in full["bindHttps"] or []} - {None}),
            "portHttp": sorted({port_of(a) for a in full["bindHttp"] or []} - {None}),
        }
        if full["cert"]:
            try:
                info.update(cert_info(_path(full["cert"]["path"])))
            except OSError as exc:
                info["certError"] = exc.strerror or str(exc)
        if service.config.read_timeout:
            info["timeouts"] = {"responseTimeout": full["responseTimeout"]}
        return info

    # -- services --------------------------------------------------------------------------

    async def create_service(self, data: Any) -> dict[str, Any]:
        try:
            parsed = parse_service(data)
        except CompatError as exc:
            raise ApiError(400, str(exc)) from None
        name = parsed["name"] or f"service-{len(self.c.services) + 1}"
        if not re.match(SERVICE_NAME, name):
            raise ApiError(400, f"service names must match {SERVICE_NAME}")
        if name in self.c.services:
            raise ApiError(409, f"Service '{name}' already exists")
        listeners = data.get("listeners") if isinstance(data, dict) else None
        if listeners is None:
            listeners = self._listeners_for(parsed["https"], tls=True) + self._listeners_for(parsed["http"], tls=False)
        definition: dict[str, Any] = {
            "description": parsed["description"], "server_names": parsed["server_names"],
            "listeners": listeners, "from": parsed["from"], "to": parsed["to"], "members_only": True,
        }
        if parsed["read_timeout"]:
            definition["read_timeout"] = parsed["read_timeout"]
        if parsed["cert"] and parsed["server_names"]:
            definition["cert"], definition["key"] = parsed["cert"], parsed["key"]  # served by SNI
        try:
            scfg = ServiceConfig.model_validate(definition)
        except ValidationError as exc:
            raise ApiError(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) \
                from None
        try:
            self.c.check_service(name, scfg)
        except ValueError as exc:
            status = 409 if "already bound" in str(exc) else 400
            raise ApiError(status, str(exc)) from None
        if scfg.cert is not None and scfg.key is not None:  # they go together (ServiceConfig)
            from relayd.listeners import ListenerError

            from .service_tls import tls_context

            try:
                tls_context(scfg.cert, scfg.key)
            except ListenerError as exc:
                raise ApiError(400, str(exc)) from None
        created = await self.c.counters.add_service(name, definition, data)
        from . import Service

        service = Service(name, scfg, "runtime", created, definition)
        self.c.services[name] = service
        assert self.requests is not None
        self.requests[name] = data
        self.c.rebuild_routes()
        self.c.load_service_certs()
        self.c.log.info("service %s created through the management API (%s -> %s)", name, scfg.from_, scfg.to)
        return self.service_json(service)

    def _listeners_for(self, binds: list[str], tls: bool) -> list[str]:
        names = []
        for bind in binds:
            found = None
            for lname in sorted(self.c.allowed_listeners):
                listener = self.c.context.listeners.get(lname)
                if listener is None or (listener.ssl_context is not None) != tls:
                    continue
                if bind == listener.config.bind or bind in listener.addresses:
                    found = lname
                    break
            if found is None:
                kind = "TLS" if tls else "plain HTTP"
                raise ApiError(400, f"component '{self.c.name}' serves no {kind} listener bound to {bind} "
                                    "(relayd binds only configured listeners: add one, and list it in "
                                    "extra_listeners)")
            names.append(found)
        return names

    async def delete_service(self, service: Service) -> None:
        if service.origin == "config":
            raise ApiError(409, f"Service '{service.name}' is defined in the configuration; remove it there")
        await self.c.counters.remove_service(service.name)
        self.c.services.pop(service.name, None)
        (self.requests or {}).pop(service.name, None)
        self.c.membership.remove_service(service.name)
        self.c.rebuild_routes()

    # -- users and members -------------------------------------------------------------------

    async def add_user(self, service: Service, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("username"), str) \
                or not isinstance(data.get("password"), str):
            raise ApiError(400, "expected {\"username\": \"...\", \"password\": \"...\"}")
        user, password = data["username"], data["password"]
        if self.c.membership.is_member(service.name, user):
            raise ApiError(409, f"User '{user}' already exists")
        store = self._users_store(service)
        from relayd.auth.users import UserExists

        try:
            await asyncio.to_thread(store.add, user, password)
        except UserExists:
            # Shared store: the user exists for another service; same password required.
            if not await asyncio.to_thread(store.verify, user, password):
                raise ApiError(409, f"User '{user}' already exists (with another password)") from None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return await self._new_member(service, user)

    async def add_member(self, service: Service, data: Any) -> dict[str, Any]:
        """relayd: make an existing user of the service's auth method a member."""
        if not isinstance(data, dict) or not isinstance(data.get("username"), str) or not data["username"]:
            raise ApiError(400, "expected {\"username\": \"...\"}")
        user = data["username"]
        if self.c.membership.is_member(service.name, user):
            raise ApiError(409, f"User '{user}' is already a member of '{service.name}'")
        auth = self._auth(service)
        if isinstance(auth, ManagesUsers):
            store, htpasswd = auth.users, auth.htpasswd
            exists = await asyncio.to_thread(store.__contains__, user) or \
                (htpasswd is not None and htpasswd.get(user) is not None)
            if not exists:
                raise ApiError(404, f"auth method '{auth.name}' has no user '{user}' (add it with "
                                    f"`relayctl users add {user}`, or POST services/{service.name}/users "
                                    "with a password)")
        return await self._new_member(service, user)

    async def _new_member(self, service: Service, user: str) -> dict[str, Any]:
        await self.c.membership.add(service.name, user)
        return self._user_json(service.name, user)

    async def remove_user(self, service: Service, user: str) -> None:
        self._member(service.name, user)
        await self.c.membership.remove(service.name, user)
        if not self.c.membership.in_any_service(user):
            store = self._users_store(service)
            from relayd.auth.users import UnknownUser

            try:
                await asyncio.to_thread(store.remove, user)
            except UnknownUser:
                pass


def _cert_hash(path: Any) -> str | None:
    try:
        return cert_info(_path(path))["certHash"]
    except OSError:
        return None


def _path(value: Any) -> Any:
    from pathlib import Path

    return Path(value)
