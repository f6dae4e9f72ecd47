"""The upstream side of the proxy: one asyncio Protocol per connection, pooled between exchanges.

It only moves bytes to the client's ``ClientCore``, which parses them with a fresh reader per
exchange and decides whether the connection goes back to the pool (only when both messages
ended exactly where their framing said).
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from typing import TYPE_CHECKING, Protocol, cast

from .response_reader import ResponseReader

if TYPE_CHECKING:
    from .exchange import Exchange

log = logging.getLogger("relayd.http_proxy")
HIGH_WATER = 1 << 20


class ExchangeEvents(Protocol):
    """What the upstream side tells a client connection's exchange core (``core.ClientCore``)."""

    def upstream_data(self, ex: Exchange, data: bytes) -> None: ...
    def upstream_lost(self, ex: Exchange, error: str) -> None: ...
    def set_upstream_full(self, full: bool) -> None: ...
    def splice_done(self, ex: Exchange) -> None: ...
    def abort(self, ex: Exchange) -> None: ...


class UpstreamClient(Protocol):
    """The client connection an upstream connection (or a splicer) works for: the shape of
    ``proxy.ClientConnection`` used here and in ``splice`` (proxy.py imports both)."""

    @property
    def state(self) -> ExchangeEvents | None: ...
    @property
    def transport(self) -> asyncio.Transport | None: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    def internal_error(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.client: UpstreamClient | None = None
        self.ex: Exchange | None = None
        self.closed = False
        self.fd = -1
        self.reader = ResponseReader()  # llhttp for this connection's responses

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream protocol gets a stream transport
        self.transport.set_write_buffer_limits(HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
            self.poller = select.poll()  # no file descriptor of its own, unlike epoll
            self.poller.register(self.fd, select.POLLIN)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def attach(self, client: UpstreamClient, ex: Exchange) -> None:
        self.client = client
        self.ex = ex

    def detach(self) -> None:
        self.client = self.ex = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        client, ex = self.client, self.ex
        self.detach()
        if client is not None and ex is not None and client.state is not None:
            client.state.upstream_lost(ex, oserror(exc))
        self.reader.release()

    def readable(self) -> bool:
        """Whether the idle connection has bytes or an EOF waiting (checked before reuse)."""
        if self.fd < 0:
            return False
        try:
            return bool(self.poller.poll(0))
        except OSError:
            return True

    def drop(self) -> None:
        self.detach()
        self.reader.release()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.state.set_upstream_full(True)  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.state.set_upstream_full(False)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        client, ex = self.client, self.ex
        if client is None or ex is None:
            self.drop()  # an idle connection must not talk
            return
        try:
            client.state.upstream_data(ex, data)  # type: ignore[union-attr]
        except Exception:  # a bug costs one exchange and a log line
            log.exception("http_proxy: internal error on an upstream connection")
            self.drop()
            client.internal_error()


def oserror(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
