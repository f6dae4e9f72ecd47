"""The event-loop pump: two asyncio transports joined by ``BufferedProtocol``s.

The event loop receives straight into a 1 MiB buffer of ours and we hand a view of it to the
peer transport's ``write``, so a chunk is not copied on its way through (a new buffer is taken
only while the peer still queues part of the previous one). Backpressure: when the peer's write
buffer passes ``buffer_size`` it calls ``pause_writing`` and we stop reading from this side
until ``resume_writing``, so a slow reader never makes memory grow. The rate gate pauses
reading the same way, for as long as its token bucket is in debt.

Works for any stream transport, TLS included (TLS cannot half-close: an EOF closes after the
queued bytes are flushed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from relayd.pump.gate import TokenBucket

# Reasons a side is not reading; it reads again only when none is left.
BACKPRESSURE, RATE, LINKING = 1, 2, 4
READ_SIZE = 1024 * 1024

Gates = tuple[TokenBucket | None, TokenBucket | None]
Count = Callable[[bool, int], None]  # (forward, nbytes): forward is first -> second


class PumpSide(asyncio.BufferedProtocol):
    """One connection of a pump; what it reads is written to `peer`."""

    def __init__(self, pump: ProtocolPump, forward: bool) -> None:
        self.pump = pump
        self.forward = forward  # True: the first connection (reads first, writes second)
        self.bucket = pump.gates[0 if forward else 1]
        self.peer: PumpSide | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = 0
        self.eof = False
        self.closed = False
        self.early: list[bytes] = []
        self.view: memoryview | None = None  # allocated at the first read: idle sides cost nothing

    # -- flow control ------------------------------------------------------------------------

    def pause(self, reason: int) -> None:
        # Asks the transport whether it reads rather than trusting `paused`: uvloop starts
        # reading after connection_made() returns even if connection_made paused it.
        transport = self.transport
        if transport is not None and not self.closed and transport.is_reading():
            transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        was = self.paused
        self.paused &= ~reason
        if was and not self.paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause(BACKPRESSURE)

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume(BACKPRESSURE)

    # -- protocol callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream server's or create_connection's transport: an asyncio.Transport (uvloop's too,
        # though its classes do not say so to isinstance)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self.pump.buffer_size)
        if self.forward:  # the first side: do not read until the second is linked
            self.pause(LINKING)
            self.pump.first_made()
            # uvloop resumes reading right after connection_made: pause again once it has
            self.pump.loop.call_soon(self._repause)

    def _repause(self) -> None:
        if self.paused and self.transport is not None and not self.closed and self.transport.is_reading():
            self.transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        peer = self.peer
        if self.view is None or (peer is not None and peer.transport is not None
                                 and peer.transport.get_write_buffer_size()):
            # the peer's transport may still hold a view of the old buffer: never overwrite it
            self.view = memoryview(bytearray(READ_SIZE))
        return self.view

    def buffer_updated(self, n: int) -> None:
        view = self.view
        assert view is not None  # get_buffer() came first
        self.data_received(view[:n])

    def data_received(self, data: memoryview | bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:  # only if the transport reads despite the pause
            self.early.append(bytes(data))
            return
        n = len(data)
        peer.transport.write(data)
        self.pump.count(self.forward, n)
        if self.bucket is not None:
            loop = self.pump.loop
            delay = self.bucket.consume(n, loop.time())
            if delay > 0:
                self.pause(RATE)
                loop.call_later(delay, self.resume, RATE)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None:
            return True  # first side, second not linked yet: link() forwards it
        return self.pump.forward_eof(self, peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pump.side_lost(self)


def _no_count(forward: bool, n: int) -> None:
    pass


class ProtocolPump:
    """Joins a first connection (typically accepted: use `first` as its protocol) to a second
    (typically dialled once the first exists: ``second_side()`` is its protocol, then ``link``).

    `on_first` runs when the first connection is made (start dialling there); `on_closed` once,
    when neither connection is open any more (or the second was never linked).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, buffer_size: int, gates: Gates = (None, None),
                 count: Count | None = None, on_first: Callable[[], None] | None = None,
                 on_closed: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.buffer_size = buffer_size
        self.gates = gates
        self.count = count or _no_count
        self.on_first = on_first
        self.on_closed = on_closed
        self.first = PumpSide(self, forward=True)
        self.second: PumpSide | None = None
        self.done = False

    def first_made(self) -> None:
        if self.on_first is not None:
            self.on_first()

    def second_side(self) -> PumpSide:
        side = PumpSide(self, forward=False)
        side.peer = self.first  # the second may send before create_connection returns
        return side

    def link(self, second: PumpSide) -> None:
        """`second` is connected: forward what the first sent meanwhile, then let it read."""
        self.second = second
        first = self.first
        first.peer = second
        if first.closed:
            if second.transport is not None:
                second.transport.close()
            return
        for data in first.early:
            first.data_received(data)
        first.early.clear()
        if first.eof:
            self.forward_eof(first, second)
        first.resume(LINKING)

    def forward_eof(self, side: PumpSide, peer: PumpSide) -> bool:
        """`side` read EOF: half-close towards its peer; True keeps side's transport open."""
        pt = peer.transport
        assert pt is not None
        if pt.is_closing():
            return False
        if peer.eof:  # both directions done
            pt.close()
            return False
        if pt.can_write_eof():
            pt.write_eof()
            return side.transport is not None and side.transport.can_write_eof()
        pt.close()  # TLS cannot half-close: close after flushing what is queued
        return False

    def side_lost(self, side: PumpSide) -> None:
        other = self.second if side is self.first else self.first
        if other is not None and other.transport is not None and not other.closed:
            other.transport.close()  # flushes what is queued, then closes
        if other is None or other.closed or other.transport is None:
            self._closed()

    def _closed(self) -> None:
        if not self.done:
            self.done = True
            if self.on_closed is not None:
                self.on_closed()

    def abort(self) -> None:
        """Drop both connections now (queued bytes are discarded)."""
        for side in (self.first, self.second):
            if side is not None and side.transport is not None and not side.closed:
                side.transport.abort()
        if self.second is None or self.second.transport is None:
            self._closed()
