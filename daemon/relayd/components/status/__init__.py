"""``kind = "status"``: health, Prometheus metrics and a status summary over HTTP.

GET /healthz   200 "ok" while serving ("degraded: ENGINE down" while Redis or PostgreSQL is
               unreachable: the node still serves locally), 503 while stopping
GET /metrics   Prometheus text exposition of relayd and every component
GET /status    JSON: generation, uptime, components with their state and counts
GET /.well-known/relayd   unauthenticated discovery document (relayd.auth.discovery)
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import Field

from relayd import metrics
from relayd.auth import discovery
from relayd.auth.base import AuthError, AuthFailure
from relayd.component import Component, ComponentConfig, Context
from relayd.config.types import AuthRef, ListenerRef
from relayd.httpserve import HttpService


class StatusConfig(ComponentConfig):
    kind: Literal["status"]
    listener: ListenerRef = Field(description="listener to serve on")
    auth: AuthRef | None = Field(None, description="auth method guarding /metrics and /status")


class StatusComponent(Component):
    Config = StatusConfig
    config: StatusConfig

    def __init__(self, name: str, config: StatusConfig, context: Context) -> None:
        super().__init__(name, config, context)
        self.requests = 0
        self.http = HttpService(self.handle)

    async def start(self) -> None:
        listener = self.context.listener(self.config.listener)
        await self.http.serve(listener)
        self.log.info("status listening on %s", ", ".join(f"{listener.scheme}://{a}" for a in listener.addresses))

    async def stop(self, drain_timeout: float) -> None:
        await self.http.stop(drain_timeout)

    def listener_names(self) -> set[str]:
        return {self.config.listener}

    def status(self) -> dict[str, object]:
        return {"requests": self.requests, "connections": self.http.connections}

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests += 1
        daemon = self.context.daemon
        if request.path == "/healthz":
            if daemon is None or daemon.stopping:
                return web.Response(text="stopping\n", status=503)
            # Still 200: a node whose Redis or PostgreSQL is down serves its local clients, so a
            # load balancer should keep it; the body says what is missing.
            degraded = daemon.engines.degraded()
            return web.Response(text=f"degraded: {', '.join(degraded)} down\n" if degraded else "ok\n")
        if request.path == discovery.PATH and request.method in ("GET", "HEAD"):
            methods = [self.context.auth_method(self.config.auth)] if self.config.auth else []
            return web.json_response(discovery.document(methods))
        if request.path not in ("/metrics", "/status"):
            return web.json_response({"message": "not found"}, status=404)
        if self.config.auth:
            method = self.context.auth_method(self.config.auth)
            try:
                await method.authenticate(request.headers.get("Authorization"))
            except AuthError as exc:
                status = 503 if exc.reason is AuthFailure.UNAVAILABLE else (
                    403 if exc.reason is AuthFailure.FORBIDDEN else 401)
                challenge = method.challenge()
                headers = {"WWW-Authenticate": challenge} if status == 401 and challenge else {}
                return web.json_response({"message": exc.message}, status=status, headers=headers)
        if daemon is None:  # a component built outside a daemon (unit tests)
            return web.json_response({"message": "no daemon"}, status=503)
        if request.path == "/metrics":
            return web.Response(body=metrics.render(daemon), headers={"Content-Type": metrics.CONTENT_TYPE})
        document = daemon.status()
        return web.json_response({k: document[k] for k in ("version", "generation", "uptime", "components")})
