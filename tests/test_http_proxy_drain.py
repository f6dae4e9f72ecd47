"""A draining http_proxy waits on an event for its last client connection, never polls.

Real sockets on 127.0.0.1 and the real asyncio shell (``proxy.ClientConnection``); the wait
ends when the last connection closes (awaited, with a generous deadline: no timing luck).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from types import SimpleNamespace

from relayd.components.http_proxy.counters import Counters
from relayd.components.http_proxy.proxy import ClientConnection
from relayd.components.http_proxy.routes import Core, Router

DEADLINE = 30.0  # generous: the wait ends on an event, not on a clock


async def _until(check, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_no_connections_returns_when_the_last_client_connection_closes():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        # Counters is compiled (mypyc checks the type): a real one, never started.
        counters = Counters(SimpleNamespace(path=Path("/nonexistent/test.db"), service_gens={}), 100)  # type: ignore[arg-type]
        core = Core(loop, counters, keepalive_timeout=75, auth_cache_ttl=0, upstream_idle=0)
        router = Router(core, "web", lambda methods: {})
        server = await loop.create_server(lambda: ClientConnection(router, tls=False), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await core.no_connections()  # none yet: returns at once
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
            await _until(lambda: len(core.connections) == 2, "two accepted connections")
            waiter = asyncio.ensure_future(core.no_connections())
            clients.pop().close()
            await _until(lambda: len(core.connections) == 1, "the first connection to go")
            for _ in range(5):
                await asyncio.sleep(0)
            assert not waiter.done(), "one connection is still open"
            clients.pop().close()
            await asyncio.wait_for(waiter, DEADLINE)
            assert not core.connections
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
