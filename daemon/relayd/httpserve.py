"""Serve an aiohttp handler on a listener's sockets, with a drain-aware stop.

aiohttp's low-level ``web.Server`` is a protocol factory, so it runs directly on the dup'd
listening sockets the core hands out; closing those servers never closes the listener.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from relayd.listeners import Listener

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class HttpService:
    def __init__(self, handler: Handler, **server_kwargs: object) -> None:
        self.web_server = web.Server(handler, access_log=None, **server_kwargs)  # type: ignore[arg-type]
        self.servers: list[asyncio.AbstractServer] = []

    async def serve(self, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        for sock in listener.serving_sockets():
            server = await loop.create_server(self.web_server, sock=sock, ssl=listener.ssl_context)
            self.servers.append(server)

    @property
    def connections(self) -> int:
        return len(self.web_server.connections)

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting; let requests in flight finish for up to drain_timeout."""
        for server in self.servers:
            server.close()
        await self.web_server.shutdown(drain_timeout)
        self.servers.clear()
