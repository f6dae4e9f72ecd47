"""Reading HTTP/1.1 responses from an upstream: llhttp (through httptools) parses, as for
requests (``http1``, which has the shared reader, the heads and the rules both follow).

Sans-I/O like ``http1``: bytes in, events out. Kept apart from the request side because the
two readers share only their base: a response reader lives with its upstream connection and
is restarted per response; a request reader lives with its client connection.
"""

from __future__ import annotations

from typing import cast

import httptools

from .http1 import (  # the shared reader and rules: private to these two modules
    _KEEP_ALIVE,
    BODY,
    END,
    ERROR,
    HEAD,
    HOP_BY_HOP,
    INTERIM,
    MAX_HEAD,
    MAX_HEADERS,
    ProtocolError,
    ResponseHead,
    _Reader,
    _single_chunked,
    _StopAfterHead,
)


class ResponseReader(_Reader):
    """The responses of one upstream connection, one per ``start`` (1xx interim ones before it).

    llhttp's state carries over to the next response only when the last one ended cleanly at
    its framing; otherwise (an error, a HEAD response, a body moved by splice, bytes after
    the end) ``start`` begins with a new parser, so nothing of one response can leak into the
    next. ``extra`` turns true when bytes follow the end of the response: the connection must
    then not be reused.
    """

    what = "response"

    def __init__(self) -> None:
        super().__init__()
        self.parser = None  # an httptools.HttpResponseParser once a request was sent
        self.head_request = False
        self.upgrade_requested = False
        self.reason = b""
        self.complete = True
        self.extra = False
        self.interim = False
        self.head: ResponseHead | None = None
        self.body_received = 0
        # Whether the response began with "HTTP/1.1 " at the start of the first bytes fed after
        # start(), when the parser stood between messages (see on_headers_complete).
        self.fresh = False
        self.hint = False
        self.version11 = False

    def start(self, head_request: bool, upgrade_requested: bool) -> ResponseReader:
        """Get ready for the response to the request just sent."""
        if self.parser is None or self.failed or self.extra or not self.complete:
            self.parser = httptools.HttpResponseParser(self)
            self.failed = False
        self.head_request = head_request
        self.upgrade_requested = upgrade_requested
        self.reason = b""
        self.complete = False
        self.interim = False
        self.head = None
        self.body_received = 0
        self.stalled = 0
        self.fresh = True
        return self

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        if self.complete:
            self.extra = True
            return []
        self.hint = self.fresh and data.startswith(b"HTTP/1.1 ")
        self.fresh = False
        events = self._run(self.parser, data, 502)
        # cast: mypy keeps self.complete narrowed to False (the test above) across _run, which
        # sets it, and mypyc would compile the branch as unreachable code.
        if cast(bool, self.complete) and self.failed and events and events[-1][0] == ERROR:
            events.pop()  # junk after a complete response: not an error of this exchange
            self.extra = True
        return events

    @property
    def remaining(self) -> int:
        """Body bytes of a Content-Length response not yet received."""
        head = self.head
        if head is None or head.length is None:
            return 0
        return head.length - self.body_received

    # -- llhttp callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True
        self.version11 = self.hint  # only the first message begun in the first segment can use it
        self.hint = False
        self.in_head = True  # _begin, inlined: once per response
        self.head_bound = self.feed_size
        self.trailer_size = 0
        self.headers = []
        self.reason = b""

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self.headers.append((name.lower(), name, value.rstrip(b" \t")))
        else:
            self._trailer(name, value, 502)

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.head_bound > MAX_HEAD or len(self.headers) > MAX_HEADERS:
            self._check_head(len(self.reason), 502)
        parser = self.parser
        status = parser.get_status_code()
        # The version is read off the bytes when the message began at the start of a segment fed
        # to a parser between messages (llhttp starts the message right there): get_http_version()
        # formats a string (~1 us).
        if not self.version11 and parser.get_http_version() not in ("1.1", "1.0"):
            raise ProtocolError("upstream answered with an unsupported HTTP version", 502)
        if not 100 <= status <= 599:  # llhttp reads any three digits (RFC 9110 section 15)
            raise ProtocolError(f"upstream answered with status {status:03d}", 502)
        headers = self.headers
        head = ResponseHead(status, self.reason, headers)
        # One pass over the fields: the framing ones are read, the end-to-end ones kept as lines.
        lines = head.end_to_end
        encodings: list[bytes] = []
        connection: list[bytes] = []
        for lname, name, value in headers:
            if lname not in HOP_BY_HOP:
                lines.append(name + b": " + value)
            elif lname == b"content-length":
                head.length = int(value)  # llhttp accepted digits only, and only once
            elif lname == b"transfer-encoding":
                encodings.append(value)
            elif lname == b"connection":
                connection.append(value)
        if connection and not _KEEP_ALIVE.issuperset(connection):
            listed = {t.strip(b" \t").lower() for value in connection for t in value.split(b",")} - HOP_BY_HOP
            if listed:  # fields the upstream declared hop-by-hop are not forwarded either
                head.end_to_end = [name + b": " + value for lname, name, value in headers
                                   if lname not in HOP_BY_HOP and lname not in listed]
        if 100 <= status < 200 and status != 101:
            head.length = None
            self.interim = True
            self.events.append((INTERIM, head))
            return
        if status == 101 and not self.upgrade_requested:
            raise ProtocolError("upstream switched protocols without being asked", 502)
        no_body = self.head_request or status in (101, 204, 304)
        if encodings and not no_body:
            if not _single_chunked(encodings):
                raise ProtocolError("upstream used a Transfer-Encoding other than 'chunked'", 502)
            head.chunked = True
            head.length = None
        head.keep_alive = parser.should_keep_alive()
        self.head = head
        self.events.append((HEAD, head))
        if self.head_request:
            self.complete = True
            head.keep_alive = False  # where a HEAD response ends cannot be checked: not reused
            self.events.append((END, None))
            raise _StopAfterHead

    def on_body(self, body: bytes) -> None:
        self.body_received += len(body)
        self.events.append((BODY, body))

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self.events.append((END, None))
