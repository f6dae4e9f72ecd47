"""A recording HTTP/1.1 upstream for proxy tests, parsed by h11 (a strict, independent parser).

Every request that arrives complete is recorded (connection serial, method, target, headers
in order with their names as sent, body bytes) and answered with a JSON body carrying the
request's serial number and the value of its ``X-Request-Id`` header, with Content-Length.
What h11 refuses is recorded as a :class:`Broken` entry and the connection is closed: kind
``"invalid"`` when the bytes themselves are not HTTP/1.1, ``"incomplete"`` when the peer
closed the connection in the middle of a message (a proxy aborting a request it gave up on).

Scripted responses for response-side tests: ``script(marker, raw, close=...)`` makes the
recorder answer a request whose target contains ``marker`` with the given raw bytes instead
of a proper response (the request is still recorded first), then close the connection, or
keep it and go on reading requests on it as if the raw bytes had been a valid response.

Synchronisation is by condition variables with deadlines (:meth:`wait_for`), never sleeps.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import h11

MAX_EVENT = 1 << 20  # h11's head limit (default 16 KiB) must not refuse a proxy's 32 KiB heads


@dataclass
class Recorded:
    """One complete request as h11 parsed it."""

    serial: int  # 1-based, over all connections, in order of completion
    conn: int  # upstream connection serial (1-based, in order of accept)
    index: int  # 0-based position of the request on its connection
    method: str
    target: str
    http_version: str
    headers: list[tuple[str, str]]  # (name as sent, value), in order; latin-1 decoded
    body: bytes
    scripted: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)  # of a chunked body

    def values(self, name: str) -> list[str]:
        """All values of a header (case-insensitive name)."""
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def has(self, name: str) -> bool:
        return bool(self.values(name))

    @property
    def request_id(self) -> str | None:
        ids = self.values("x-request-id")
        return ids[0] if ids else None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class Broken:
    """A connection whose bytes h11 refused (``invalid``) or that ended mid-message (``incomplete``)."""

    conn: int
    kind: str
    error: str
    data: bytes  # the last bytes this connection received (up to 4 KiB)


@dataclass
class Script:
    chunks: list[bytes]  # written with one sendall each
    close: bool
    hits: int = 0


@dataclass
class _Conn:
    serial: int
    sock: socket.socket
    received: bytearray = field(default_factory=bytearray)


class Recorder:
    """A raw TCP server on 127.0.0.1 recording what arrives; one thread per connection."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(256)
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.cond = threading.Condition()
        self.requests: list[Recorded] = []
        self.broken: list[Broken] = []
        self.scripts: dict[str, Script] = {}
        self.raw = bytearray()  # every byte received on any connection since the last clear()
        self.connections = 0  # accepted so far (never reset)
        self.serial = 0
        self.conns: dict[int, _Conn] = {}
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, name="recorder-accept", daemon=True)
        self.thread.start()

    # -- public API --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def clear(self) -> None:
        """Forget records, broken entries, raw bytes and scripts (connections stay open)."""
        with self.cond:
            self.requests.clear()
            self.broken.clear()
            self.scripts.clear()
            self.raw.clear()

    def script(self, marker: str, raw: bytes | Sequence[bytes], close: bool = True) -> None:
        """Answer requests whose target contains ``marker`` with ``raw`` (one sendall per item)."""
        chunks = [raw] if isinstance(raw, (bytes, bytearray)) else list(raw)
        with self.cond:
            self.scripts[marker] = Script([bytes(c) for c in chunks], close)

    def hits(self, marker: str) -> int:
        with self.cond:
            script = self.scripts.get(marker)
            return script.hits if script else 0

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait (condition variable, deadline) until ``predicate()`` holds under the lock."""
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def wait_requests(self, n: int, timeout: float = 10.0) -> list[Recorded]:
        """The recorded requests once there are at least ``n``; AssertionError after ``timeout``."""
        if not self.wait_for(lambda: len(self.requests) >= n, timeout):
            with self.cond:
                raise AssertionError(f"recorder saw {len(self.requests)} requests, expected {n}: "
                                     f"{self.requests!r}; broken: {self.broken!r}")
        return self.snapshot()

    def wait_request_id(self, request_id: str, timeout: float = 10.0) -> Recorded:
        def seen() -> bool:
            return any(r.request_id == request_id for r in self.requests)

        if not self.wait_for(seen, timeout):
            raise AssertionError(f"request {request_id!r} never reached the recorder: {self.snapshot()!r}")
        return next(r for r in self.snapshot() if r.request_id == request_id)

    def snapshot(self) -> list[Recorded]:
        with self.cond:
            return list(self.requests)

    def broken_snapshot(self) -> list[Broken]:
        with self.cond:
            return list(self.broken)

    def raw_bytes(self) -> bytes:
        with self.cond:
            return bytes(self.raw)

    def stop(self) -> None:
        self.stopped = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.cond:
            conns = list(self.conns.values())
        for conn in conns:
            _close(conn.sock)
        self.thread.join(5)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving -----------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self.stopped:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.cond:
                self.connections += 1
                conn = _Conn(self.connections, sock)
                self.conns[conn.serial] = conn
            threading.Thread(target=self._serve, args=(conn,), name=f"recorder-{conn.serial}",
                             daemon=True).start()

    def _recv(self, conn: _Conn) -> bytes:
        try:
            data = conn.sock.recv(1 << 16)
        except OSError:
            data = b""
        if data:
            with self.cond:
                conn.received += data
                if len(conn.received) > 1 << 16:
                    del conn.received[:-8192]
                self.raw += data
        return data

    def _serve(self, conn: _Conn) -> None:
        try:
            self._serve_loop(conn)
        finally:
            _close(conn.sock)
            with self.cond:
                self.conns.pop(conn.serial, None)
                self.cond.notify_all()

    def _serve_loop(self, conn: _Conn) -> None:
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_EVENT)
        eof = False
        index = 0
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                with self.cond:
                    self.broken.append(Broken(conn.serial, "incomplete" if eof else "invalid", str(exc),
                                              bytes(conn.received[-4096:])))
                    self.cond.notify_all()
                if not eof:  # tell the peer, as a server would; it is not recorded as a response
                    _send(conn.sock, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            if event is h11.NEED_DATA:
                if eof:
                    return
                if h.they_are_waiting_for_100_continue:
                    _send(conn.sock, h.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
                data = self._recv(conn)
                if not data:
                    eof = True
                h.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.Request):
                request, body = event, bytearray()
                continue
            if isinstance(event, h11.Data):
                body += event.data
                continue
            if not isinstance(event, h11.EndOfMessage):
                continue
            assert request is not None
            trailers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items()]
            target = request.target.decode("latin-1")
            with self.cond:
                script = next((s for m, s in self.scripts.items() if m in target), None)
                if script is not None:
                    script.hits += 1
                self.serial += 1
                rec = Recorded(
                    serial=self.serial, conn=conn.serial, index=index,
                    method=request.method.decode("latin-1"), target=target,
                    http_version=request.http_version.decode("latin-1"),
                    headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers.raw_items()],
                    body=bytes(body), scripted=script is not None, trailers=trailers)
                self.requests.append(rec)
                self.cond.notify_all()
            index += 1
            if script is not None:
                for chunk in script.chunks:
                    if chunk and not _send(conn.sock, chunk):
                        return
                if script.close:
                    return
                # Go on as if the raw bytes had answered the request: a fresh h11 state that
                # keeps what was already received after this request.
                trailing, closed = h.trailing_data
                h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_EVENT)
                h.receive_data(bytes(trailing))
                if closed:
                    h.receive_data(b"")
                continue
            if not self._respond(conn, h, rec):
                return
            if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                return
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                return

    def _respond(self, conn: _Conn, h: h11.Connection, rec: Recorded) -> bool:
        answer: dict[str, object] = {"serial": rec.serial, "request_id": rec.request_id, "method": rec.method,
                                     "target": rec.target, "conn": conn.serial, "length": len(rec.body)}
        pad = _query_int(rec.target, "pad")
        if pad:
            answer["pad"] = "p" * pad
        payload = json.dumps(answer).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        if rec.request_id is not None:
            headers.append(("X-Request-Id", rec.request_id))
        try:
            out = h.send(h11.Response(status_code=200, reason=b"OK", headers=headers))
            if rec.method != "HEAD":
                out += h.send(h11.Data(data=payload))
            out += h.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return False
        return _send(conn.sock, out)


def _query_int(target: str, name: str) -> int:
    query = target.partition("?")[2]
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if key == name and value.isdigit():
            return int(value)
    return 0


def _send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# -- the client side: a raw socket whose responses h11 parses --------------------------------

class Cut(Exception):
    """The connection ended (EOF or reset) in the middle of a response."""

    def __init__(self, message: str, partial: bytes) -> None:
        super().__init__(message)
        self.partial = partial


class Garbage(AssertionError):
    """What came back is not valid HTTP/1.1 (an assertion failure: a proxy must never send it)."""


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]  # lower-case names
    body: bytes
    interim: list[int] = field(default_factory=list)  # 1xx statuses before it
    raw: bytes = b""

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None

    def json(self) -> object:
        return json.loads(self.body)

    @property
    def request_id(self) -> str | None:
        """The request id a recorder answer carries (in its JSON body), else its header."""
        try:
            data = json.loads(self.body)
        except ValueError:
            return self.header("x-request-id")
        return data.get("request_id") if isinstance(data, dict) else None


class RawClient:
    """A client connection that sends raw bytes and reads responses with h11.

    h11 is told which request each response answers (its method and version) through a fake
    request of its own; the bytes really sent are whatever the test wrote.
    """

    def __init__(self, port: int, timeout: float = 5.0, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_EVENT)
        self.received = bytearray()  # everything read from the socket
        self.eof = False
        self.send_error: OSError | None = None

    def close(self) -> None:
        _close(self.sock)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes, segment: int | None = None) -> bool:
        """Send ``data`` (in ``segment``-byte writes if given); False if the peer reset/closed."""
        try:
            if segment is None:
                self.sock.sendall(data)
            else:
                view = memoryview(data)
                for start in range(0, len(data), segment):
                    self.sock.sendall(view[start:start + segment])
            return True
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.send_error = exc  # the proxy answered and closed early: read what it sent
            return False

    def send_segments(self, pieces: Sequence[bytes]) -> bool:
        for piece in pieces:  # noqa: SIM110 - stop at the first refused send, in order
            if piece and not self.send(piece):
                return False
        return True

    def _read(self) -> bytes:
        if self.eof:
            return b""
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
        self.received += data
        return data

    def response(self, method: str = "GET", http10: bool = False) -> Response | None:
        """The next response (1xx collected), None if the connection closed before any byte of it.

        Raises :class:`Cut` when the connection ends mid-response, :class:`Garbage` when the
        bytes are not HTTP/1.1, socket.timeout when nothing comes in time.
        """
        h = self.h
        if h.our_state is h11.MUST_CLOSE or h.their_state in (h11.MUST_CLOSE, h11.CLOSED):
            return self._expect_closed_here()
        # h11 only writes HTTP/1.1: an HTTP/1.0 request is told as one that closes after its answer.
        h.send(h11.Request(method=method, target="/",
                           headers=[("Host", "x"), ("Connection", "close")] if http10 else [("Host", "x")]))
        h.send(h11.EndOfMessage())
        start = len(self.received) - len(h.trailing_data[0])
        status = 0
        headers: list[tuple[str, str]] = []
        body = bytearray()
        interim: list[int] = []
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                partial = bytes(self.received[start:])
                if self.eof:
                    if not partial:
                        return None
                    raise Cut(f"connection ended mid-response: {exc}", partial) from None
                raise Garbage(f"invalid HTTP from the proxy ({exc}): {partial[:2000]!r}") from None
            if event is h11.NEED_DATA:
                self.h.receive_data(self._read())
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.InformationalResponse):
                interim.append(event.status_code)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in event.headers.raw_items()]
                continue
            if isinstance(event, h11.Data):
                body += event.data
                continue
            if isinstance(event, h11.EndOfMessage):
                raw = bytes(self.received[start:len(self.received) - len(h.trailing_data[0])])
                if h.our_state is h11.DONE and h.their_state is h11.DONE:
                    h.start_next_cycle()
                return Response(status, headers, bytes(body), interim, raw)

    def _expect_closed_here(self) -> None:
        extra = self.rest()
        if extra:
            raise Garbage(f"bytes after a response that closes the connection: {extra[:2000]!r}")
        return None

    def rest(self) -> bytes:
        """Whatever arrives until EOF (bytes h11 holds beyond the last response included)."""
        data = bytes(self.h.trailing_data[0])
        while not self.eof:
            data += self._read()
        return data

    def closed(self) -> bool:
        """True if the proxy closes the connection with nothing more to say (within the timeout)."""
        try:
            return self.rest() == b""
        except TimeoutError:
            return False
