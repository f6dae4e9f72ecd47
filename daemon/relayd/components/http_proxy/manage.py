"""The management API, route for route compatible with ya-runtime-http-auth's.

    GET/POST        services                      list / create (409 if the name or `from` is taken)
    GET/DELETE      services/S                    one service / delete a runtime-created one
    GET/POST        services/S/users              members / add {"username", "password"} (409 if exists)
    GET/DELETE      services/S/users/U            one member / remove it
    GET             services/S/users/U/stats      {"requests": N, "bytesIn", "bytesOut", "statuses"}
    GET             services/S/users/U/endpoints/stats   {"<path>": N, ...}
    GET             services/S/info               what `relayctl service info` prints (relayd)
    GET             stats[/S[/U]]                 totals (missing from the original)

Errors are ``{"message": "..."}``. Unlike the original, "not found" is 404 (it answered 400).
Users live in the service's ``basic`` auth method's user store; membership (which service a
user was added to) and counters live in the component's state database. Counters are never
removed: deleting a user keeps what it was counted.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from .compat import CompatError, cert_info, parse_service, rfc3339
from .config import SERVICE_NAME, ServiceConfig
from .store import row_dict

if TYPE_CHECKING:
    from . import HttpProxy, Service


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


class ManagementAPI:
    def __init__(self, component: HttpProxy) -> None:
        self.c = component

    async def handle(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        parts = [p for p in path.split("/") if p]
        try:
            return await self._route(request, request.method, parts)
        except ApiError as exc:
            return _json({"message": exc.message}, exc.status)
        except Exception:  # a bug: log it here, answer JSON there, never a traceback
            self.c.log.exception("management API %s %s failed", request.method, path)
            return _json({"message": "internal error"}, 500)

    async def _route(self, request: web.BaseRequest, method: str, parts: list[str]) -> web.StreamResponse:
        n = len(parts)
        if n >= 1 and parts[0] == "stats" and method == "GET" and n <= 3:
            return _json(await self.stats(*parts[1:]))
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
        elif parts[2] == "users":
            service = self._service(parts[1])
            if n == 3 and method == "GET":
                return _json([self._user_json(service.name, u) for s, u in sorted(self.c.core.members)
                              if s == service.name])
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
                self._member_or_counted(service.name, user)
                rows = await self.c.counters.rows(service.name, user)
                row = rows.get((service.name, user, ""))
                return _json(row_dict(row) if row else row_dict([0] * 9))
            if n == 6 and parts[4:] == ["endpoints", "stats"] and method == "GET":
                self._member_or_counted(service.name, user)
                rows = await self.c.counters.rows(service.name, user, endpoints=True)
                if request.query.get("detail"):
                    return _json({k[2]: row_dict(v) for k, v in sorted(rows.items())})
                return _json({k[2]: v[0] for k, v in sorted(rows.items())})
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
        if (service, user) not in self.c.core.members:
            raise ApiError(404, f"User '{user}' not found")

    def _member_or_counted(self, service: str, user: str) -> None:
        # Stats stay readable after a user is removed (billing must not lose them).
        if (service, user) not in self.c.core.members and (service, user) not in self.c.counters.endpoints:
            raise ApiError(404, f"User '{user}' not found")

    def _user_json(self, service: str, user: str) -> dict[str, Any]:
        created = self.c.member_times.get((service, user), 0.0)
        return {"username": user, "createdAt": rfc3339(created)}

    def _users_store(self, service: Service) -> Any:
        auth = self.c.context.auth_method(service.config.auth or self.c.config.auth)  # type: ignore[arg-type]
        store = getattr(auth, "users", None)
        if store is None:
            raise ApiError(400, f"service '{service.name}' uses auth method '{auth.name}' "
                                f"({auth.config.method}), which has no user store")  # type: ignore[attr-defined]
        return store

    def service_json(self, service: Service) -> dict[str, Any]:
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
                    cert = {"path": str(scfg.cert), "keyPath": str(scfg.key), "hash": _cert_hash(scfg.cert)}
                elif cert is None and tls is not None:
                    cert = {"path": str(tls.cert), "keyPath": str(tls.key), "hash": _cert_hash(tls.cert)}
            else:
                http += listener.addresses
        auth = scfg.auth or self.c.config.auth
        return {
            "name": service.name,
            "description": scfg.description,
            "serverName": scfg.server_names,
            "bindHttps": https or None,
            "bindHttp": http or None,
            "cert": cert,
            "auth": {"method": getattr(self.c.context.auth.get(auth), "config", None).method  # type: ignore[union-attr]
                     if auth in self.c.context.auth else None, "name": auth},
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
        full = self.service_json(service)
        info: dict[str, Any] = {
            "name": service.name,
            "serverName": full["serverName"],
            "createdAt": full["createdAt"],
            "portHttps": sorted({_port(a) for a in full["bindHttps"] or []} - {None}),
            "portHttp": sorted({_port(a) for a in full["bindHttp"] or []} - {None}),
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
        import re

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
        if scfg.cert is not None:
            from relayd.listeners import ListenerError

            from . import _tls_context

            try:
                _tls_context(scfg.cert, scfg.key)  # type: ignore[arg-type]
            except ListenerError as exc:
                raise ApiError(400, str(exc)) from None
        created = await self.c.counters.call(self.c.counters.store.add_service, name, definition)
        from . import Service

        service = Service(name, scfg, "runtime", created, definition)
        self.c.services[name] = service
        self.c.rebuild_routes()
        self.c._load_service_certs()
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
        await self.c.counters.call(self.c.counters.store.remove_service, service.name)
        self.c.services.pop(service.name, None)
        self.c.core.members = {m for m in self.c.core.members if m[0] != service.name}
        self.c.rebuild_routes()

    # -- users -----------------------------------------------------------------------------

    async def add_user(self, service: Service, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("username"), str) \
                or not isinstance(data.get("password"), str):
            raise ApiError(400, "expected {\"username\": \"...\", \"password\": \"...\"}")
        user, password = data["username"], data["password"]
        if (service.name, user) in self.c.core.members:
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
        created = await self.c.counters.call(self.c.counters.store.add_member, service.name, user)
        self.c.core.members.add((service.name, user))
        self.c.member_times[(service.name, user)] = created
        self.c.core.forget_credentials()
        return self._user_json(service.name, user)

    async def remove_user(self, service: Service, user: str) -> None:
        self._member(service.name, user)
        await self.c.counters.call(self.c.counters.store.remove_member, service.name, user)
        self.c.core.members.discard((service.name, user))
        self.c.member_times.pop((service.name, user), None)
        self.c.core.forget_credentials()
        if not any(u == user for _, u in self.c.core.members):
            store = self._users_store(service)
            from relayd.auth.users import UnknownUser

            try:
                await asyncio.to_thread(store.remove, user)
            except UnknownUser:
                pass

    # -- stats -----------------------------------------------------------------------------

    async def stats(self, service: str | None = None, user: str | None = None) -> dict[str, Any]:
        if service is not None and service not in self.c.services:
            rows = await self.c.counters.rows(service)
            if not rows:
                raise ApiError(404, f"Service '{service}' not found")
        rows = await self.c.counters.rows(service, user)
        total = [0] * 9
        per_service: dict[str, dict[str, Any]] = {}
        for (svc, usr, _), values in sorted(rows.items()):
            entry = per_service.setdefault(svc, {"total": [0] * 9, "users": {}})
            entry["users"][usr] = row_dict(values)
            for i, v in enumerate(values):
                entry["total"][i] += v
                total[i] += v
        users = {u for s, u in self.c.core.members if service is None or s == service}
        out: dict[str, Any] = {
            "users": len(users),
            "services": len(self.c.services) if service is None else 1,
            "requests": {"requests": total[0]},
            **{k: v for k, v in row_dict(total).items() if k != "requests"},
            "rejected": sum(n for s, n in self.c.counters.rejected_counts.items() if service in (None, s)),
            "perService": {s: {**row_dict(e["total"]), "users": e["users"]} for s, e in per_service.items()},
        }
        if service is not None and user is not None:
            endpoints = await self.c.counters.rows(service, user, endpoints=True)
            out["endpoints"] = {k[2]: row_dict(v) for k, v in sorted(endpoints.items())}
        return out


def _cert_hash(path: Any) -> str | None:
    try:
        return cert_info(_path(path))["certHash"]
    except OSError:
        return None


def _path(value: Any) -> Any:
    from pathlib import Path

    return Path(value)


def _port(address: str) -> int | None:
    if address.startswith("unix:"):
        return None
    try:
        return int(address.rsplit(":", 1)[1])
    except ValueError:
        return None
