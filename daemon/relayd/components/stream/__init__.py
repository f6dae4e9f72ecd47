"""``kind = "stream"``: SciStream's control server (s2cs) and data plane (s2ds) in process.

The ``scistream.Control`` gRPC service (req, hello, update, release; wire-compatible with
s2uc, appctrl and scistream-go) runs with grpclib on the configured listener's sockets. Each
session reserves ``num_conn`` ports from the component's range; ``update`` starts an asyncio
forwarder per port (``forward.py``); ``release``, the hello timeout and shutdown free them.
Sessions are listed by ``relayctl sessions NAME`` (control path ``sessions``).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from grpclib.server import Server

from relayd.auth.base import OAuthClientConfig
from relayd.component import Component, Context
from relayd.components.stream.config import StreamConfig
from relayd.components.stream.forward import DataPlane, client_context, server_context
from relayd.components.stream.manager import SessionManager
from relayd.components.stream.ports import PortPool
from relayd.components.stream.service import ControlService
from relayd.lifecycle import drain
from relayd.logsetup import access_logger
from relayd.metric_families import Metric, counter, gauge

__all__ = ["StreamComponent", "StreamConfig"]


class _Server(Server):
    """grpclib's Server, remembering its HTTP/2 connections: ``Server.close()`` leaves them
    open, and a stopped or replaced component must not keep answering calls on them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocols: weakref.WeakSet = weakref.WeakSet()

    def _protocol_factory(self):
        protocol = super()._protocol_factory()
        self.protocols.add(protocol)
        return protocol

    def close_connections(self) -> None:
        """GOAWAY then close: clients open a new connection (to the next generation) for new calls."""
        for protocol in list(self.protocols):
            connection = getattr(protocol, "connection", None)
            if connection is None or connection.is_closing():
                continue
            with contextlib.suppress(Exception):
                connection._connection.close_connection()  # h2 GOAWAY, NO_ERROR
                connection.flush()
            protocol.processor.close("relayd stopped this stream component")


class StreamComponent(Component):
    Config = StreamConfig
    config: StreamConfig

    def __init__(self, name: str, config: StreamConfig, context: Context) -> None:
        super().__init__(name, config, context)
        # Every attribute here, no I/O (relayd.lifecycle): stop() is safe after a failed start.
        cfg = config
        auth = context.auth_method(cfg.auth)
        client_id = auth.config.client_id if isinstance(auth.config, OAuthClientConfig) else None
        scope_id = cfg.scope_id or client_id or cfg.auth
        self.pool = PortPool(cfg.data_bind, *cfg.port_range)
        self.plane = DataPlane(role_ssl={}, buffer_size=cfg.buffer_size,
                               connect_timeout=cfg.connect_timeout, splice=cfg.splice)
        self.manager = SessionManager(cfg, self.pool, self.plane, self.log)
        self.manager.access = access_logger(name) if cfg.access_log else None
        self.service = ControlService(self.manager, auth, scope_id, self.log)
        self.servers: list[_Server] = []

    async def start(self) -> None:
        cfg = self.config
        listener = self.context.listener(cfg.listener)
        if cfg.security == "tls" and cfg.tls is not None:
            t = cfg.tls  # certificate files are read here, not in __init__
            self.plane.role_ssl = {
                "PROD": (server_context(str(t.cert), str(t.key), str(t.ca)), None),
                "CONS": (None, client_context(str(t.cert), str(t.key), str(t.ca), t.verify_hostname)),
            }
        ssl_context = None
        if listener.tls is not None:
            # gRPC clients require ALPN "h2"; the pool's certificate, renewed on reload.
            ssl_context = listener.tls.front(("h2",))
        for sock in listener.serving_sockets():
            server = _Server([self.service])
            await server.start(sock=sock, ssl=ssl_context)
            self.servers.append(server)
        self.log.info("stream control (gRPC) listening on %s (auth %s); data ports %s on %s",
                      ", ".join(f"{'grpcs' if ssl_context else 'grpc'}://{a}" for a in listener.addresses),
                      cfg.auth, cfg.ports, cfg.data_bind)

    async def stop(self, drain_timeout: float) -> None:
        """Refuse new RPCs and connections, let live data connections run for drain_timeout."""
        for server in self.servers:
            server.close()  # also cancels RPCs in progress (a req waiting for its hello)
        self.manager.stop_accepting()
        for server in self.servers:
            server.close_connections()
        if self.plane.totals.connections:
            await drain(self.plane.idle(), drain_timeout)
        self.manager.end_all()
        await drain(asyncio.gather(*(s.wait_closed() for s in self.servers)), max(drain_timeout, 1.0))

    def listener_names(self) -> set[str]:
        return {self.config.listener}

    # -- observability -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        sessions = self.manager.sessions
        return {
            "sessions": len(sessions),
            "in_setup": sum(1 for s in sessions if s.state in ("setup", "ready")),
            "active": sum(1 for s in sessions if s.state == "active"),
            "connections": self.plane.totals.connections,
            "ports_free": self.pool.free,
            "security": self.config.security,
        }

    def clients(self) -> list[dict[str, Any]]:
        return [s.as_row() for s in self.manager.sessions]

    async def control(self, request: web.Request, path: str) -> web.StreamResponse | None:
        if path == "sessions" and request.method == "GET":
            return web.json_response({"component": self.name, "kind": self.kind,
                                      "rate_unit": self.config.rate_unit, "sessions": self.clients()})
        return None

    def metrics(self) -> Iterable[Metric]:
        name, totals = self.name, self.plane.totals
        counts = {"setup": 0, "ready": 0, "active": 0}
        for s in self.manager.sessions:
            counts[s.state] = counts.get(s.state, 0) + 1
        yield gauge("relayd_stream_sessions", "Stream sessions by state", ["component", "state"],
                    (([name, state], count) for state, count in counts.items()))
        yield counter("relayd_stream_sessions_ended", "Stream sessions ended, by reason", ["component", "reason"],
                      (([name, reason], count) for reason, count in self.manager.ended.items()))
        yield counter("relayd_stream_bytes", "Bytes forwarded by the data plane", ["component", "direction"],
                      [([name, "to_target"], totals.bytes_to_target),
                       ([name, "from_target"], totals.bytes_from_target)])
        labels, one = ["component"], [name]
        yield gauge("relayd_stream_connections", "Open data-plane connections", labels, [(one, totals.connections)])
        yield counter("relayd_stream_connections_accepted", "Data-plane connections accepted", labels,
                      [(one, totals.connections_total)])
        yield counter("relayd_stream_connect_failures", "Connections to targets that failed", labels,
                      [(one, totals.connect_failures)])
        yield gauge("relayd_stream_ports_free", "Ports of the range not held by a session", labels,
                    [(one, self.pool.free)])
        yield counter("relayd_stream_rpcs", "scistream.Control calls by result", ["component", "rpc", "code"],
                      (([name, rpc, code], count) for (rpc, code), count in sorted(self.service.calls.items())))
