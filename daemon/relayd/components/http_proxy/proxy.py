"""The proxy's I/O shell: one asyncio Protocol per client and per upstream connection.

Why not aiohttp's server and client: a request through both costs ~400 us of CPU here, about
the budget of three requests through this path. Protocols let bytes go from one transport to
the other without copies, tasks or intermediate objects, and flow control is direct: when one
side's write buffer fills, the other side stops reading (bodies are never buffered whole).

The fast path of a request (credentials already verified recently, an idle upstream connection
in the pool) runs synchronously inside ``data_received``; only an auth check that must ask the
auth method, or a new upstream connection, goes through a task.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

from relayd.auth.base import AuthError, AuthFailure, Identity

from . import h1, splice
from .h1 import HOP_BY_HOP, Framer, ProtocolError
from .mapping import has_dot_segment, map_target, matches

if TYPE_CHECKING:
    from .routes import Route, Router

log = logging.getLogger("relayd.http_proxy")

_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
            308: "Permanent Redirect", 200: "OK"}
_AUTH_STATUS = {AuthFailure.MISSING: 401, AuthFailure.MALFORMED: 401, AuthFailure.INVALID: 401,
                AuthFailure.FORBIDDEN: 403, AuthFailure.UNAVAILABLE: 503}
# Request headers the proxy sets itself; client copies are dropped.
_REPLACED = frozenset({b"host", b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-for",
                       b"forwarded", b"x-real-ip"})
_NO_BODY_STATUS = (204, 304)
ANONYMOUS = "(anonymous)"  # the counters' user for auth methods that let anyone in
_CONNECTION_KEYWORDS = frozenset({b"keep-alive", b"close", b"upgrade", b""})
_HIGH_WATER = 1 << 20


def simple_response(status: int, body: bytes, headers: list[bytes] | None = None,
                    close: bool = False, content_type: bytes = b"application/json") -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Error").encode()),
             b"Content-Type: " + content_type, b"Content-Length: %d" % len(body)]
    if headers:
        lines += headers
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def json_message(message: str) -> bytes:
    return json.dumps({"message": message}).encode()


class Exchange:
    """One request/response pair between a client and an upstream."""

    __slots__ = ("route", "identity", "user", "method", "target", "endpoint", "keep_alive", "upgrade",
                 "req_framer", "resp_framer", "upstream", "head", "bytes_in", "bytes_out", "status",
                 "started", "last_io", "reused", "resp_keep_alive", "finished", "head_request",
                 "counted", "tunnel", "resp_head", "connection", "http10", "splicer")

    def __init__(self, route: Route, method: bytes, target: str, keep_alive: bool) -> None:
        self.route = route
        self.identity: Identity | None = None
        self.user = ""
        self.method = method
        self.target = target
        self.endpoint = target.split("?", 1)[0]
        self.keep_alive = keep_alive
        self.upgrade: bytes | None = None
        self.req_framer: Framer | None = None
        self.resp_framer: Framer | None = None
        self.upstream: UpstreamConnection | None = None
        self.head = b""
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        self.started = 0.0
        self.last_io = 0.0
        self.reused = False
        self.resp_keep_alive = True
        self.finished = False
        self.head_request = method == b"HEAD"
        self.counted = False
        self.tunnel = False
        self.resp_head = b""
        self.connection: bytes | None = None
        self.http10 = False  # the client speaks HTTP/1.0: no chunked responses
        self.splicer: Any = None  # a Splicer moving the response body in the kernel


class ClientConnection(asyncio.Protocol):
    """A client connection on one listener; serves its requests one after the other."""

    def __init__(self, router: Router, tls: bool) -> None:
        self.router = router
        self.core = router.core
        self.tls = tls
        self.scheme = b"https" if tls else b"http"
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.buffer = b""
        self.ex: Exchange | None = None
        self.closed = False
        # One timer per connection, for every deadline (idle, read, total): it is re-armed only
        # when a deadline comes earlier than the one it waits for, and when it fires it checks
        # the real deadlines. A request therefore costs no timer operations (~5 us each).
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when = 0.0
        self.idle_since = 0.0
        self._paused_for_upstream = False  # upstream write buffer full (request body backpressure)
        self._paused_waiting = False  # a request is being served; later bytes wait
        self._reading_paused = False
        self._writing_paused = False

    # -- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "unix"
        transport.set_write_buffer_limits(_HIGH_WATER)  # type: ignore[attr-defined]
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
            self._finish(ex, reusable=False)

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
        except Exception:  # a bug must cost one connection and a log line, never a traceback
            log.exception("http_proxy: internal error on a client connection")
            self._internal_error()

    def _internal_error(self) -> None:
        ex = self.ex
        if ex is not None and not ex.finished:
            self._fail(ex, 500, "internal error")
        elif self.transport and not self.closed:
            self.transport.abort()

    def _data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is not None:
            if ex.tunnel:
                ex.upstream.transport.write(data)  # type: ignore[union-attr]
                ex.bytes_in += len(data)
                return
            framer = ex.req_framer
            if framer is not None and not framer.done and ex.upstream is not None and not self.buffer:
                self._forward_body(ex, data)
                return
            self.buffer += data
            if len(self.buffer) > _HIGH_WATER:  # pipelined or early bytes wait, up to a limit
                self._paused_waiting = True
                self._update_reading()
            return
        self.buffer += data
        self._next_request()

    def eof_received(self) -> bool | None:
        ex = self.ex
        if ex is not None and ex.tunnel and ex.upstream and ex.upstream.transport:
            if ex.upstream.transport.can_write_eof():
                ex.upstream.transport.write_eof()
            return True  # half-close: the upstream may still answer
        return None

    # -- reading requests ----------------------------------------------------------------------

    def _update_reading(self) -> None:
        want_paused = self._paused_for_upstream or self._paused_waiting
        if want_paused != self._reading_paused and self.transport and not self.closed:
            self._reading_paused = want_paused
            if want_paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

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
        cfg = ex.route.config
        if cfg.total_timeout and now >= ex.started + cfg.total_timeout:
            self._fail(ex, 504, "upstream did not complete the response in time")
        elif cfg.read_timeout and now >= ex.last_io + cfg.read_timeout:
            if self._writing_paused or (ex.splicer is not None and ex.splicer.writing):
                ex.last_io = now  # the client is the slow one: the upstream waits for it
                self._watch(ex)
            else:
                self._fail(ex, 504, "upstream did not answer in time")
        else:
            self._watch(ex)

    def _next_request(self) -> None:
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > h1.MAX_HEAD:
                self._reply_and_close(431, "request head too large")
            return
        if self.core.stopping:
            self.transport.close()  # type: ignore[union-attr]
            return
        head = buffer[:end]
        self.buffer = buffer[end + 4:]
        try:
            line, headers = h1.split_head(head)
            method, raw_target, version = h1.parse_request_line(line)
            length = h1.body_length(headers)
        except ProtocolError as exc:
            self._reply_and_close(exc.status, str(exc))
            return
        self._dispatch(method, raw_target, version, headers, length)

    def _dispatch(self, method: bytes, raw_target: bytes, version: bytes,
                  headers: list[tuple[bytes, bytes, bytes]], length: int | None) -> None:
        host = authorization = connection = upgrade = cookie = None
        for name, value, _ in headers:
            if name == b"host":
                host = value
            elif name == b"authorization":
                authorization = value
            elif name == b"connection":
                connection = value.lower()
            elif name == b"cookie":
                cookie = value if cookie is None else cookie + b"; " + value
        keep_alive = (b"close" not in connection) if connection else version == b"HTTP/1.1"
        if version != b"HTTP/1.1" and not (connection and b"keep-alive" in connection):
            keep_alive = False
        # A reply before the body was read cannot keep the connection: the body is unread.
        early = keep_alive and not length
        try:
            target = raw_target.decode("ascii")
        except UnicodeDecodeError:
            self._reply_and_close(400, "request target must be ASCII")
            return
        if target[0] != "/":
            if target.startswith(("http://", "https://")):  # absolute form: use its path
                rest = target.split("//", 1)[1]
                slash = rest.find("/")
                target = rest[slash:] if slash >= 0 else "/"
            else:
                self._reply_and_close(400, "request target must be an absolute path")
                return
        hostname = _hostname(host)
        if target == "/.well-known/relayd" and method in (b"GET", b"HEAD"):
            self._reply(200, self.router.discovery(hostname), early)
            return
        if self.router.browser_paths:
            method_obj = self.router.browser_paths.get(target.split("?", 1)[0])
            if method_obj is not None:
                self.ex = None
                self._paused_waiting = True  # one request at a time while Globus is asked
                self._update_reading()
                self._spawn(self._browser_endpoint(method_obj, target, cookie, early))
                return
        route = self.router.find(hostname, target)
        if route is None:
            self._reply(404, json_message("no service at this address"), early)
            return
        if has_dot_segment(target):
            self._reply_and_close(400, "'.' and '..' path segments are not allowed")
            return
        cfg = route.config
        if not self.tls and cfg.redirect_https and route.https_port:
            port = "" if route.https_port == 443 else f":{route.https_port}"
            location = f"https://{hostname or route.default_host}{port}{target}".encode()
            self._reply(308, b"", early, [b"Location: " + location])
            return
        if length is not None and length > 0 and cfg.max_body and length > cfg.max_body:
            self._reply_and_close(413, f"request body larger than {cfg.max_body} bytes")
            return
        if connection and b"upgrade" in connection:
            for name, value, _ in headers:
                if name == b"upgrade":
                    upgrade = value
            if upgrade is not None and not cfg.websocket:
                self._reply(501, json_message("WebSocket is not enabled for this service"), early)
                return
        ex = Exchange(route, method, target, keep_alive)
        ex.upgrade = upgrade
        ex.connection = connection
        ex.http10 = version == b"HTTP/1.0"
        ex.req_framer = Framer(length) if length else None
        ex.started = self.core.loop.time()
        self.ex = ex
        if route.browser:
            identity = route.auth.session_identity(cookie)  # type: ignore[attr-defined]
            if identity is None:
                self.ex = None
                if method in (b"GET", b"HEAD"):
                    where = (host or route.default_host.encode()).decode("latin-1")
                    location, cookies = route.auth.start_login(self.scheme.decode(), where, target)  # type: ignore[attr-defined]
                    self._reply(302, b"", early, [b"Location: " + location.encode(), *cookies])
                else:
                    self._reply(401, json_message("log in with a web browser first"), early)
                return
        else:
            identity = route.cached_identity(authorization)
        if identity is None:
            self._spawn(self._slow_path(ex, headers, host, authorization))
            return
        if not self._authorize(ex, identity):
            return
        conn = route.pool_get()
        if conn is None:
            self._spawn(self._connect_and_send(ex, headers, host))
            return
        ex.reused = True
        self._send(ex, conn, headers, host)

    async def _slow_path(self, ex: Exchange, headers: list, host: bytes | None,
                         authorization: bytes | None) -> None:
        try:
            identity = await ex.route.authenticate(authorization)
        except AuthError as exc:
            status = _AUTH_STATUS[exc.reason]
            extra = []
            challenge = ex.route.auth.challenge() if status == 401 else None
            if challenge:
                extra.append(b"WWW-Authenticate: " + challenge.encode())
            ex.route.core.counters.rejected(ex.route.name)
            self._reply(status, json_message(exc.message), ex.keep_alive, extra)
            return
        except Exception:
            log.exception("auth method %s failed", ex.route.auth.name)
            self._reply(503, json_message("authentication is unavailable"), ex.keep_alive)
            return
        if self.closed or not self._authorize(ex, identity):
            return
        conn = ex.route.pool_get()
        if conn is None:
            await self._connect_and_send(ex, headers, host)
        else:
            ex.reused = True
            self._send(ex, conn, headers, host)

    async def _browser_endpoint(self, method: Any, target: str, cookie: bytes | None, keep_alive: bool) -> None:
        from urllib.parse import parse_qsl

        path, _, query = target.partition("?")
        try:
            if path == method.config.login_path:
                status, text, headers = await method.finish_login(dict(parse_qsl(query)), cookie)
            else:
                status, text, headers = 200, "logged out", await method.logout(cookie)
        finally:
            self._paused_waiting = False
            self._update_reading()
        if status == 302:
            self._reply(302, b"", keep_alive, [b"Location: " + text.encode(), *headers])
        else:
            self._reply(status, json_message(text), keep_alive, headers)

    def _spawn(self, coro: Any) -> None:
        task = self.core.loop.create_task(coro)
        self.core.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.core.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("http_proxy: internal error", exc_info=task.exception())
            self._internal_error()

    def _authorize(self, ex: Exchange, identity: Identity) -> bool:
        route = ex.route
        user = identity.username or identity.sub
        if route.config.members_only and not identity.anonymous and (route.name, user) not in route.core.members:
            route.core.counters.rejected(route.name)
            self._reply(403, json_message(f"user {user!r} may not use service {route.name!r}"), ex.keep_alive)
            return False
        ex.identity = identity
        ex.user = ANONYMOUS if identity.anonymous else user
        ex.counted = True
        return True

    async def _connect(self, ex: Exchange) -> UpstreamConnection | None:
        """A new upstream connection, or None after answering 502/504 (or if the client left)."""
        try:
            conn = await ex.route.connect()
        except asyncio.TimeoutError:
            self._fail(ex, 504, "upstream connect timed out")
            return None
        except (OSError, ssl.SSLError) as exc:
            self._fail(ex, 502, f"upstream refused the connection: {_oserror(exc)}")
            return None
        if self.closed:
            conn.drop()
            return None
        return conn

    async def _connect_and_send(self, ex: Exchange, headers: list, host: bytes | None) -> None:
        conn = await self._connect(ex)
        if conn is not None:
            self._send(ex, conn, headers, host)

    # -- sending the request upstream ------------------------------------------------------------

    def _send(self, ex: Exchange, conn: UpstreamConnection, headers: list, host: bytes | None) -> None:
        route = ex.route
        cfg = route.config
        out = [b"%s %s HTTP/1.1" % (ex.method, map_target(route.prefix, ex.target, route.to_path).encode())]
        strip = route.strip_headers
        if ex.connection is not None:
            tokens = {t.strip() for t in ex.connection.split(b",")} - _CONNECTION_KEYWORDS
            if tokens:  # headers the client declared hop-by-hop
                strip = strip | tokens
        xff = fwd = None
        for name, value, line in headers:
            if name in strip or (b"_" in name and name.replace(b"_", b"-") in strip):
                if name == b"x-forwarded-for":
                    xff = value if xff is None else xff + b", " + value
                elif name == b"forwarded":
                    fwd = value if fwd is None else fwd + b", " + value
                elif name == b"authorization" and cfg.pass_credentials:
                    out.append(line)
                elif name == b"cookie":
                    prefixes = route.cookie_prefixes
                    kept = b"; ".join(p for p in (c.strip() for c in value.split(b";"))
                                      if p and not p.startswith(prefixes))
                    if kept:
                        out.append(b"Cookie: " + kept)
                continue
            out.append(line)
        peer = self.peer.encode()
        out.append(b"Host: " + (host if (cfg.preserve_host and host) else route.host_header))
        out.append(b"X-Forwarded-For: " + (xff + b", " + peer if xff else peer))
        if host:
            out.append(b"X-Forwarded-Host: " + host)
        out.append(b"X-Forwarded-Proto: " + self.scheme)
        node = b'"[%s]"' % peer if b":" in peer else peer
        this = b"for=" + node + (b";host=" + _quote(host) if host else b"") + b";proto=" + self.scheme
        out.append(b"Forwarded: " + (fwd + b", " + this if fwd else this))
        identity = ex.identity
        if identity is not None and not identity.anonymous:
            out.append(route.user_header + _header_value(ex.user))
            if identity.email:
                out.append(route.email_header + _header_value(identity.email))
        if ex.req_framer is not None and ex.req_framer.chunked:
            out.append(b"Transfer-Encoding: chunked")
        if ex.upgrade is not None:
            out.append(b"Connection: Upgrade")
            out.append(b"Upgrade: " + ex.upgrade)
        ex.head = b"\r\n".join(out) + b"\r\n\r\n"
        self._attach(ex, conn)

    def _attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        ex.upstream = conn
        conn.client = self
        conn.ex = ex
        transport = conn.transport
        assert transport is not None
        if self._writing_paused:
            transport.pause_reading()
        ex.last_io = self.core.loop.time()
        self._watch(ex)
        transport.write(ex.head)
        framer = ex.req_framer
        if framer is not None and not framer.done:
            pending, self.buffer = self.buffer, b""
            if pending:
                self._forward_body(ex, pending)
            if not self.closed and not framer.done and self._paused_waiting:
                self._paused_waiting = False
                self._update_reading()

    def _forward_body(self, ex: Exchange, data: bytes) -> None:
        framer = ex.req_framer
        assert framer is not None
        try:
            n = framer.feed(data)
        except ProtocolError as exc:
            self._fail(ex, exc.status, str(exc))
            return
        ex.bytes_in += n
        limit = ex.route.config.max_body
        if limit and ex.bytes_in > limit:
            self._fail(ex, 413, f"request body larger than {limit} bytes")
            return
        ex.last_io = self.core.loop.time()
        upstream = ex.upstream.transport  # type: ignore[union-attr]
        if n == len(data):
            upstream.write(data)
        else:
            upstream.write(data[:n])
            self.buffer = data[n:] + self.buffer
        if framer.done:
            if ex.resp_framer is not None and ex.resp_framer.done:
                self._finish(ex, reusable=True)

    # -- timers ----------------------------------------------------------------------------------

    def _watch(self, ex: Exchange) -> None:
        cfg = ex.route.config
        when = ex.last_io + cfg.read_timeout if cfg.read_timeout else None
        if cfg.total_timeout:
            total = ex.started + cfg.total_timeout
            when = total if when is None else min(when, total)
        if when is not None:
            self._wake_at(when)

    # -- responses -------------------------------------------------------------------------------

    def _reply(self, status: int, body: bytes, keep_alive: bool, headers: list[bytes] | None = None,
               content_type: bytes = b"application/json") -> None:
        """A response of the proxy's own, before anything was forwarded."""
        if self.closed:
            return
        ex = self.ex
        # A body the client started sending cannot be skipped reliably: close after the reply.
        if ex is not None and ex.req_framer is not None and not ex.req_framer.done:
            keep_alive = False
        self.transport.write(simple_response(status, body, headers, not keep_alive, content_type))  # type: ignore[union-attr]
        if ex is not None:
            ex.status = status
            ex.bytes_out += len(body)
            self._finish(ex, reusable=False, keep_client=keep_alive)
        elif keep_alive:
            self._mark_idle()
            if self.buffer:
                self._next_request()
        else:
            self.transport.close()  # type: ignore[union-attr]

    def _reply_and_close(self, status: int, message: str) -> None:
        self._reply(status, json_message(message), False)

    def _fail(self, ex: Exchange, status: int, message: str) -> None:
        """The exchange failed: answer with status if nothing was sent yet, else cut."""
        if ex.finished:
            return
        if status >= 500:
            log.info("%s %s %s: %d %s", ex.route.name, ex.method.decode(), ex.target[:200], status, message)
        if ex.status == 0 and not self.closed:
            if ex.upstream is not None:
                ex.upstream.drop()
            self._reply(status, json_message(message), False)
        else:
            self._abort(ex)

    def _abort(self, ex: Exchange) -> None:
        if ex.upstream is not None:
            ex.upstream.drop()
        if not ex.finished:
            self._finish(ex, reusable=False, keep_client=False)
        if self.transport and not self.closed:
            self.transport.abort()

    def response_head(self, ex: Exchange, status: int, line: bytes,
                      headers: list[tuple[bytes, bytes, bytes]]) -> Framer | None:
        """Forward an upstream response head; returns the body framer (None: 1xx or 101)."""
        route = ex.route
        conn_tokens = b""
        length: int | None = None
        for name, value, _ in headers:
            if name == b"connection":
                conn_tokens = value.lower()
        if 100 <= status < 200 and status != 101:
            out = [b"HTTP/1.1" + line[8:]]
            out += [raw for name, _, raw in headers if name not in HOP_BY_HOP]
            self.transport.write(b"\r\n".join(out) + b"\r\n\r\n")  # type: ignore[union-attr]
            return None
        ex.status = status
        if status == 101:
            if ex.upgrade is None:
                raise ProtocolError("upstream switched protocols without being asked", 502)
            out = [b"HTTP/1.1" + line[8:]]
            out += [raw for name, _, raw in headers if name not in HOP_BY_HOP]
            out += [b"Connection: Upgrade", b"Upgrade: " + ex.upgrade]
            self.transport.write(b"\r\n".join(out) + b"\r\n\r\n")  # type: ignore[union-attr]
            ex.tunnel = True
            ex.resp_keep_alive = False
            if self._paused_waiting:
                self._paused_waiting = False
                self._update_reading()
            pending, self.buffer = self.buffer, b""
            if pending:
                ex.upstream.transport.write(pending)  # type: ignore[union-attr]
                ex.bytes_in += len(pending)
            return None
        if ex.head_request or status in _NO_BODY_STATUS:
            length = 0
        else:
            length = h1.body_length(headers)
        ex.resp_keep_alive = b"close" not in conn_tokens and length is not None and not line.startswith(b"HTTP/1.0")
        out = [b"HTTP/1.1" + line[8:]]
        drop = HOP_BY_HOP
        if conn_tokens:
            drop = HOP_BY_HOP | {t.strip() for t in conn_tokens.split(b",")}
        for name, _, raw in headers:
            if name not in drop:
                out.append(raw)
        dechunk = length == -1 and ex.http10
        if length == -1 and not dechunk:
            out.append(b"Transfer-Encoding: chunked")
        if dechunk:  # an HTTP/1.0 client reads the payload until the connection closes
            ex.keep_alive = False
        if self.tls and route.hsts:
            out.append(route.hsts)
        if length is None or not ex.keep_alive:
            ex.keep_alive = False
            out.append(b"Connection: close")
        out.append(b"\r\n")
        ex.resp_head = b"\r\n".join(out)  # written together with the first body bytes
        return Framer(length, until_close=True, dechunk=dechunk)

    def response_body(self, ex: Exchange, data: bytes) -> None:
        ex.bytes_out += len(data)
        self.transport.write(data)  # type: ignore[union-attr]

    def response_done(self, ex: Exchange) -> None:
        framer = ex.req_framer
        if framer is not None and not framer.done:
            # The upstream answered before reading the whole request body: the rest of the
            # body cannot be skipped safely, so neither connection is reused.
            ex.keep_alive = False
            self._finish(ex, reusable=False, keep_client=False)
            return
        self._finish(ex, reusable=ex.resp_keep_alive)

    def upstream_lost(self, ex: Exchange, exc: Exception | None) -> None:
        if ex.finished:
            return
        if ex.tunnel:
            self._finish(ex, reusable=False, keep_client=False)
            if self.transport and not self.closed:
                self.transport.close()
            return
        framer = ex.resp_framer
        if framer is not None and framer.until_close:
            ex.keep_alive = False
            self._finish(ex, reusable=False, keep_client=False)
            if self.transport and not self.closed:
                self.transport.close()
            return
        if ex.status == 0 and ex.reused and ex.bytes_in == 0 and ex.req_framer is None:
            # A pooled connection closed by the upstream just as it was reused: retry once.
            ex.upstream = None
            ex.reused = False
            self._spawn(self._retry(ex))
            return
        self._fail(ex, 502, "upstream closed the connection" + (f": {_oserror(exc)}" if exc else ""))

    async def _retry(self, ex: Exchange) -> None:
        conn = await self._connect(ex)
        if conn is not None:
            self._attach(ex, conn)

    def _maybe_splice(self, ex: Exchange, conn: UpstreamConnection, framer: Framer) -> None:
        """Hand the rest of a large fixed-length body to splice(2) when both ends allow it."""
        if (framer.remaining >= splice.MIN_BODY and self.core.splice and not framer.chunked
                and not framer.until_close and not self.tls and not ex.route.tls and ex.splicer is None
                and not self.closed and self.transport.get_write_buffer_size() == 0):  # type: ignore[union-attr]
            try:
                ex.splicer = splice.Splicer(self, conn, ex, framer.remaining)
            except OSError as exc:  # e.g. out of file descriptors: the copying path still works
                log.debug("splice unavailable: %s", exc)

    def _finish(self, ex: Exchange, reusable: bool, keep_client: bool | None = None) -> None:
        if ex.splicer is not None:
            ex.splicer.cancel()
        ex.finished = True
        if ex.counted:
            self.core.counters.record(ex.route.name, ex.user, ex.endpoint, ex.bytes_in, ex.bytes_out, ex.status)
        conn = ex.upstream
        if conn is not None:
            conn.client = None
            conn.ex = None
            if reusable and not ex.tunnel:
                ex.route.pool_put(conn)
            else:
                conn.drop()
        self.ex = None
        keep = ex.keep_alive if keep_client is None else keep_client
        # The upstream connection is detached: its flow-control callbacks no longer reach us.
        self._paused_for_upstream = False
        if self.closed:
            return
        if not keep:
            self.transport.close()  # type: ignore[union-attr]
            return
        self._paused_waiting = False
        self._update_reading()
        if self.buffer:
            self._next_request()
        else:
            self._mark_idle()


class UpstreamConnection(asyncio.Protocol):
    """A connection to an upstream; pooled between exchanges."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.ex: Exchange | None = None
        self.buffer = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(_HIGH_WATER)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        client, ex = self.client, self.ex
        self.client = self.ex = None
        if client is not None and ex is not None:
            client.upstream_lost(ex, exc)

    def drop(self) -> None:
        self.client = self.ex = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def pause_writing(self) -> None:
        client = self.client
        if client is not None:
            client._paused_for_upstream = True
            client._update_reading()

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            client._paused_for_upstream = False
            client._update_reading()

    def data_received(self, data: bytes) -> None:
        try:
            self._data_received(data)
        except Exception:
            log.exception("http_proxy: internal error on an upstream connection")
            client = self.client
            self.drop()
            if client is not None:
                client._internal_error()

    def _data_received(self, data: bytes) -> None:
        ex = self.ex
        client = self.client
        if ex is None or client is None:
            self.drop()  # an idle connection must not talk
            return
        ex.last_io = client.core.loop.time()
        if ex.tunnel:
            ex.bytes_out += len(data)
            client.transport.write(data)  # type: ignore[union-attr]
            return
        framer = ex.resp_framer
        if framer is not None:
            try:
                n = framer.feed(data)
            except ProtocolError as exc:
                client._fail(ex, 502, str(exc))
                return
            if framer.payload is not None:  # de-chunking for an HTTP/1.0 client
                piece, framer.payload = b"".join(framer.payload), []
                if piece:
                    client.response_body(ex, piece)
            elif n:
                client.response_body(ex, data if n == len(data) else data[:n])
            if framer.done:
                if n < len(data):
                    ex.resp_keep_alive = False  # junk after the response
                client.response_done(ex)
            elif framer.remaining >= splice.MIN_BODY:
                client._maybe_splice(ex, self, framer)
            return
        self._read_head(ex, client, self.buffer + data if self.buffer else data)

    def _read_head(self, ex: Exchange, client: ClientConnection, data: bytes) -> None:
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > h1.MAX_HEAD:
                    client._fail(ex, 502, "upstream response head too large")
                else:
                    self.buffer = data
                return
            self.buffer = b""
            try:
                line, headers = h1.split_head(data[:end])
                status = h1.parse_status_line(line)
                framer = client.response_head(ex, status, line, headers)
            except ProtocolError as exc:
                client._fail(ex, 502, f"invalid response from upstream: {exc}")
                return
            rest = data[end + 4:]
            if framer is None:
                if ex.tunnel:
                    if rest:
                        ex.bytes_out += len(rest)
                        client.transport.write(rest)  # type: ignore[union-attr]
                    return
                data = rest  # after a 1xx interim response comes the real one
                continue
            ex.resp_framer = framer
            head, ex.resp_head = ex.resp_head, b""
            try:
                n = framer.feed(rest) if rest else 0
            except ProtocolError as exc:
                client._fail(ex, 502, str(exc))
                return
            if framer.payload is not None:  # de-chunking for an HTTP/1.0 client
                payload, framer.payload = b"".join(framer.payload), []
                ex.bytes_out += len(payload)
                client.transport.writelines((head, payload))  # type: ignore[union-attr]
                if framer.done:
                    if n < len(rest):
                        ex.resp_keep_alive = False
                    client.response_done(ex)
                return
            # One write for head and body: on loopback every send costs as much as the parsing.
            if n:
                ex.bytes_out += n
                client.transport.writelines((head, rest if n == len(rest) else rest[:n]))  # type: ignore[union-attr]
            else:
                client.transport.write(head)  # type: ignore[union-attr]
            if framer.done:
                if n < len(rest):
                    ex.resp_keep_alive = False
                client.response_done(ex)
            elif framer.remaining >= splice.MIN_BODY:
                client._maybe_splice(ex, self, framer)
            return


def _hostname(host: bytes | None) -> str:
    if not host:
        return ""
    text = host.decode("ascii", "replace").lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _quote(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _header_value(value: str) -> bytes:
    # Identity values come from auth methods; never let them break the header framing.
    return value.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")


def _oserror(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def monotonic() -> float:
    return time.monotonic()


__all__ = ["ClientConnection", "UpstreamConnection", "Exchange", "matches", "Any"]
