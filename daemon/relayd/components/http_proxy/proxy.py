"""The proxy's client side: one asyncio Protocol per client connection.

Why not aiohttp's server and client: a request through both costs ~400 us of CPU here, about
the budget of three requests through this path. Protocols let bytes go from one transport to
the other without copies, tasks or intermediate objects, and flow control is direct: when one
side's write buffer fills, the other side stops reading (bodies are never buffered whole).

Bytes from the client go to llhttp (``http1.RequestReader``), which returns request heads,
body pieces and ends. Each head becomes an ``Exchange``; exchanges are served one at a time
in arrival order (pipelining), from a loop, never by recursion; while one is served, the
requests behind it wait in ``queue``, and reading pauses when that backlog is long. The fast
path (credentials verified recently, an idle upstream connection in the pool) runs
synchronously inside ``data_received``; only an auth check that must ask the auth method, or
a new upstream connection, goes through a task.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any

from relayd.auth.base import AuthError, AuthFailure, Identity

from . import exchange as xc
from . import splice
from .exchange import ANONYMOUS, Exchange, chunk, json_message, simple_response
from .http1 import BODY, END, ERROR, HEAD, UPGRADE, ProtocolError, RequestHead, RequestReader, valid_host
from .mapping import PathError, map_target, normalize_path

if TYPE_CHECKING:
    from .http1 import ResponseHead
    from .routes import Router
    from .upstream import UpstreamConnection

log = logging.getLogger("relayd.http_proxy")

_AUTH_STATUS = {AuthFailure.MISSING: 401, AuthFailure.MALFORMED: 401, AuthFailure.INVALID: 401,
                AuthFailure.FORBIDDEN: 403, AuthFailure.UNAVAILABLE: 503}
HIGH_WATER = 1 << 20
MAX_QUEUE = 128  # pipelined requests waiting behind the one being served, before reading pauses


class ClientConnection(asyncio.Protocol):
    """A client connection on one listener; serves its requests one after the other."""

    def __init__(self, router: Router, tls: bool) -> None:
        self.router = router
        self.core = router.core
        self.tls = tls
        self.scheme = b"https" if tls else b"http"
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.reader: RequestReader | None = RequestReader(self.core.protected_headers)
        self.ex: Exchange | None = None  # the exchange being served
        self.last: Exchange | None = None  # the exchange whose request bytes are arriving
        self.queue: deque[Exchange] = deque()
        self.queued_bytes = 0
        self.closed = False
        self.draining = False  # the component stops: close after the current response
        self.served = 0
        self.on_closed: Any = None  # called once when the connection is gone (accept limits)
        self._advancing = False
        # One timer per connection, for every deadline (idle, read, total): it is re-armed only
        # when a deadline comes earlier than the one it waits for, and when it fires it checks
        # the real deadlines. A request therefore costs no timer operations (~5 us each).
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when = 0.0
        self.idle_since = 0.0
        self._upstream_full = False  # upstream write buffer full (request body backpressure)
        self._reading_paused = False
        self._writing_paused = False

    # -- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "unix"
        transport.set_write_buffer_limits(HIGH_WATER)  # type: ignore[attr-defined]
        self.core.connections.add(self)
        self._mark_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.core.connections.discard(self)
        if self.timer:
            self.timer.cancel()
            self.timer = None
        ex = self.ex
        if ex is not None and not ex.finished:
            self._finish(ex, reusable=False, keep_client=False)
        self.queue.clear()
        callback, self.on_closed = self.on_closed, None
        if callback is not None:
            callback()

    def pause_writing(self) -> None:
        self._writing_paused = True
        ex = self.ex
        if ex and ex.upstream and ex.upstream.transport:
            ex.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        ex = self.ex
        if ex is not None:
            ex.last_io = self.core.loop.time()  # upstream silence counts from when we read again
        if ex and ex.splicer is None and ex.upstream and ex.upstream.transport \
                and not ex.upstream.transport.is_closing():
            ex.upstream.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            self._data_received(data)
        except Exception:  # a bug must cost one connection and a log line, never a traceback loop
            log.exception("http_proxy: internal error on a client connection")
            self.internal_error()

    def eof_received(self) -> bool | None:
        ex = self.ex
        if ex is not None and ex.tunnel and ex.upstream and ex.upstream.transport:
            if ex.upstream.transport.can_write_eof():
                ex.upstream.transport.write_eof()
            return True  # half-close: the upstream may still answer
        return None

    def internal_error(self) -> None:
        ex = self.ex
        if ex is not None and not ex.finished:
            self.fail(ex, 500, "internal error")
        elif self.transport and not self.closed:
            self.transport.abort()

    # -- reading requests ----------------------------------------------------------------------

    def _data_received(self, data: bytes) -> None:
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
                if value:
                    self._request_bytes(self.last, value)  # type: ignore[arg-type]
            elif kind == ERROR:
                self._request_error(value)  # type: ignore[arg-type]
        self._advance()
        self._update_reading()

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
        if ex.head_sent and ex is self.ex and ex.upstream is not None and not ex.finished \
                and (ex.tunnel or ex.req.upgrade is None):
            ex.last_io = self.core.loop.time()
            ex.upstream.transport.write(data)  # type: ignore[union-attr]
            if ex.tunnel:
                ex.bytes_in += len(data)
        elif not ex.finished:
            ex.pending.append(data)
            ex.pending_size += len(data)
            self.queued_bytes += len(data)

    def _request_error(self, error: ProtocolError) -> None:
        last = self.last
        # Nothing after a framing error can be trusted: stop reading, answer in order, close.
        self.reader = None
        self.last = None
        if last is not None and not last.request_complete:
            # The body of a request in progress is malformed: it must not be forwarded further.
            if last is self.ex:
                self.fail(last, error.status, str(error))
            else:
                last.error = error
        else:
            self.queue.append(Exchange(RequestHead(), error))

    def _update_reading(self) -> None:
        if self.closed or self.transport is None:
            return
        want_paused = self._upstream_full or self.queued_bytes > HIGH_WATER or len(self.queue) > MAX_QUEUE \
            or (self.reader is None and self.last is None)
        if want_paused != self._reading_paused:
            self._reading_paused = want_paused
            if want_paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def upstream_full(self, full: bool) -> None:
        self._upstream_full = full
        self._update_reading()

    # -- serving exchanges in order -------------------------------------------------------------

    def _advance(self) -> None:
        """Start queued exchanges while none is in progress; a loop, so pipelines cannot recurse."""
        if self._advancing:
            return
        self._advancing = True
        try:
            while self.ex is None and self.queue and not self.closed:
                ex = self.queue.popleft()
                self.ex = ex
                self._start(ex)
        finally:
            self._advancing = False
        if self.ex is None and not self.closed:
            if self.draining or (self.reader is None and self.last is None and not self.queue):
                self.transport.close()  # type: ignore[union-attr]
            else:
                self._mark_idle()

    def _start(self, ex: Exchange) -> None:
        ex.started = self.core.loop.time()
        if ex.error is not None:
            self._reply(ex, ex.error.status, json_message(str(ex.error)), close=True)
            return
        req = ex.req
        try:
            target = req.target.decode("ascii")
        except UnicodeDecodeError:
            self._reply(ex, 400, json_message("request target must be ASCII"), close=True)
            return
        host = req.host
        if target[:1] != "/":
            scheme, sep, rest = target.partition("://")
            if not sep or scheme.lower() not in ("http", "https"):
                self._reply(ex, 400, json_message("request target must be a path or an http(s) URL"),
                            close=True)
                return
            authority, slash, path = rest.partition("/")  # absolute form: its authority is the host
            if not valid_host(authority.encode()):
                self._reply(ex, 400, json_message("invalid authority in the request target"), close=True)
                return
            host = authority.encode()
            target = slash + path if slash else "/"
        if "#" in target:
            self._reply(ex, 400, json_message("a fragment is not allowed in the request target"), close=True)
            return
        path, sep, query = target.partition("?")
        try:
            path = normalize_path(path)
        except PathError as exc:
            self._reply(ex, 400, json_message(str(exc)), close=True)
            return
        target = path + sep + query
        hostname = _hostname(host)
        method = req.method
        router = self.router
        if path == "/.well-known/relayd" and method in (b"GET", b"HEAD"):
            self._reply(ex, 200, router.discovery(hostname))
            return
        if router.browser_paths:
            browser = router.browser_paths.get(path)
            if browser is not None:
                self._spawn(self._browser_endpoint(ex, browser, target))
                return
        route = router.find(hostname, target)
        if route is None:
            self._reply(ex, 404, json_message("no service at this address"))
            return
        ex.route = route
        ex.target = target
        ex.endpoint = path
        cfg = route.config
        if not self.tls and cfg.redirect_https and route.https_port:
            port = "" if route.https_port == 443 else f":{route.https_port}"
            location = f"https://{hostname or route.default_host}{port}{target}".encode()
            self._reply(ex, 308, b"", [b"Location: " + location])
            return
        if cfg.max_body and (req.length or 0) > cfg.max_body:
            self._reply(ex, 413, json_message(f"request body larger than {cfg.max_body} bytes"), close=True)
            return
        if cfg.max_body and ex.bytes_in > cfg.max_body:
            self._reply(ex, 413, json_message(f"request body larger than {cfg.max_body} bytes"), close=True)
            return
        if req.upgrade is not None and not cfg.websocket:
            self._reply(ex, 501, json_message("WebSocket is not enabled for this service"), close=True)
            return
        if route.browser:
            identity = route.auth.session_identity(req.cookie)  # type: ignore[attr-defined]
            if identity is None:
                if method in (b"GET", b"HEAD"):
                    where = (host or route.default_host.encode()).decode("latin-1")
                    location, cookies = route.auth.start_login(self.scheme.decode(), where, target)  # type: ignore[attr-defined]
                    self._reply(ex, 302, b"", [b"Location: " + location.encode(), *cookies])
                else:
                    self._reply(ex, 401, json_message("log in with a web browser first"))
                return
        else:
            identity = route.cached_identity(req.authorization)
        if identity is None:
            self._spawn(self._slow_path(ex))
            return
        if self._authorize(ex, identity):
            self._to_upstream(ex)

    def _to_upstream(self, ex: Exchange) -> None:
        conn = ex.route.pool_get()  # type: ignore[union-attr]
        if conn is None:
            self._spawn(self._connect_and_send(ex))
        else:
            ex.reused = True
            self._attach(ex, conn)

    async def _slow_path(self, ex: Exchange) -> None:
        route = ex.route
        assert route is not None
        try:
            identity = await route.authenticate(ex.req.authorization)
        except AuthError as exc:
            status = _AUTH_STATUS[exc.reason]
            extra = []
            challenge = route.auth.challenge() if status == 401 else None
            if challenge:
                extra.append(b"WWW-Authenticate: " + challenge.encode())
            route.core.counters.rejected(route.name)
            self._reply(ex, status, json_message(exc.message), extra)
            return
        except Exception:
            log.exception("auth method %s failed", route.auth.name)
            self._reply(ex, 503, json_message("authentication is unavailable"))
            return
        if not self.closed and not ex.finished and self._authorize(ex, identity):
            self._to_upstream(ex)

    async def _browser_endpoint(self, ex: Exchange, method: Any, target: str) -> None:
        from urllib.parse import parse_qsl

        path, _, query = target.partition("?")
        if path == method.config.login_path:
            status, text, headers = await method.finish_login(dict(parse_qsl(query)), ex.req.cookie)
        else:
            status, text, headers = 200, "logged out", await method.logout(ex.req.cookie)
        if status == 302:
            self._reply(ex, 302, b"", [b"Location: " + text.encode(), *headers])
        else:
            self._reply(ex, status, json_message(text), headers)

    def _spawn(self, coro: Any) -> None:
        task = self.core.loop.create_task(coro)
        self.core.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.core.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("http_proxy: internal error", exc_info=task.exception())
            self.internal_error()

    def _authorize(self, ex: Exchange, identity: Identity) -> bool:
        route = ex.route
        assert route is not None
        user = identity.username or identity.sub
        if route.config.members_only and not identity.anonymous and (route.name, user) not in route.core.members:
            route.core.counters.rejected(route.name)
            self._reply(ex, 403, json_message(f"user {user!r} may not use service {route.name!r}"))
            return False
        ex.identity = identity
        ex.user = ANONYMOUS if identity.anonymous else user
        ex.counted = True
        return True

    async def _connect(self, ex: Exchange) -> UpstreamConnection | None:
        """A new upstream connection, or None after answering 502/504 (or if the client left)."""
        try:
            conn = await ex.route.connect()  # type: ignore[union-attr]
        except TimeoutError:
            self.fail(ex, 504, "upstream connect timed out")
            return None
        except (OSError, ssl.SSLError) as exc:
            self.fail(ex, 502, f"upstream refused the connection: {_oserror(exc)}")
            return None
        if self.closed or ex.finished:
            conn.drop()
            return None
        return conn

    async def _connect_and_send(self, ex: Exchange) -> None:
        conn = await self._connect(ex)
        if conn is not None:
            self._attach(ex, conn)

    # -- sending the request upstream ------------------------------------------------------------

    def _attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        route = ex.route
        assert route is not None
        ex.upstream = conn
        conn.attach(self, ex)
        transport = conn.transport
        assert transport is not None
        if self._writing_paused:
            transport.pause_reading()
        ex.last_io = self.core.loop.time()
        self._watch(ex)
        head = xc.upstream_head(ex, map_target(route.prefix, ex.target, route.to_path), self.peer.encode(),
                                self.scheme)
        ex.head_sent = True
        if ex.pending and ex.req.upgrade is None:
            pending = ex.pending
            self._sent_pending(ex)
            transport.writelines([head, *pending])
        else:
            transport.write(head)

    def _sent_pending(self, ex: Exchange) -> None:
        self.queued_bytes -= ex.pending_size
        ex.pending = []
        ex.pending_size = 0
        self._update_reading()

    # -- responses from the upstream -----------------------------------------------------------

    def interim_response(self, ex: Exchange, head: ResponseHead) -> None:
        if not self.closed and not ex.req.http10:  # no 1xx to HTTP/1.0 clients (RFC 9110 15.2)
            self.transport.write(xc.interim_head(head))  # type: ignore[union-attr]

    def response_head(self, ex: Exchange, head: ResponseHead) -> None:
        ex.status = head.status
        ex.upstream_keep_alive = head.keep_alive
        # An Upgrade the upstream declined leaves bytes of another protocol behind: close after.
        closing = self.draining or not ex.request_complete or ex.req.upgrade is not None
        ex.resp_head = xc.client_head(ex, head, self.tls, closing)
        if head.status == 101:
            ex.tunnel = True
            self._write_head(ex)
            if ex.pending:  # client bytes that arrived before the switch
                pending = ex.pending
                self._sent_pending(ex)
                ex.upstream.transport.writelines(pending)  # type: ignore[union-attr]

    def _write_head(self, ex: Exchange, body: bytes = b"") -> None:
        head, ex.resp_head = ex.resp_head, b""
        if body:
            self.transport.writelines((head, body))  # type: ignore[union-attr]
        elif head:
            self.transport.write(head)  # type: ignore[union-attr]

    def response_body(self, ex: Exchange, data: bytes) -> None:
        if ex.body_mode == xc.NO_BODY or self.closed:
            return
        ex.bytes_out += len(data)
        if ex.body_mode == xc.CHUNKED:
            data = chunk(data)
        if ex.resp_head:
            self._write_head(ex, data)  # one write for head and body: on loopback a send costs much
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def response_done(self, ex: Exchange, reusable: bool) -> None:
        if self.closed or ex.tunnel or ex.finished:
            return
        self._write_head(ex, xc.LAST_CHUNK if ex.body_mode == xc.CHUNKED else b"")
        if not ex.request_complete:
            # The upstream answered before the whole request body was read: the rest of the body
            # cannot be sent to this upstream connection, so neither connection is reused.
            self._finish(ex, reusable=False, keep_client=False)
            return
        self._finish(ex, reusable=reusable)

    def tunnel_data(self, ex: Exchange, data: bytes) -> None:
        ex.bytes_out += len(data)
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def upstream_lost(self, ex: Exchange, conn: UpstreamConnection, exc: Exception | None) -> None:
        if ex.finished:
            return
        if ex.tunnel:
            self._finish(ex, reusable=False, keep_client=False)
            return
        reader = conn.reader
        if ex.status and ex.body_mode in (xc.CHUNKED, xc.UNTIL_CLOSE) and reader is not None \
                and reader.head is not None and reader.head.length is None and not reader.head.chunked:
            self.response_done(ex, reusable=False)  # a body delimited by the connection's close
            return
        if (ex.status == 0 and conn.received == 0 and ex.reused and not ex.retried
                and ex.req.method in xc.IDEMPOTENT and ex.bytes_in == 0):
            # A pooled connection the upstream closed as it was reused, before any byte of a
            # response: an idempotent request without a body may go once more (RFC 9110 9.2.2).
            ex.upstream = None
            ex.reused = False
            ex.retried = True
            ex.head_sent = False
            self._spawn(self._connect_and_send(ex))
            return
        self.fail(ex, 502, "upstream closed the connection" + (f": {_oserror(exc)}" if exc else ""))

    def maybe_splice(self, ex: Exchange, conn: UpstreamConnection, remaining: int) -> None:
        """Hand the rest of a large fixed-length body to splice(2) when both ends allow it."""
        route = ex.route
        if (self.core.splice and ex.body_mode == xc.FIXED and not self.tls and not route.tls  # type: ignore[union-attr]
                and ex.splicer is None and not self.closed and not ex.resp_head
                and self.transport.get_write_buffer_size() == 0):  # type: ignore[union-attr]
            try:
                ex.splicer = splice.Splicer(self, conn, ex, remaining)
            except OSError as exc:  # e.g. out of file descriptors: the copying path still works
                log.debug("splice unavailable: %s", exc)

    # -- the proxy's own answers ---------------------------------------------------------------

    def _reply(self, ex: Exchange, status: int, body: bytes, headers: list[bytes] | None = None,
               close: bool = False, content_type: bytes = b"application/json") -> None:
        """A response of the proxy's own, before anything of the exchange was forwarded."""
        if ex.finished:
            return
        # A body still arriving is not worth reading to keep the connection: close after.
        keep = ex.keep_alive and ex.request_complete and not close and not self.draining
        if not self.closed:
            self.transport.write(simple_response(status, body, headers, not keep, content_type))  # type: ignore[union-attr]
        ex.status = status
        ex.bytes_out += len(body)
        self._finish(ex, reusable=False, keep_client=keep)

    def fail(self, ex: Exchange, status: int, message: str) -> None:
        """The exchange failed: answer with status if nothing was sent yet, else cut."""
        if ex.finished:
            return
        if status >= 500 and ex.route is not None:
            log.info("%s %s %s: %d %s", ex.route.name, ex.req.method.decode(), ex.target[:200], status,
                     message)
        if ex.upstream is not None:
            ex.upstream.drop()
            ex.upstream = None
        if (ex.status == 0 or ex.resp_head) and not self.closed:  # nothing of a response written yet
            ex.resp_head = b""
            self._reply(ex, status, json_message(message), close=True)
        else:
            self.abort(ex)

    def abort(self, ex: Exchange) -> None:
        if ex.upstream is not None:
            ex.upstream.drop()
        if not ex.finished:
            self._finish(ex, reusable=False, keep_client=False)
        if self.transport and not self.closed:
            self.transport.abort()

    def _finish(self, ex: Exchange, reusable: bool, keep_client: bool | None = None) -> None:
        if ex.finished:
            return
        if ex.splicer is not None:
            ex.splicer.cancel()
        ex.finished = True
        self.served += 1
        if ex.counted:
            self.core.counters.record(ex.route.name, ex.user, ex.endpoint, ex.bytes_in, ex.bytes_out,  # type: ignore[union-attr]
                                      ex.status)
        conn = ex.upstream
        if conn is not None:
            conn.detach()
            if reusable and ex.request_complete and not ex.tunnel:
                ex.route.pool_put(conn)  # type: ignore[union-attr]
            else:
                conn.drop()
        self.queued_bytes -= ex.pending_size
        ex.pending = []
        ex.pending_size = 0
        self._upstream_full = False  # the upstream connection is detached: its flow control too
        keep = ex.keep_alive if keep_client is None else keep_client
        if ex is self.ex:
            self.ex = None
        if self.closed:
            return
        if not keep:
            self.queue.clear()
            self.reader = None
            self.last = None
            self.transport.close()  # type: ignore[union-attr]
            return
        if not self._advancing:
            self._advance()
            self._update_reading()

    def drain(self) -> None:
        """The component stops: finish what was asked, then close (no new request is read)."""
        self.draining = True
        if self.ex is None and not self.queue and self.served and not self.closed:
            self.transport.close()  # type: ignore[union-attr]

    # -- timers ----------------------------------------------------------------------------------

    def _mark_idle(self) -> None:
        self.idle_since = now = self.core.loop.time()
        if self.core.keepalive_timeout > 0:
            self._wake_at(now + self.core.keepalive_timeout)

    def _wake_at(self, when: float) -> None:
        timer = self.timer
        if timer is not None:
            if self.timer_when <= when:
                return  # it fires earlier and will look at the real deadlines then
            timer.cancel()
        self.timer_when = when
        self.timer = self.core.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.closed:
            return
        now = self.core.loop.time()
        ex = self.ex
        if ex is None:
            keepalive = self.core.keepalive_timeout
            if keepalive > 0:
                if now >= self.idle_since + keepalive:
                    self.transport.close()  # type: ignore[union-attr]
                else:
                    self._wake_at(self.idle_since + keepalive)
            return
        if ex.finished or ex.tunnel or ex.upstream is None:
            return  # tunnels may idle; before the upstream is reached, connect_timeout applies
        cfg = ex.route.config  # type: ignore[union-attr]
        if cfg.total_timeout and now >= ex.started + cfg.total_timeout:
            self.fail(ex, 504, "upstream did not complete the response in time")
        elif cfg.read_timeout and now >= ex.last_io + cfg.read_timeout:
            if self._writing_paused or (ex.splicer is not None and ex.splicer.writing):
                ex.last_io = now  # the client is the slow one: the upstream waits for it
                self._watch(ex)
            else:
                self.fail(ex, 504, "upstream did not answer in time")
        else:
            self._watch(ex)

    def _watch(self, ex: Exchange) -> None:
        cfg = ex.route.config  # type: ignore[union-attr]
        when = ex.last_io + cfg.read_timeout if cfg.read_timeout else None
        if cfg.total_timeout:
            total = ex.started + cfg.total_timeout
            when = total if when is None else min(when, total)
        if when is not None:
            self._wake_at(when)


def _hostname(host: bytes | None) -> str:
    if not host:
        return ""
    text = host.decode("ascii", "replace").lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if ":" in text else text


def _oserror(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
