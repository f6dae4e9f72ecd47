"""The exchange core of one client connection: a state machine without I/O.

It is fed events (bytes from the client, auth decided, upstream connected, bytes from the
upstream, the upstream gone, a timer) and answers with actions on ``io``, the thin asyncio
shell in ``proxy.py`` (``responses.ProxyIO``: send to the client, pause reading, authenticate, connect, send
upstream, release the upstream connection, count). Tests drive it with a recording ``io``,
playbook style, without sockets (tests/test_http_proxy_core.py).

Requests: llhttp (``http1.RequestReader``) turns client bytes into heads, body pieces and
ends. Each head becomes an ``Exchange``; exchanges are served one at a time in arrival order
(pipelining), from a loop, never by recursion; the requests behind the current one wait in
``queue``, and reading pauses while that backlog is long. Responses: each exchange gets a
fresh ``response_reader.ResponseReader``; the upstream connection is released as reusable only when
both messages ended exactly at their framing.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, cast

from . import exchange as xc
from .admission import admit
from .exchange import ANONYMOUS, Exchange, chunk, json_message
from .http1 import (
    BODY,
    END,
    ERROR,
    HEAD,
    INTERIM,
    UPGRADE,
    ProtocolError,
    RequestHead,
    RequestReader,
)
from .mapping import map_target
from .response_reader import ResponseReader
from .responses import ProxyIO, ResponseSide

if TYPE_CHECKING:
    from relayd.auth.base import Identity

    from .routes import Router

HIGH_WATER = 1 << 20  # request bytes kept for exchanges not yet connected, before reading pauses
MAX_QUEUE = 128  # pipelined requests waiting behind the one being served, before reading pauses


class ClientCore(ResponseSide):
    """Requests in, exchanges served in order, upstream events; the responses half is in
    ``responses.ResponseSide``."""

    def __init__(self, router: Router, io: ProxyIO, *, tls: bool, peer: str) -> None:
        self.router = router
        self.io = io
        self.tls = tls
        self.scheme = b"https" if tls else b"http"
        self.peer = peer.encode()
        self.reader: RequestReader | None = RequestReader(router.core.protected_headers)
        self.ex: Exchange | None = None  # the exchange being served
        self.last: Exchange | None = None  # the exchange whose request bytes are arriving
        self.queue: deque[Exchange] = deque()
        self.queued_bytes = 0  # request bytes kept for exchanges not connected yet
        self.closed = False
        self.draining = False  # the component stops: close after the current response
        self.served = 0
        self.idle_since = 0.0
        self.upstream_full = False  # the upstream's write buffer is full: stop reading the client
        self.writing_paused = False  # the client's write buffer is full (the shell says so)
        self._reading = True
        self._advancing = False
        self.forwarding: dict[Any, bytes] = {}  # the proxy's own request lines, by route and host

    # -- events from the client ----------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:
            if self.last is not None:  # after an Upgrade request: bytes of the protocol switched to
                self._request_bytes(self.last, data)
                self._update_reading()
            return  # after a framing error nothing more is read
        for kind, value in reader.feed(data):
            if kind == BODY:
                self._body(self.last, value)  # type: ignore[arg-type]
            elif kind == HEAD:
                ex = self.last = Exchange(value)  # type: ignore[arg-type]
                self.queue.append(ex)
            elif kind == END:
                self._request_end(self.last)  # type: ignore[arg-type]
            elif kind == UPGRADE:
                self.reader = None
                reader.release()
                if value:
                    self._request_bytes(self.last, value)  # type: ignore[arg-type]
            elif kind == ERROR:
                self._request_error(value)  # type: ignore[arg-type]
        self._advance()
        self._update_reading()

    def client_lost(self) -> None:
        self.closed = True
        if self.reader is not None:
            self.reader.release()
        ex = self.ex
        if ex is not None and not ex.finished:
            self._finish(ex, reusable=False, keep_client=False)
        self.queue.clear()

    def drain(self) -> None:
        """The component stops: finish what was asked, then close (no new request is read)."""
        self.draining = True
        # A connection that has sent nothing yet, or part of its next request, is not cut.
        reading_a_head = self.reader is not None and self.reader.in_head
        if self.ex is None and not self.queue and self.served and not reading_a_head and not self.closed:
            self.closed = True
            self.io.close()

    def timer(self) -> None:
        """A deadline may have passed: idle keep-alive, upstream silence, total time."""
        if self.closed:
            return
        now = self.io.now()
        ex = self.ex
        if ex is None:
            keepalive = self.router.core.keepalive_timeout
            if keepalive > 0:
                if now >= self.idle_since + keepalive:
                    self.closed = True
                    self.io.close()
                else:
                    self.io.wake_at(self.idle_since + keepalive)
            return
        if ex.finished or ex.tunnel or ex.upstream is None:
            return  # tunnels may idle; before the upstream is reached, connect_timeout applies
        cfg = ex.route.config  # type: ignore[union-attr]
        if cfg.total_timeout and now >= ex.started + cfg.total_timeout:
            self.fail(ex, 504, "upstream did not complete the response in time")
        elif cfg.read_timeout and now >= ex.last_io + cfg.read_timeout:
            if self.writing_paused or (ex.splicer is not None and ex.splicer.writing):
                ex.last_io = now  # the client is the slow one: the upstream waits for it
                self._watch(ex)
            else:
                self.fail(ex, 504, "upstream did not answer in time")
        else:
            self._watch(ex)

    def set_upstream_full(self, full: bool) -> None:
        self.upstream_full = full
        self._update_reading()

    # -- reading requests ----------------------------------------------------------------------

    def _body(self, ex: Exchange, data: bytes) -> None:
        ex.bytes_in += len(data)
        if ex.finished:
            return  # answered early (and closing): the rest of the body is read and dropped
        route = ex.route
        limit = route.config.max_body if route is not None else 0
        if limit and ex.bytes_in > limit:
            self.fail(ex, 413, f"request body larger than {limit} bytes")
            return
        self._request_bytes(ex, chunk(data) if ex.req.chunked else data)

    def _request_end(self, ex: Exchange) -> None:
        ex.request_complete = True
        if ex.req.chunked and not ex.finished:
            self._request_bytes(ex, xc.LAST_CHUNK)

    def _request_bytes(self, ex: Exchange, data: bytes) -> None:
        """Bytes for the upstream: sent now if the exchange has its upstream, else kept."""
        # Bytes after an Upgrade request wait for the upstream's 101 (it may refuse to switch).
        if ex.head_sent and ex is self.ex and not ex.finished and (ex.tunnel or ex.req.upgrade is None):
            ex.last_io = self.io.now()
            if ex.tunnel:
                ex.bytes_in += len(data)
            self.io.send_upstream(ex, data)
        elif not ex.finished:
            ex.pending.append(data)
            ex.pending_size += len(data)
            self.queued_bytes += len(data)

    def _request_error(self, error: ProtocolError) -> None:
        last = self.last
        # Nothing after a framing error can be trusted: stop reading, answer in order, close.
        if self.reader is not None:
            self.reader.release()
        self.reader = None
        self.last = None
        if last is not None and not last.request_complete:
            # The body of a request in progress is malformed: it must not be forwarded further.
            if last is self.ex:
                self.fail(last, error.status, str(error))
            else:
                last.error = error
        else:
            head = RequestHead()
            head.method = error.method
            self.queue.append(Exchange(head, error))

    def _update_reading(self) -> None:
        if self.closed:
            return
        paused = self.upstream_full or self.queued_bytes > HIGH_WATER or len(self.queue) > MAX_QUEUE \
            or (self.reader is None and self.last is None)
        if paused == self._reading:
            self._reading = not paused
            self.io.set_reading(not paused)

    # -- serving exchanges in order -------------------------------------------------------------

    def _advance(self) -> None:
        """Start queued exchanges while none is in progress; a loop, so pipelines cannot recurse."""
        if self._advancing:
            return
        self._advancing = True
        try:
            while self.ex is None and self.queue and not self.closed:
                ex = self.ex = self.queue.popleft()
                self._start(ex)
        finally:
            self._advancing = False
        if self.ex is None and not self.closed:
            if self.draining or (self.reader is None and self.last is None):
                self.closed = True
                self.io.close()
            else:
                self.mark_idle()

    def mark_idle(self) -> None:
        self.idle_since = now = self.io.now()
        keepalive = self.router.core.keepalive_timeout
        if keepalive > 0:
            self.io.wake_at(now + keepalive)

    def _start(self, ex: Exchange) -> None:
        ex.started = self.io.now()
        if ex.error is not None:
            self.reply(ex, ex.error.status, json_message(str(ex.error)), close=True)
            return
        decision = admit(self.router, ex, self.tls)
        if decision.reply is not None:
            status, body, headers, close = decision.reply
            self.reply(ex, status, body, headers, close=close)
        elif decision.browser is not None:
            self.io.browser_endpoint(ex, decision.browser, ex.target)
        elif decision.identity is not None:
            self.auth_result(ex, decision.identity)
        else:
            self.io.authenticate(ex)

    # -- events from auth and the upstream side ------------------------------------------------

    def auth_result(self, ex: Exchange, identity: Identity) -> None:
        if self.closed or ex.finished:
            return
        route = ex.route
        assert route is not None
        user = identity.username or identity.sub
        if route.config.members_only and not identity.anonymous and (route.name, user) not in route.core.members:
            route.core.counters.rejected(route.name)
            self.reply(ex, 403, json_message(f"user {user!r} may not use service {route.name!r}"))
            return
        ex.identity = identity
        ex.user = ANONYMOUS if identity.anonymous else user
        ex.counted = True
        self.io.connect(ex, pooled=True)

    def upstream_ready(self, ex: Exchange, conn: Any, reused: bool,
                       reader: ResponseReader | None = None) -> None:
        """``conn`` (the shell's upstream connection, with its ``reader``) carries this exchange."""
        route = ex.route
        assert route is not None
        ex.upstream = conn
        ex.reused = reused
        ex.reader = (reader or ResponseReader()).start(ex.req.method == b"HEAD", ex.req.upgrade is not None)
        ex.received = 0
        ex.last_io = self.io.now()
        self._watch(ex)
        head = xc.upstream_head(ex, map_target(route.prefix, ex.target, route.to_path), self.peer, self.scheme,
                                self.forwarding)
        ex.head_sent = True
        if ex.pending and ex.req.upgrade is None:
            pending = ex.pending
            self._sent_pending(ex)
            self.io.send_upstream(ex, head, *pending)
        else:
            self.io.send_upstream(ex, head)

    def upstream_failed(self, ex: Exchange, status: int, message: str) -> None:
        self.fail(ex, status, message)

    def upstream_data(self, ex: Exchange, data: bytes) -> None:
        if ex.finished:
            return
        ex.received += len(data)
        ex.last_io = self.io.now()
        if ex.tunnel:
            self._to_client(ex, data)
            return
        reader = ex.reader
        assert reader is not None
        for kind, value in reader.feed(data):
            if kind == BODY:
                self._response_body(ex, value)  # type: ignore[arg-type]
            elif kind == HEAD:
                self._response_head(ex, value)  # type: ignore[arg-type]
            elif kind == END:
                self._response_done(ex, reusable=reader.head.keep_alive and not reader.extra)  # type: ignore[union-attr]
            elif kind == INTERIM:
                if not ex.req.http10:  # no 1xx to HTTP/1.0 clients (RFC 9110 section 15.2)
                    self.io.send(xc.interim_head(value))  # type: ignore[arg-type]
            elif kind == UPGRADE:
                self._to_client(ex, value)  # type: ignore[arg-type]
            elif kind == ERROR:
                self.fail(ex, 502, f"invalid response from upstream: {value}")
            # cast: mypy keeps ex.finished narrowed to False (the test above) across the calls
            # that set it, and mypyc would compile this return as unreachable code.
            if cast(bool, ex.finished):
                return
        remaining = reader.remaining
        if remaining and ex.body_mode == xc.FIXED and not ex.resp_head and ex.splicer is None:
            self.io.splice(ex, remaining)

    def splice_done(self, ex: Exchange) -> None:
        """The shell moved the rest of the body; it ended where its Content-Length said."""
        reader = ex.reader
        self._response_done(ex, reusable=reader is not None and reader.head is not None
                            and reader.head.keep_alive)

    def upstream_lost(self, ex: Exchange, error: str) -> None:
        if ex.finished:
            return
        if ex.tunnel:
            self._finish(ex, reusable=False, keep_client=False)
            return
        reader = ex.reader
        head = reader.head if reader is not None else None
        if head is not None and head.length is None and not head.chunked and ex.body_mode != xc.NO_BODY:
            self._response_done(ex, reusable=False)  # a body delimited by the connection's close
            return
        if (ex.status == 0 and ex.received == 0 and ex.reused and not ex.retried
                and ex.req.method in xc.IDEMPOTENT and ex.bytes_in == 0):
            # A pooled connection the upstream closed as it was reused, before any byte of a
            # response: an idempotent request without a body may go once more (RFC 9110 9.2.2).
            self.io.release_upstream(ex, reusable=False)
            ex.upstream = None
            ex.retried = True
            ex.head_sent = False
            self.io.connect(ex, pooled=False)
            return
        self.fail(ex, 502, "upstream closed the connection" + (f": {error}" if error else ""))

    def _watch(self, ex: Exchange) -> None:
        cfg = ex.route.config  # type: ignore[union-attr]
        when = ex.last_io + cfg.read_timeout if cfg.read_timeout else None
        if cfg.total_timeout:
            total = ex.started + cfg.total_timeout
            when = total if when is None else min(when, total)
        if when is not None:
            self.io.wake_at(when)
