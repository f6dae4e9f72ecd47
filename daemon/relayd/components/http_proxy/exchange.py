"""One request/response exchange and the pure decisions about it (no I/O).

The proxy frames every message it forwards from what llhttp parsed: the upstream request
carries ``Content-Length`` or ``Transfer-Encoding: chunked`` because the client's request had
that body, never because a header said so; the response to the client likewise. Hop-by-hop
headers, the client's framing headers and everything the client's ``Connection`` lists are
dropped. These functions build the heads; the protocol shells only move bytes.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from .http1 import RequestHead, ResponseHead
from .response_reader import ResponseReader

if TYPE_CHECKING:
    from relayd.auth.base import Identity

    from .route_view import RouteView

# Every registered status (RFC 9110 names where Python's older ones differ), so no status line
# the proxy writes lacks its reason phrase.
REASONS = {s.value: s.phrase for s in HTTPStatus} | {
    421: "Misdirected Request", 422: "Unprocessable Content", 416: "Range Not Satisfiable",
    100: "Continue", 101: "Switching Protocols", 103: "Early Hints",
    200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 206: "Partial Content",
    301: "Moved Permanently", 302: "Found", 303: "See Other", 304: "Not Modified",
    307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
    414: "URI Too Long", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}
# Request headers the proxy sets itself; client copies are dropped.
REPLACED = frozenset({b"host", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-for",
                      b"forwarded", b"x-real-ip"})
# RFC 9110 section 9.2.2: these may be sent again after a connection failure.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
ANONYMOUS = "(anonymous)"  # the counters' user for auth methods that let anyone in
LAST_CHUNK = b"0\r\n\r\n"

# How a response body goes to the client.
NO_BODY, FIXED, CHUNKED, UNTIL_CLOSE = range(4)


class Exchange:
    """One request/response pair; created when llhttp completes a request head."""

    __slots__ = (
        "body_mode",
        "bytes_in",
        "bytes_out",
        "counted",
        "endpoint",
        "error",
        "finished",
        "head_sent",
        "host",
        "identity",
        "keep_alive",
        "last_io",
        "pending",
        "pending_size",
        "req",
        "request_complete",
        "resp_head",
        "retried",
        "reused",
        "route",
        "splicer",
        "started",
        "status",
        "target",
        "tunnel",
        "upstream",
        "reader",
        "received",
        "user",
    )

    def __init__(self, req: RequestHead, error: Any = None) -> None:
        self.req = req
        self.error = error  # a ProtocolError to answer instead of serving (pipelined after others)
        self.route: RouteView | None = None
        self.identity: Identity | None = None
        self.user = ""
        self.target = ""  # the normalized path and query
        self.host = req.host  # Host, or the authority of an absolute-form target
        self.endpoint = ""
        self.keep_alive = req.keep_alive
        self.upstream: Any = None  # the shell's upstream connection while it carries this exchange
        self.pending: list[bytes] = []  # request body bytes (framed for the upstream) not yet sent
        self.pending_size = 0
        self.request_complete = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        self.started = 0.0
        self.last_io = 0.0
        self.reused = False
        self.retried = False
        self.finished = False
        self.counted = False
        self.tunnel = False
        self.resp_head = b""  # the response head, written together with the first body bytes
        self.body_mode = NO_BODY
        self.splicer: Any = None  # a Splicer moving the response body in the kernel
        self.head_sent = False  # the upstream request head was written
        self.reader: ResponseReader | None = None  # a new one for every upstream response
        self.received = 0  # bytes of the response seen (a retry is only safe at 0)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def simple_response(status: int, body: bytes, headers: list[bytes] | None = None,
                    close: bool = False, content_type: bytes = b"application/json",
                    head_request: bool = False) -> bytes:
    """A response of the proxy's own; to a HEAD request, the same head without the body."""
    lines = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, "Unknown").encode()),
             b"Content-Type: " + content_type, b"Content-Length: %d" % len(body)]
    if headers:
        lines += headers
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_request else body)


def json_message(message: str) -> bytes:
    return json.dumps({"message": message}).encode()


def _quote(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def header_value(value: str) -> bytes:
    # Identity values come from auth methods; never let them break the header framing.
    return value.replace("\r", " ").replace("\n", " ").replace("\0", " ").encode("utf-8", "replace")


def upstream_head(ex: Exchange, upstream_target: str, peer: bytes, scheme: bytes,
                  cache: dict[Any, bytes] | None = None) -> bytes:
    """The request head sent upstream: the client's end-to-end headers plus ours, our framing.

    ``cache`` (one per client connection) keeps the lines the proxy adds for a route and host
    when the client sent no forwarding headers of its own, and the identity lines for a route
    and user: they are the same on every request.
    """
    route = ex.route
    assert route is not None
    cfg = route.config
    req = ex.req
    out = [b"%s %s HTTP/1.1" % (req.method, upstream_target.encode())]
    strip = route.strip_headers
    if req.connection:
        strip = strip | req.connection  # headers the client declared hop-by-hop
    xff = fwd = None
    for lname, name, value in req.headers:
        if lname in strip or (b"_" in lname and lname.replace(b"_", b"-") in strip):
            if lname == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
            elif lname == b"forwarded":
                fwd = value if fwd is None else fwd + b", " + value
            elif lname == b"authorization" and cfg.pass_credentials:
                out.append(name + b": " + value)
            elif lname == b"cookie":
                prefixes = route.cookie_prefixes
                kept = b"; ".join(p for p in (c.strip() for c in value.split(b";"))
                                  if p and not p.startswith(prefixes))
                if kept:
                    out.append(b"Cookie: " + kept)
            continue
        out.append(name + b": " + value)
    if cache is not None and xff is None and fwd is None:
        key = (route, ex.host)
        lines = cache.get(key)
        if lines is None:
            if len(cache) > 16:
                cache.clear()
            lines = cache[key] = _forwarding(route, ex.host, peer, scheme, None, None)
        out.append(lines)
    else:
        out.append(_forwarding(route, ex.host, peer, scheme, xff, fwd))
    identity = ex.identity
    if identity is not None and not identity.anonymous:
        if cache is None:
            out.append(_identity_lines(route, ex.user, identity.email))
        else:  # the same user on every request of a connection, as a rule
            user_key = (route, ex.user, identity.email)
            lines = cache.get(user_key)
            if lines is None:
                if len(cache) > 16:
                    cache.clear()
                lines = cache[user_key] = _identity_lines(route, ex.user, identity.email)
            out.append(lines)
    if req.chunked:
        out.append(b"Transfer-Encoding: chunked")
    elif req.length is not None:
        out.append(b"Content-Length: %d" % req.length)
    if req.upgrade is not None:
        out.append(b"Connection: Upgrade")
        out.append(b"Upgrade: " + req.upgrade)
    return b"\r\n".join(out) + b"\r\n\r\n"


def _identity_lines(route: RouteView, user: str, email: str | None) -> bytes:
    line = route.user_header + header_value(user)
    return line + b"\r\n" + route.email_header + header_value(email) if email else line


def _forwarding(route: RouteView, host: bytes | None, peer: bytes, scheme: bytes, xff: bytes | None,
                fwd: bytes | None) -> bytes:
    """Host and the forwarding headers (RFC 7239 Forwarded, and the X-Forwarded-* ones)."""
    out = [b"Host: " + (host if (route.config.preserve_host and host) else route.host_header),
           b"X-Forwarded-For: " + (xff + b", " + peer if xff else peer)]
    if host:
        out.append(b"X-Forwarded-Host: " + host)
    out.append(b"X-Forwarded-Proto: " + scheme)
    node = b'"[%s]"' % peer if b":" in peer else peer
    this = b"for=" + node + (b";host=" + _quote(host) if host else b"") + b";proto=" + scheme
    out.append(b"Forwarded: " + (fwd + b", " + this if fwd else this))
    return b"\r\n".join(out)


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}  # an upstream uses few (status, reason) pairs


def _status_line(head: ResponseHead) -> bytes:
    key = (head.status, head.reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        reason = head.reason or REASONS.get(head.status, "Unknown").encode()
        line = b"HTTP/1.1 %d %s" % (head.status, reason)
        if len(_STATUS_LINES) >= 256:  # reasons are the upstream's text: keep the cache bounded
            _STATUS_LINES.clear()
        _STATUS_LINES[key] = line
    return line


def interim_head(head: ResponseHead) -> bytes:
    return b"\r\n".join([_status_line(head), *head.end_to_end, b"", b""])


def client_head(ex: Exchange, head: ResponseHead, tls: bool, closing: bool) -> bytes:
    """The response head for the client; sets ``ex.body_mode`` and ``ex.keep_alive``."""
    route = ex.route
    assert route is not None
    req = ex.req
    out = [_status_line(head), *head.end_to_end]
    if head.status == 101:
        out += [b"Connection: Upgrade", b"Upgrade: " + (req.upgrade or b""), b"", b""]
        ex.body_mode = NO_BODY
        ex.keep_alive = False
        return b"\r\n".join(out)
    if req.method == b"HEAD" or head.status in (204, 304):
        ex.body_mode = NO_BODY
        if req.method == b"HEAD" and head.length is not None:
            out.append(b"Content-Length: %d" % head.length)  # what a GET would have returned
    elif head.length is not None:
        ex.body_mode = FIXED
        out.append(b"Content-Length: %d" % head.length)
    elif req.http10:  # no chunked coding for HTTP/1.0: the body ends when the connection does
        ex.body_mode = UNTIL_CLOSE
        ex.keep_alive = False
    else:  # chunked upstream, or one that ends its body by closing: chunked to the client
        ex.body_mode = CHUNKED
        out.append(b"Transfer-Encoding: chunked")
    if tls and route.hsts:
        out.append(route.hsts)
    if closing:
        ex.keep_alive = False
    if not ex.keep_alive:
        out.append(b"Connection: close")
    elif req.http10:
        out.append(b"Connection: keep-alive")
    out += (b"", b"")  # the head ends with an empty line
    return b"\r\n".join(out)
