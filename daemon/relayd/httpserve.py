"""Serve an aiohttp handler on a listener's sockets, with a drain-aware stop.

aiohttp's low-level ``web.Server`` is a protocol factory, so it runs directly on the dup'd
listening sockets the core hands out; closing those servers never closes the listener. The
servers are relayd.accept_gate GatedServers: they stop accepting while the listener is at its
max_connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from relayd.accept_gate import GatedServer, Release, serve_gated
from relayd.lifecycle import drain
from relayd.listeners import Listener

# How long a retiring server waits for the first request of a just-accepted connection.
FIRST_REQUEST_GRACE = 1.0

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class _WebServer(web.Server):
    """aiohttp's registry of connections, telling the accept gate when one closes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_closed: dict[Any, Release] = {}  # RequestHandler -> release its slot
        self.changed: Callable[[], None] = lambda: None  # a connection went away

    def attach(self, handler: Any, release: Release) -> None:
        self.on_closed[handler] = release

    def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
        try:
            super().connection_lost(handler, exc)
        finally:
            release = self.on_closed.pop(handler, None)
            if release is not None:
                release()
            self.changed()


class HttpService:
    def __init__(self, handler: Handler, **server_kwargs: object) -> None:
        self._handler = handler
        self._busy: dict[object, int] = {}  # connection (RequestHandler) -> handlers running
        self._changed = asyncio.Event()
        self.web_server = _WebServer(self._track, access_log=None, **server_kwargs)
        self.web_server.changed = self._changed.set
        self.servers: list[GatedServer] = []

    async def _track(self, request: web.BaseRequest) -> web.StreamResponse:
        conn = request.protocol
        self._busy[conn] = self._busy.get(conn, 0) + 1
        self._changed.set()  # a first request arrived: see _wait_for_first_requests
        try:
            return await self._handler(request)
        finally:
            self._busy[conn] -= 1
            if not self._busy[conn]:
                del self._busy[conn]
            self._changed.set()

    async def serve(self, listener: Listener) -> None:
        server = await serve_gated(listener, self.web_server, ssl=listener.ssl_context,
                                   attach=self.web_server.attach)
        self.servers.append(server)

    @property
    def connections(self) -> int:
        return len(self.web_server.connections)

    @property
    def in_flight(self) -> int:
        return sum(self._busy.values())

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting; let requests in flight finish for up to drain_timeout, then close.

        Not just aiohttp's ``shutdown()``: that stops reading from every connection at once,
        so a request body (or WebSocket frames) still on its way never arrives, and it waits
        the whole timeout on idle keep-alive connections. Instead: close the listening
        servers, let just-accepted connections deliver their first request, close each
        connection as soon as it is idle, and shut down what is still busy at the deadline.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        for server in self.servers:
            server.close()
        await self._wait_for_first_requests(min(drain_timeout, FIRST_REQUEST_GRACE))
        await drain(self._idle(), deadline - loop.time())
        # aiohttp reads a timeout of 0 as "no timeout": give it a tiny positive one instead.
        await self.web_server.shutdown(max(0.01, deadline - loop.time()))
        self.servers.clear()

    async def _idle(self) -> None:
        """Close each connection as soon as it is idle; return when none is busy."""
        while True:
            self._changed.clear()
            for conn in list(self.web_server.connections):
                if conn not in self._busy:
                    conn.close()  # idle: close now; a response being written is finished first
            if not self._busy:
                return
            await self._changed.wait()

    async def _wait_for_first_requests(self, grace: float) -> None:
        """Let connections accepted just before close deliver their first request.

        A client whose connect() was accepted by this (retiring) server an instant ago has
        its request on the wire: closing now would drop it, which a reload must never do
        (found by tests/test_reload.py).
        """

        def fresh() -> list:
            # _request_count: requests parsed on the connection (aiohttp 3.x RequestHandler).
            return [c for c in self.web_server.connections
                    if getattr(c, "_request_count", 1) == 0 and c.transport is not None]

        async def all_asked() -> None:
            while fresh():  # woken when a request starts or a connection goes
                self._changed.clear()
                await self._changed.wait()

        await drain(all_asked(), grace)
