"""Sans-I/O HTTP/1.1 pieces for the proxy: head parsing and body framing.

Everything works on bytes and never decodes a body. Bodies are not reassembled: a framer
only finds where a message ends, so the proxy forwards the bytes it was given as they are
(chunked bodies stay chunked). Parsing is strict where leniency enables request smuggling:
obsolete line folding, bare CR/LF in heads, invalid header names, Content-Length together
with Transfer-Encoding, and conflicting Content-Length values are all refused.
"""

from __future__ import annotations

import re

MAX_HEAD = 32 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_METHOD = re.compile(rb"[A-Z]+\Z")

# RFC 9110 section 7.6.1 plus the legacy proxy names; stripped in both directions.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})


class ProtocolError(Exception):
    """A malformed message; ``status`` is what to answer a client with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def split_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes, bytes]]]:
    """(start line, [(lower name, value, raw line)]) of a head without its final CRLFCRLF."""
    lines = head.split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            # Covers obs-fold (leading whitespace), empty names and spaces before the colon.
            raise ProtocolError("malformed header line")
        if b"\n" in line or b"\r" in line or b"\0" in line:
            raise ProtocolError("bare CR, LF or NUL in a header")
        headers.append((name.lower(), value.strip(b" \t"), line))
    return lines[0], headers


def parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3 or not _METHOD.match(parts[0]) or not parts[1]:
        raise ProtocolError("malformed request line")
    version = parts[2]
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ProtocolError("unsupported HTTP version", 505)
    if b"\n" in line or b"\r" in line:
        raise ProtocolError("bare CR or LF in the request line")
    return parts[0], parts[1], version


def parse_status_line(line: bytes) -> int:
    # "HTTP/1.1 200 OK"; the reason phrase may be empty or absent.
    if not line.startswith(b"HTTP/1."):
        raise ProtocolError("malformed status line", 502)
    try:
        status = int(line[9:12])
    except ValueError:
        raise ProtocolError("malformed status line", 502) from None
    if not 100 <= status <= 599:
        raise ProtocolError("malformed status line", 502)
    return status


def body_length(headers: list[tuple[bytes, bytes, bytes]]) -> int | None:
    """Content-Length, -1 for chunked, None when neither is present (RFC 9112 section 6)."""
    length: int | None = None
    chunked = False
    for name, value, _ in headers:
        if name == b"content-length":
            if not value.isdigit():
                raise ProtocolError("invalid Content-Length")
            n = int(value)
            if length is not None and length != n:
                raise ProtocolError("conflicting Content-Length headers")
            length = n
        elif name == b"transfer-encoding":
            codings = [c.strip().lower() for c in value.split(b",")]
            if codings[-1] != b"chunked" or chunked:
                raise ProtocolError("unsupported Transfer-Encoding", 501)
            chunked = True
    if chunked:
        if length is not None:
            raise ProtocolError("both Content-Length and Transfer-Encoding")
        return -1
    return length


class Framer:
    """Finds the end of one body in a byte stream: fixed length, chunked, or until close.

    ``feed(data)`` returns how many bytes of ``data`` belong to the body; ``done`` turns
    true when the body is complete (bytes after that belong to the next message).
    """

    __slots__ = ("remaining", "chunked", "until_close", "done", "_state", "_line", "_trailer_line", "payload")

    def __init__(self, length: int | None, *, until_close: bool = False, dechunk: bool = False) -> None:
        # dechunk: collect the chunk payloads in ``payload`` (for HTTP/1.0 clients).
        self.payload: list[bytes] | None = [] if dechunk and length == -1 else None
        self.until_close = until_close and length is None
        self.chunked = length == -1
        self.remaining = length if (length is not None and length > 0) else 0
        self.done = not self.until_close and not self.chunked and self.remaining == 0
        self._state = 0  # chunked: 0 size line, 1 data, 2 CRLF after data, 3 trailers
        self._line = b""

    def feed(self, data: bytes | memoryview) -> int:
        if self.done:
            return 0
        if self.until_close:
            return len(data)
        if not self.chunked:
            n = min(self.remaining, len(data))
            self.remaining -= n
            if self.remaining == 0:
                self.done = True
            return n
        return self._feed_chunked(bytes(data) if isinstance(data, memoryview) else data)

    def _feed_chunked(self, data: bytes) -> int:
        pos, end = 0, len(data)
        while pos < end and not self.done:
            state = self._state
            if state == 1:  # chunk data: skip without looking at it
                n = min(self.remaining, end - pos)
                if self.payload is not None:
                    self.payload.append(data[pos:pos + n])
                pos += n
                self.remaining -= n
                if self.remaining == 0:
                    self._state = 2
                    self._line = b""
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line += data[pos:]
                if len(self._line) > 4096:
                    raise ProtocolError("chunk header too long")
                return end
            line = self._line + data[pos:nl + 1]
            self._line = b""
            pos = nl + 1
            if not line.endswith(b"\r\n"):
                raise ProtocolError("bare LF in chunked framing")
            line = line[:-2]
            if state == 0:
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ProtocolError("invalid chunk size") from None
                if size_text[:1] in (b"-", b"+") or size_text.startswith((b"0x", b"0X")):
                    raise ProtocolError("invalid chunk size")
                if size == 0:
                    self._state = 3
                else:
                    self.remaining = size
                    self._state = 1
            elif state == 2:
                if line:
                    raise ProtocolError("missing CRLF after chunk data")
                self._state = 0
            else:  # trailers end with an empty line
                if not line:
                    self.done = True
        return pos
