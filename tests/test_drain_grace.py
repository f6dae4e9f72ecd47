"""The end of a drain's grace period must not cut a connection whose request has arrived.

The grace period ends on a timer, and the event loop runs due timers before it polls for
I/O: after a busy spell a connection whose request is already in its socket still looks idle
(seen once: tests/test_http_proxy_reload.py got an empty reply under load 8-10).
``relayd.lifecycle.with_unread_bytes`` asks the socket itself; here the loop is never given
the chance to read, exactly the state the timer sees.
"""

from __future__ import annotations

import asyncio
import socket
import time

import uvloop

from relayd.lifecycle import with_unread_bytes


class Accepted(asyncio.Protocol):
    def __init__(self, accepted: asyncio.Queue[asyncio.BaseTransport]) -> None:
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.accepted.put_nowait(transport)  # uvloop's transports are not asyncio.Transport


async def unread_bytes_are_seen_before_the_loop_reads_them() -> None:
    accepted: asyncio.Queue[asyncio.BaseTransport] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Accepted(accepted), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    asking = socket.create_connection(("127.0.0.1", port))
    silent = socket.create_connection(("127.0.0.1", port))
    first: asyncio.BaseTransport | None = None
    second: asyncio.BaseTransport | None = None
    try:
        first, second = await accepted.get(), await accepted.get()
        assert with_unread_bytes([first, second]) == set()
        asking.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        # From here on nothing awaits: the loop cannot read what arrived, as when a grace
        # timer fires first. Poll the check itself (loopback delivers within the send).
        deadline = time.monotonic() + 10
        seen: set[asyncio.BaseTransport] = set()
        while not seen and time.monotonic() < deadline:
            seen = with_unread_bytes([first, second])
        peer_of = {t: t.get_extra_info("peername")[1] for t in (first, second)}
        assert {peer_of[t] for t in seen} == {asking.getsockname()[1]}
        assert silent.getsockname()[1] not in {peer_of[t] for t in seen}
    finally:
        for transport in (first, second):
            if transport is not None:
                transport.close()
        asking.close()
        silent.close()
        server.close()
        await server.wait_closed()


def test_unread_request_bytes_are_seen_on_uvloop():
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(unread_bytes_are_seen_before_the_loop_reads_them())


def test_unread_request_bytes_are_seen_on_asyncio():
    with asyncio.Runner() as runner:
        runner.run(unread_bytes_are_seen_before_the_loop_reads_them())
