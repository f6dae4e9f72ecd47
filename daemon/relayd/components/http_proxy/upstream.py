"""The upstream side of the proxy: one asyncio Protocol per connection, pooled between exchanges.

Each exchange gets a fresh ``ResponseReader``, so no state of one response can reach the next.
The connection goes back to the pool only when the response ended exactly where its framing
said (no byte after it), the upstream did not ask to close, and the request was sent whole.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from . import splice
from .http1 import BODY, END, ERROR, HEAD, INTERIM, UPGRADE, ResponseReader

if TYPE_CHECKING:
    from .exchange import Exchange
    from .proxy import ClientConnection

log = logging.getLogger("relayd.http_proxy")
HIGH_WATER = 1 << 20


class UpstreamConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.ex: Exchange | None = None
        self.reader: ResponseReader | None = None
        self.received = 0  # bytes of the current exchange's response seen
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def attach(self, client: ClientConnection, ex: Exchange) -> None:
        self.client = client
        self.ex = ex
        self.received = 0
        self.reader = ResponseReader(ex.req.method == b"HEAD", ex.req.upgrade is not None)

    def detach(self) -> None:
        self.client = self.ex = None
        self.reader = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        client, ex = self.client, self.ex
        self.detach()
        if client is not None and ex is not None:
            client.upstream_lost(ex, self, exc)

    def drop(self) -> None:
        self.detach()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_full(True)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.upstream_full(False)

    def data_received(self, data: bytes) -> None:
        try:
            self._data_received(data)
        except Exception:  # a bug costs one exchange and a log line
            log.exception("http_proxy: internal error on an upstream connection")
            client = self.client
            self.drop()
            if client is not None:
                client.internal_error()

    def _data_received(self, data: bytes) -> None:
        ex, client, reader = self.ex, self.client, self.reader
        if ex is None or client is None or reader is None:
            self.drop()  # an idle connection must not talk
            return
        self.received += len(data)
        ex.last_io = client.core.loop.time()
        if ex.tunnel:
            client.tunnel_data(ex, data)
            return
        for kind, value in reader.feed(data):
            if kind == BODY:
                client.response_body(ex, value)  # type: ignore[arg-type]
            elif kind == HEAD:
                client.response_head(ex, value)  # type: ignore[arg-type]
            elif kind == END:
                client.response_done(ex, reusable=reader.head.keep_alive and not reader.extra)  # type: ignore[union-attr]
            elif kind == INTERIM:
                client.interim_response(ex, value)  # type: ignore[arg-type]
            elif kind == UPGRADE:
                client.tunnel_data(ex, value)  # type: ignore[arg-type]
            elif kind == ERROR:
                client.fail(ex, 502, f"invalid response from upstream: {value}")
            if ex.finished or self.ex is not ex:
                return
        if reader.remaining >= splice.MIN_BODY:
            client.maybe_splice(ex, self, reader.remaining)
