"""The relay's WebSocket layer: one small ``asyncio.Protocol`` per connection, no task while idle.

Why not aiohttp (which this replaced): an idle aiohttp WebSocket costs a RequestHandler, a
request, a WebSocketResponse, a reader queue, a Task with its suspended coroutine frames and
heartbeat timers: about 15 KiB per registered client (bench/README.md, "where the bytes go").
Here an idle connection is this object (``__slots__``), the transport, and the frame parser
of the ``websockets`` library's sans-I/O :class:`~websockets.protocol.Protocol` (RFC 6455
framing, masking, control frames, close handshake, size limit: not parsed by hand). The
opening handshake is ``websockets``' :class:`~websockets.server.ServerProtocol`; once it has
answered 101, it is swapped for a bare data-phase ``Protocol``, because the handshake
parser's suspended generator would otherwise keep the request and its headers alive for the
whole connection.

What is decided here: HTTP answers that are not a WebSocket (the owner's, e.g. discovery, or
the 426 hint), RFC 6455's handshake rules (426 with ``Sec-WebSocket-Version: 13`` for another
version), reassembly of fragmented messages, UTF-8 of text messages (1007), the handshake
deadline, keepalive pings (one sweep timer for all connections, not one per connection) and
the close handshake with its deadline. What messages mean is the owner's (server.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any
from typing import Protocol as Interface

from websockets.exceptions import InvalidHeaderValue
from websockets.frames import BINARY, CONT, TEXT
from websockets.http11 import Request, Response
from websockets.protocol import OPEN, SERVER, Protocol
from websockets.server import ServerProtocol
from websockets.speedups import apply_mask

from relayd.components.relay.protocol import HARD_MAX_BYTES

# websockets logs every open and close at INFO: for a relay with many clients that is noise
# (relayd logs registrations itself); its warnings and errors still reach relayd's log.
QUIET = logging.getLogger("relayd.relay.websocket")
QUIET.setLevel(logging.WARNING)

ABNORMAL_CLOSURE = 1006  # never sent on the wire: the connection was dropped (keepalive)
PING_PAYLOAD = b"relayd"
MAX_HEAD_BYTES = 16384  # the opening handshake's request head (websockets' own limits apply too)


class Owner(Interface):
    """What a connection needs from the server that owns it (server.py's RelayServer)."""

    loop: asyncio.AbstractEventLoop
    connections: set[WsConnection]  # every open connection, handshake or not
    config: Any  # open_timeout, close_timeout
    core: Any  # count_close(code)

    def http_response(self, request: Request) -> Response:
        """The answer to a request without ``Upgrade: websocket``."""

    def opened(self, conn: WsConnection, request: Request) -> None:
        """101 was sent: set ``conn.client``."""

    def message(self, conn: WsConnection, text: str | None) -> Awaitable[None] | None:
        """A text (or, None, binary) message; an awaitable holds the next ones back until done."""

    def write(self, conn: WsConnection) -> None:
        """Write ``conn.pending`` (the owner's queued frames) now."""

    def lost(self, conn: WsConnection) -> None:
        """The connection of ``conn.client`` is gone."""

    def connection_changed(self) -> None:
        """A connection left ``connections`` (a draining owner waits on this)."""


class WsConnection(asyncio.Protocol):
    """One client connection: the handshake, then frames in, frames out."""

    __slots__ = (
        "owner", "transport", "ws", "client", "address", "head", "deadline", "timer", "idle_ticks",
        "fragments", "fragmented_text", "partial", "backlog", "busy", "pending", "pending_bytes", "sent", "received",
        "started", "close_code", "on_closed", "lost",
    )

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.transport: Any = None
        self.ws: Protocol = ServerProtocol(max_size=HARD_MAX_BYTES, logger=QUIET)
        self.client: Any = None  # protocol.Client, set by the owner once the handshake is done
        self.address = ""
        self.head: bytes | None = b""  # the request head so far; None once the handshake is over
        self.deadline: asyncio.TimerHandle | None = None  # handshake, then close deadline
        self.timer: asyncio.TimerHandle | None = None  # the owner's (registration deadline)
        self.idle_ticks = 0  # keepalive sweeps since anything arrived
        self.fragments: list[bytes] | None = None  # a fragmented message being reassembled
        self.fragmented_text = False
        self.partial: bytearray | None = None  # an incomplete frame (see _split)
        self.backlog: list[Any] | None = None  # frames waiting while the owner awaits something
        self.busy = False  # the owner is awaiting (e.g. the auth method) for this connection
        self.pending: list[bytes] | None = None  # the owner's frames for this loop iteration
        self.pending_bytes = 0
        self.sent = 0
        self.received = 0
        self.started = 0.0
        self.close_code: int | None = None
        self.on_closed: Any = None  # set by the accept gate: release this connection's slot
        self.lost = False

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        owner = self.owner
        owner.connections.add(self)
        peer = transport.get_extra_info("peername")
        self.address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        loop = owner.loop
        self.started = loop.time()
        # a connection that does not complete its handshake in time is closed (FIN, not RST)
        self.deadline = loop.call_later(owner.config.open_timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        self.idle_ticks = 0
        if self.head is not None:  # still in the opening handshake
            self._handshake(data)
            return
        partial = self.partial
        if partial is None:
            self._split(data)
        else:  # a bytearray: a frame trickling in is not copied again and again
            self.partial = None
            partial += data
            self._split(partial)

    def _split(self, data: bytes | bytearray) -> None:
        """Find frame boundaries; unmask a complete, final, masked text or binary frame here
        (the common case, where the generator-based parser costs ~4 us a frame) and give every
        other frame, whole, to websockets' parser, which so always starts at a frame boundary
        and decides everything else (control frames, fragments, RSV bits, errors)."""
        ws = self.ws
        end = len(data)
        at = 0
        while at < end:
            if end - at < 2:
                break
            b0, b1 = data[at], data[at + 1]
            n, start = b1 & 0x7F, at + 2
            if n == 126:
                if end - at < 4:
                    break
                n, start = int.from_bytes(data[at + 2:at + 4], "big"), at + 4
            elif n == 127:
                if end - at < 10:
                    break
                n, start = int.from_bytes(data[at + 2:at + 10], "big"), at + 10
            if not b1 & 0x80 or n > HARD_MAX_BYTES:
                # unmasked (1002) or too big (1009): the parser fails it from the header alone
                ws.receive_data(data[at:])
                self._process(ws.events_received())
                return
            stop = start + 4 + n
            if stop > end:
                break
            if ((b0 == 0x81 or b0 == 0x82) and self.fragments is None and not self.busy
                    and ws.state is OPEN and not self.lost):
                payload = apply_mask(data[start + 4:stop], data[start:start + 4])
                at = stop
                if not self._message(payload, b0 == 0x81):
                    break
                continue
            ws.receive_data(data[at:stop])
            at = stop
            self._process(ws.events_received())
        if at < end:
            self.partial = data if at == 0 and type(data) is bytearray else bytearray(data[at:])
        self._emit()

    def _message(self, data: bytes, text: bool) -> bool:
        """One complete message from the fast path; False when the connection must stop."""
        if self.client.closed:
            return True
        self.received += len(data)
        if text:
            try:
                message: str | None = data.decode("utf-8")
            except UnicodeDecodeError:
                self.fail(1007, "Invalid UTF-8 in a text message.")
                return False
        else:
            message = None
        waiter = self.owner.message(self, message)
        if waiter is not None:
            self.backlog = None
            self._wait(waiter)
        return True

    def eof_received(self) -> bool | None:
        if self.head is not None:  # EOF before the end of the request head
            self.head = None
            self.transport.close()
            return None
        self.ws.receive_eof()
        self._emit()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.owner.connections.discard(self)
        self.owner.connection_changed()
        try:
            if self.client is not None:
                if self.close_code is None:
                    ws = self.ws
                    self.close_code = (ws.close_rcvd or ws.close_sent or _NO_CODE).code or ABNORMAL_CLOSURE
                self.owner.lost(self)
        finally:
            if self.on_closed is not None:
                self.on_closed()
                self.on_closed = None

    # -- the opening handshake -----------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        # The handshake parser sees the request head only: given more, it would go on to parse
        # the frames behind it itself. Frames that came with the head go to the data phase.
        assert self.head is not None  # called only while the head is being read
        head = self.head + data
        end = head.find(b"\r\n\r\n")
        if end < 0 and len(head) <= MAX_HEAD_BYTES:
            self.head = head
            return
        leftover = b""
        if end >= 0:
            head, leftover = head[:end + 4], head[end + 4:]
        self.head = None
        ws = self.ws
        assert isinstance(ws, ServerProtocol)  # replaced by the data phase's parser below
        ws.receive_data(head)  # more than MAX_HEAD_BYTES: the parser answers 414/431 or drops it
        events = ws.events_received()
        if not events:
            self._emit()  # e.g. 431 for oversized headers, or EOF for a request that is not HTTP
            return
        request = events[0]
        assert isinstance(request, Request)  # the handshake parser's first event
        response = self._answer(request)
        ws.send_response(response)
        self._emit()
        if response.status_code != 101:
            return  # the answer went out, then EOF: one request per connection
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        # The data phase gets a fresh parser: see the module docstring.
        self.ws = Protocol(SERVER, state=OPEN, max_size=HARD_MAX_BYTES, logger=QUIET)
        self.owner.opened(self, request)
        if leftover and not self.lost:
            self._split(leftover)

    def _answer(self, request: Request) -> Response:
        ws = self.ws
        assert isinstance(ws, ServerProtocol)
        if not _asks_for_websocket(request):
            return self.owner.http_response(request)  # discovery, or a 426 hint for browsers
        response = ws.accept(request)  # RFC 6455 4.2.1's checks, 400/405/426/505 when they fail
        exc = ws.handshake_exc
        if isinstance(exc, InvalidHeaderValue) and exc.name == "Sec-WebSocket-Version":
            # RFC 6455 4.2.2 and 4.4: 426, with the version this server speaks
            response = ws.reject(426, "Unsupported WebSocket version: this relay speaks version 13.\n")
            response.headers["Sec-WebSocket-Version"] = "13"
        return response

    # -- frames in -------------------------------------------------------------------------------

    def _process(self, frames: list[Any]) -> None:
        """Hand complete messages to the owner in order; stop while the owner awaits."""
        if self.busy:
            if frames:
                self.backlog = (self.backlog or []) + frames
            self._emit()
            return
        owner = self.owner
        for index, frame in enumerate(frames):
            opcode = frame.opcode
            if opcode is TEXT or opcode is BINARY:
                if not frame.fin:
                    self.fragments, self.fragmented_text = [frame.data], opcode is TEXT
                    continue
                data, text = frame.data, opcode is TEXT
            elif opcode is CONT:
                if self.fragments is None:  # the parser has already failed the connection (1002)
                    continue
                self.fragments.append(frame.data)
                if not frame.fin:
                    continue
                data, text = b"".join(self.fragments), self.fragmented_text
                self.fragments = None
            else:  # CLOSE, PING, PONG: answered by the parser (pong, close echo and EOF)
                continue
            self.received += len(data)
            if self.client.closed or self.ws.state is not OPEN:
                continue  # closing: RFC 6455 1.4, data after a close is discarded
            if text:
                try:
                    message: str | None = data.decode("utf-8")
                except UnicodeDecodeError:
                    # RFC 6455 8.1: a text message that is not UTF-8 fails the connection, 1007
                    self.fail(1007, "Invalid UTF-8 in a text message.")
                    return
            else:
                message = None
            waiter = owner.message(self, message)
            if waiter is not None:
                rest = frames[index + 1:]
                self.backlog = rest or None
                self._wait(waiter)
                return
        self._emit()

    def _wait(self, waiter: Awaitable[Any]) -> None:
        """The owner must await something first: stop reading until it is done."""
        self.busy = True
        self._emit()
        if not self.lost:
            self.transport.pause_reading()
        self.owner.loop.create_task(self._resume_after(waiter))

    async def _resume_after(self, waiter: Awaitable[Any]) -> None:
        try:
            await waiter
        finally:
            self.busy = False
        backlog, self.backlog = self.backlog, None
        if backlog:
            self._process(backlog)
        if not self.busy and not self.lost:
            self._emit()
            self.transport.resume_reading()

    # -- frames out ------------------------------------------------------------------------------

    def _emit(self) -> None:
        """Write what the parser has to say (pongs, close frames), after the owner's frames."""
        writes = self.ws.data_to_send()
        if not writes:
            return
        transport = self.transport
        if self.pending:
            self.owner.write(self)
        for data in writes:
            if data:
                transport.write(data)
            else:  # end of stream: a server closes the TCP connection (RFC 6455 7.1.1)
                self._parser_closed()
                transport.close()

    def _parser_closed(self) -> None:
        """The parser ended the connection: count a close the relay sent because of a bad frame."""
        ws = self.ws
        if self.close_code is None and ws.parser_exc is not None and ws.close_sent is not None:
            self.close_code = ws.close_sent.code
            self.owner.core.count_close(self.close_code)

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): close frame, then close at once."""
        if self.close_code is None:
            self.close_code = code
            self.owner.core.count_close(code)
        self.ws.fail(code, reason)
        self._emit()

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; cut the connection off if the client does not answer
        within close_timeout (e.g. a receiver that stopped reading never takes our frame)."""
        if self.lost:
            return
        if self.pending:
            self.owner.write(self)
        self.close_code = code
        if self.ws.state is OPEN:
            self.ws.send_close(code, reason)
            self._emit()
        if not self.lost and self.deadline is None:
            self.deadline = self.owner.loop.call_later(self.owner.config.close_timeout, self.transport.abort)

    # -- keepalive -----------------------------------------------------------------------------

    def keepalive_tick(self, ping_at: int, drop_at: int) -> None:
        """Called by the owner's sweep every quarter interval: ping when quiet, drop when mute."""
        ticks = self.idle_ticks = self.idle_ticks + 1
        if ticks == ping_at and self.ws.state is OPEN:
            self.ws.send_ping(PING_PAYLOAD)
            self._emit()
        elif ticks >= drop_at and not self.lost:
            self.close_code = ABNORMAL_CLOSURE
            self.owner.core.count_close(ABNORMAL_CLOSURE)
            self.transport.abort()


class _NoCode:
    code = None


_NO_CODE = _NoCode()


def _asks_for_websocket(request: Request) -> bool:
    """An ``Upgrade: websocket`` header (a list of tokens, case-insensitive, RFC 9110 7.8)."""
    return any(token.strip().lower() == "websocket"
               for header in request.headers.get_all("Upgrade") for token in header.split(","))


__all__ = ["ABNORMAL_CLOSURE", "Request", "Response", "WsConnection"]
