"""The control API: HTTP/JSON on a unix socket, used by relayctl.

Access is decided by the socket's file mode (0660 by default, or whatever systemd's socket
unit sets); every request's peer uid/pid is logged from SO_PEERCRED.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relayd import metrics
from relayd.config import ConfigError
from relayd.config.model import ControlConfig
from relayd.listeners import ListenerError, bind_socket

if TYPE_CHECKING:
    from relayd.context import RuntimeView

log = logging.getLogger("relayd.control")


def peer_credentials(request: web.Request) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process on the other end of a unix socket."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", raw)


class ControlServer:
    def __init__(self, daemon: RuntimeView) -> None:
        self.daemon = daemon
        self.runner: web.AppRunner | None = None
        self.path: str | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._log_peer])
        app.router.add_get("/v1/status", self.status)
        app.router.add_post("/v1/reload", self.reload)
        app.router.add_post("/v1/check", self.check)
        app.router.add_get("/v1/config", self.config)
        app.router.add_get("/v1/plugins", self.plugins)
        app.router.add_get("/v1/metrics", self.metrics)
        app.router.add_get("/v1/health", self.health)
        app.router.add_route("*", "/v1/components/{name}/{tail:.*}", self.component)
        return app

    async def start(self, config: ControlConfig, activated: dict[str, list[socket.socket]]) -> None:
        if config.fd_name in activated:
            sock = activated[config.fd_name][0]
            if sock.family != socket.AF_UNIX:
                # The control API's only access control is the socket file's mode (and peer
                # credentials): never serve it on a network socket.
                raise ListenerError(
                    f"control socket: the socket passed as {config.fd_name!r} is not a unix socket; "
                    "refusing to serve the control API on it"
                )
            sock = socket.socket(fileno=os.dup(sock.fileno()))
        else:
            bind = "unix:" + config.socket
            try:
                sock = bind_socket(bind, 64)
            except ListenerError as exc:
                raise ListenerError(f"control socket: {exc}") from None
            if not config.socket.startswith("@"):
                os.chmod(config.socket, int(config.mode, 8))
                self.path = config.socket
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.SockSite(self.runner, sock).start()
        log.info("control socket on %s", config.socket if self.path or config.fd_name not in activated
                 else f"systemd socket {config.fd_name!r}")

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    @web.middleware
    async def _log_peer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        creds = peer_credentials(request)
        level = logging.DEBUG if request.method == "GET" else logging.INFO
        if creds:
            log.log(level, "control %s %s from pid=%d uid=%d gid=%d", request.method, request.path, *creds)
        return await handler(request)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.daemon.status())

    async def health(self, request: web.Request) -> web.Response:
        ok = not self.daemon.stopping and self.daemon.generation is not None
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    async def reload(self, request: web.Request) -> web.Response:
        result = await self.daemon.reload()
        return web.json_response(result.as_dict(), status=200 if result.ok else 422)

    async def check(self, request: web.Request) -> web.Response:
        try:
            await asyncio.to_thread(self.daemon.load)
        except ConfigError as exc:
            return web.json_response({"ok": False, "errors": [str(p) for p in exc.problems]}, status=422)
        return web.json_response({"ok": True, "errors": []})

    async def config(self, request: web.Request) -> web.Response:
        generation = self.daemon.generation
        if generation is None:
            raise web.HTTPServiceUnavailable(text='{"message": "starting"}', content_type="application/json")
        loaded = generation.config
        body: dict[str, Any] = {"config": loaded.effective(), "files": [str(f) for f in loaded.files],
                                "warnings": loaded.warnings}
        if request.query.get("origins"):
            body["origins"] = [list(row) for row in loaded.with_origins()]
        return web.json_response(body)

    async def plugins(self, request: web.Request) -> web.Response:
        return web.json_response({"plugins": self.daemon.registry.describe()})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(self.daemon), headers={"Content-Type": metrics.CONTENT_TYPE})

    async def component(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        generation = self.daemon.generation
        component = generation.components.get(name) if generation is not None else None
        if component is None:
            raise web.HTTPNotFound(text=f'{{"message": "no component named {name!r}"}}',
                                   content_type="application/json")
        tail = request.match_info["tail"]
        if tail == "clients" and request.method == "GET":
            return web.json_response({"component": name, "kind": component.kind,
                                      "clients": component.clients()})
        response = await component.control(request, tail)
        if response is None:
            raise web.HTTPNotFound(text='{"message": "not found"}', content_type="application/json")
        return response
