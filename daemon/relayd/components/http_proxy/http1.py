"""Reading HTTP/1.1 messages: llhttp (Node.js's parser, through httptools) does the parsing.

Sans-I/O: a reader takes bytes and returns events; it never touches a socket. llhttp runs in
its strict mode (every lenient flag off): it refuses obs-fold, bare CR or LF, invalid tokens,
invalid or duplicate Content-Length, Content-Length with Transfer-Encoding, malformed chunk
sizes and extensions. On top of it these readers enforce what llhttp leaves to its user:
head size and header count limits however the bytes arrive, the HTTP versions we speak,
exactly one valid ``Host`` (RFC 9112 section 3.2), ``Transfer-Encoding`` that is exactly
``chunked`` (other codings would reach the upstream undecoded), and a ``Connection`` header
that may not declare framing, ``Host`` or identity headers hop-by-hop.

Bodies come out decoded (chunk payloads without their framing): the proxy frames every
message it forwards itself, from what was parsed, never from the headers it received.
"""

from __future__ import annotations

import re
from typing import Any

import httptools

MAX_HEAD = 32 * 1024
MAX_HEADERS = 100

# Event kinds returned by ``feed``.
HEAD, INTERIM, BODY, END, UPGRADE, ERROR = range(6)

# RFC 9110 section 7.6.1 plus the legacy proxy names; never forwarded in either direction.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"content-length",
})
# The request fields the reader looks at (the others are only forwarded).
_REQUEST_FIELDS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection",
                             b"authorization", b"cookie", b"upgrade", b"proxy-connection"})
# Connection values that list only hop-by-hop fields (what most upstreams send): nothing more to drop.
_KEEP_ALIVE = frozenset({b"keep-alive", b"Keep-Alive"})
# A Connection header naming one of these is an attack on the framing or on routing.
_NEVER_HOP_BY_HOP = frozenset({b"content-length", b"transfer-encoding", b"host"})
# uri-host [ ":" port ] (RFC 3986 section 3.2.2): IP-literal, or reg-name/IPv4 without "%".
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=]*)(?::[0-9]{1,5})?\Z")


_VALID_HOSTS: set[bytes] = set()  # Host values that matched _HOST (clients send few distinct ones)


def valid_host(value: bytes) -> bool:
    if value in _VALID_HOSTS:
        return True
    if _HOST.match(value) is None:
        return False
    if len(_VALID_HOSTS) >= 1024:  # Host is the client's to choose: keep the cache bounded
        _VALID_HOSTS.clear()
    _VALID_HOSTS.add(value)
    return True


class ProtocolError(Exception):
    """A message that must not be forwarded; ``status`` is the answer (502 for responses)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.method = b""  # of the request, when the head was read far enough to know it


class _StopAfterHead(Exception):
    """Raised inside llhttp's callback to end a HEAD response at its head."""


class RequestHead:
    __slots__ = (
        "authorization",
        "chunked",
        "connection",
        "cookie",
        "headers",
        "host",
        "http10",
        "keep_alive",
        "length",
        "method",
        "target",
        "upgrade",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.http10 = False
        self.headers: list[tuple[bytes, bytes, bytes]] = []  # (lower-case name, name, value)
        self.host: bytes | None = None
        self.authorization: bytes | None = None
        self.cookie: bytes | None = None
        self.connection: frozenset[bytes] = frozenset()  # lower-case tokens
        self.upgrade: bytes | None = None
        self.length: int | None = None  # Content-Length; None when absent or chunked
        self.chunked = False
        self.keep_alive = True

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)


class ResponseHead:
    __slots__ = ("chunked", "end_to_end", "headers", "keep_alive", "length", "reason", "status")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes, bytes]]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        # The "Name: value" lines to forward: neither hop-by-hop nor listed in Connection.
        self.end_to_end: list[bytes] = []
        self.length: int | None = None  # None: chunked, until close, or no body
        self.chunked = False
        self.keep_alive = True


def _tokens(values: list[bytes]) -> frozenset[bytes]:
    out = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip(b" \t").lower()
            if token:
                out.add(token)
    return frozenset(out)


def _single_chunked(values: list[bytes]) -> bool:
    return len(values) == 1 and values[0].strip(b" \t").lower() == b"chunked"


class _Reader:
    """What the request and response readers share: head accounting and error capture."""

    def __init__(self) -> None:
        self.events: list[tuple[int, object]] = []
        self.in_head = False
        # Bytes fed since (and including) the segment in which the current head began: an upper
        # bound of the head's size, so small heads are never measured one header at a time.
        self.head_bound = 0
        self.feed_size = 0
        self.headers: list[tuple[bytes, bytes, bytes]] = []
        self.trailer_size = 0
        self.stalled = 0  # bytes fed since the last event: an incomplete head or trailer section
        self.failed = False
        self.parser: Any = None  # the httptools parser of the subclass; None once released

    def _trailer(self, name: bytes, value: bytes, status: int) -> None:
        # A trailer field of a chunked body: counted, never forwarded.
        self.trailer_size += len(name) + len(value) + 4
        if self.trailer_size > MAX_HEAD:
            raise ProtocolError(f"trailer section larger than {MAX_HEAD} bytes", status)

    def _check_head(self, start_line: int, status: int) -> None:
        """Head limits, however the bytes arrived (one segment, or many: see ``stalled``). The
        callers check first whether either limit can have been passed (the common case: no)."""
        headers = self.headers
        if len(headers) > MAX_HEADERS:
            raise ProtocolError(f"more than {MAX_HEADERS} header fields", status)
        if self.head_bound > MAX_HEAD:  # a large segment or many: measure exactly
            size = start_line + sum(len(name) + len(value) + 4 for _, name, value in headers)
            if size > MAX_HEAD:
                raise ProtocolError(f"head larger than {MAX_HEAD} bytes", status)

    def release(self) -> None:
        """Break the parser <-> reader reference cycle (no garbage for the collector)."""
        self.parser = None

    def _run(self, parser: Any, data: bytes, status: int) -> list[tuple[int, object]]:
        events = self.events = []
        if self.failed:
            return events
        self.feed_size = len(data)
        if self.in_head:
            self.head_bound += self.feed_size
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            events.append((UPGRADE, data[exc.args[0]:]))
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _StopAfterHead):
                self.failed = True  # nothing after a HEAD response's head is read
                return events
            if not isinstance(cause, ProtocolError):
                raise
            self._error(cause)
        except httptools.HttpParserError as exc:
            error = ProtocolError(f"malformed {self.what}: {exc}", status)
            error.method = self._method()
            self._error(error)
        if not self.failed:
            if events:
                self.stalled = 0
            else:
                self.stalled += len(data)
                if self.stalled > MAX_HEAD:
                    kind = "head" if self.in_head else "chunk or trailer section"
                    self._error(ProtocolError(f"{kind} larger than {MAX_HEAD} bytes",
                                              431 if status == 400 else status))
        return events

    what = "message"

    def _method(self) -> bytes:
        return b""

    def _error(self, error: ProtocolError) -> None:
        self.failed = True
        self.events.append((ERROR, error))


class RequestReader(_Reader):
    """Requests of one client connection, pipelined or not, in order.

    ``protected`` are lower-case header names a ``Connection`` header may not list (the
    identity headers the proxy sets).
    """

    what = "request"

    def __init__(self, protected: frozenset[bytes] = frozenset()) -> None:
        super().__init__()
        self.protected = _NEVER_HOP_BY_HOP | protected
        self.parser = httptools.HttpRequestParser(self)
        self.target = b""

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        return self._run(self.parser, data, 400)

    def _method(self) -> bytes:
        # Known once the target began (it follows the method); an answer to HEAD has no body.
        return self.parser.get_method() if self.target else b""

    # -- llhttp callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True  # _begin, inlined: once per request
        self.head_bound = self.feed_size
        self.trailer_size = 0
        self.headers = []
        self.target = b""

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self.headers.append((name.lower(), name, value.rstrip(b" \t")))
        else:
            self._trailer(name, value, 431)

    def on_headers_complete(self) -> None:
        self.in_head = False
        if len(self.target) > MAX_HEAD:
            raise ProtocolError(f"request target longer than {MAX_HEAD} bytes", 414)
        try:
            if self.head_bound > MAX_HEAD or len(self.headers) > MAX_HEADERS:
                self._check_head(len(self.target), 431)
            head = self._head()
        except ProtocolError as exc:
            exc.method = self._method()
            raise
        self.events.append((HEAD, head))

    def on_body(self, body: bytes) -> None:
        self.events.append((BODY, body))

    def on_message_complete(self) -> None:
        self.events.append((END, None))

    def _head(self) -> RequestHead:
        parser = self.parser
        head = RequestHead()
        hosts = 0
        connection: list[bytes] = []
        encodings: list[bytes] = []
        proxy_connection = False
        for lname, _, value in self.headers:
            if lname not in _REQUEST_FIELDS:
                continue
            if lname == b"host":
                hosts += 1
                head.host = value
            elif lname == b"content-length":
                head.length = int(value)  # llhttp accepted digits only, and only once
            elif lname == b"transfer-encoding":
                encodings.append(value)
            elif lname == b"connection":
                connection.append(value)
            elif lname == b"authorization":
                head.authorization = value
            elif lname == b"cookie":
                head.cookie = value if head.cookie is None else head.cookie + b"; " + value
            elif lname == b"upgrade":
                head.upgrade = value
            elif lname == b"proxy-connection":
                proxy_connection = True
        keep_alive = parser.should_keep_alive()
        # llhttp accepts HTTP/0.9, 1.0, 1.1 and 2.0 only, and of these only 1.1 keeps the connection
        # without a "keep-alive" in Connection (or Proxy-Connection, which llhttp reads alike): then
        # the version is known without get_http_version(), which formats a string (~1 us).
        version = "1.1" if keep_alive and not connection and not proxy_connection else parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise ProtocolError(f"HTTP/{version} is not supported", 505)
        head.method = parser.get_method()
        if head.method == b"CONNECT":
            raise ProtocolError("CONNECT is not supported", 405)
        head.target = self.target
        head.http10 = version == "1.0"
        head.headers = self.headers
        if hosts > 1 or (hosts == 0 and not head.http10):
            raise ProtocolError("exactly one Host header is required")
        if head.host is not None and not valid_host(head.host):
            raise ProtocolError("invalid Host header")
        if encodings:
            if not _single_chunked(encodings):
                raise ProtocolError("Transfer-Encoding other than 'chunked' is not supported", 501)
            head.chunked = True
            head.length = None
        if connection:
            head.connection = tokens = _tokens(connection)
            listed = tokens & self.protected
            if listed:
                raise ProtocolError(f"Connection may not list {b', '.join(sorted(listed)).decode()}")
        head.keep_alive = keep_alive
        if parser.should_upgrade():
            if head.has_body or head.upgrade is None:
                raise ProtocolError("an Upgrade request may not have a body")
        else:
            head.upgrade = None
        return head

