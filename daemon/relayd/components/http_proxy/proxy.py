"""The proxy's asyncio shell for one client connection (the decisions are in ``core.py``).

Why not aiohttp's server and client: a request through both costs ~400 us of CPU here, about
the budget of three requests through this path. Protocols let bytes go from one transport to
the other without copies, tasks or intermediate objects, and flow control is direct: when one
side's write buffer fills, the other side stops reading (bodies are never buffered whole).

The fast path of a request (credentials verified recently, an idle upstream connection in the
pool) runs synchronously inside ``data_received``; only an auth check that must ask the auth
method, a browser login step, or a new upstream connection goes through a task.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any, cast

from relayd.auth.base import AuthError, AuthFailure
from relayd.logsetup import quote

from . import splice
from .core import ClientCore
from .upstream import oserror

if TYPE_CHECKING:
    from .exchange import Exchange
    from .routes import Router
    from .upstream import UpstreamConnection

log = logging.getLogger("relayd.http_proxy")

_AUTH_STATUS = {AuthFailure.MISSING: 401, AuthFailure.MALFORMED: 401, AuthFailure.INVALID: 401,
                AuthFailure.FORBIDDEN: 403, AuthFailure.UNAVAILABLE: 503}
HIGH_WATER = 1 << 20
LINGER = 5.0  # seconds a closing connection reads and drops what the client still sends


def access_line(logger: logging.Logger, ex: Exchange, peer: str, now: float) -> None:
    """One access-log line: who, which service, what, status, bytes, duration. The query
    string is left out (it may carry a token); so are every header and the credentials."""
    path = ex.target.partition("?")[0] if ex.target else ex.req.target.partition(b"?")[0].decode("latin-1")
    logger.info("client=%s user=%s service=%s method=%s path=%s status=%d bytes_in=%d bytes_out=%d "
                "duration=%.3f", peer, quote(ex.user or "-"), quote(ex.route.name if ex.route else "-"),
                quote(ex.req.method.decode("latin-1")), quote(path or "/"), ex.status, ex.bytes_in,
                ex.bytes_out, now - ex.started if ex.started else 0.0)


class ClientConnection(asyncio.Protocol):
    """A client connection on one listener: moves bytes and runs what its ``ClientCore`` asks."""

    def __init__(self, router: Router, tls: bool) -> None:
        self.router = router
        self.core = router.core  # what all connections of the component share
        self.tls = tls
        self.loop = self.core.loop
        self.now = self.loop.time  # ProxyIO.now, called without a Python frame of ours
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.state: ClientCore | None = None
        self.on_closed: Any = None  # called once when the connection is gone (accept limits)
        # One timer per connection, for every deadline (idle, read, total): it is re-armed only
        # when a deadline comes earlier than the one it waits for, and when it fires the core
        # checks the real deadlines. A request therefore costs no timer operations (~5 us each).
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when = 0.0
        self.lingering = False

    # -- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream protocol gets a stream transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "unix"
        self.transport.set_write_buffer_limits(HIGH_WATER)
        self.state = ClientCore(self.router, self, tls=self.tls, peer=self.peer)
        self.core.connections.add(self)
        self.state.mark_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.core.connection_gone(self)
            if self.timer:
                self.timer.cancel()
                self.timer = None
            if self.state is not None:
                self.state.client_lost()
        finally:  # the listener's connection slot is given back whatever happened
            callback, self.on_closed = self.on_closed, None
            if callback is not None:
                callback()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # read and dropped: the answer before it is already on its way
        try:
            self.state.client_data(data)  # type: ignore[union-attr]
        except Exception:  # a bug must cost one connection and a log line, never more
            log.exception("http_proxy: internal error on a client connection")
            self.internal_error()

    def eof_received(self) -> bool | None:
        if self.lingering:
            return False  # the client read the answer and is done: close
        ex = self.state.ex if self.state else None
        if ex is not None and ex.tunnel and ex.upstream and ex.upstream.transport:
            if ex.upstream.transport.can_write_eof():
                ex.upstream.transport.write_eof()
            return True  # half-close: the upstream may still answer
        return None

    def pause_writing(self) -> None:
        self.state.writing_paused = True  # type: ignore[union-attr]
        ex = self.state.ex  # type: ignore[union-attr]
        if ex and ex.upstream and ex.upstream.transport:
            ex.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.state.writing_paused = False  # type: ignore[union-attr]
        ex = self.state.ex  # type: ignore[union-attr]
        if ex is not None:
            ex.last_io = self.loop.time()  # upstream silence counts from when we read again
        if ex and ex.splicer is None and ex.upstream and ex.upstream.transport \
                and not ex.upstream.transport.is_closing():
            ex.upstream.transport.resume_reading()

    def internal_error(self) -> None:
        state = self.state
        ex = state.ex if state else None
        if ex is not None and not ex.finished:
            state.fail(ex, 500, "internal error")  # type: ignore[union-attr]
        elif self.transport and not self.transport.is_closing():
            self.transport.abort()

    def drain(self) -> None:
        if self.state is not None:
            self.state.drain()

    def handover(self, router: Router) -> bool:
        """Move an idle connection to the component replacing ours (a reload); False if busy."""
        state = self.state
        if state is None or not self.idle or state.closed or self.transport is None \
                or self.transport.is_closing():
            return False
        self.core.connection_gone(self)
        self.router = state.router = router
        self.core = router.core
        self.core.connections.add(self)
        state.mark_idle()  # the new component's keep-alive timeout
        return True

    @property
    def ex(self) -> Exchange | None:
        return self.state.ex if self.state else None

    @property
    def idle(self) -> bool:
        return self.state is None or (self.state.ex is None and not self.state.queue)

    # -- ProxyIO: what the core asks -----------------------------------------------------------

    def send(self, *parts: bytes) -> None:
        if len(parts) == 1:
            self.transport.write(parts[0])  # type: ignore[union-attr]
        else:
            self.transport.writelines(parts)  # type: ignore[union-attr]

    def close(self, linger: bool = False) -> None:
        transport = self.transport
        assert transport is not None
        if linger and transport.can_write_eof():
            # Like nginx's lingering close: send the answer and a FIN, then read and drop what
            # the client still sends for a while, so its kernel does not see a reset before it
            # could read the answer.
            transport.write_eof()
            transport.resume_reading()
            self.lingering = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.wake_at(self.loop.time() + LINGER)
        else:
            transport.close()

    def abort(self) -> None:
        self.transport.abort()  # type: ignore[union-attr]

    def set_reading(self, on: bool) -> None:
        if on:
            self.transport.resume_reading()  # type: ignore[union-attr]
        else:
            self.transport.pause_reading()  # type: ignore[union-attr]

    def wake_at(self, when: float) -> None:
        timer = self.timer
        if timer is not None:
            if self.timer_when <= when:
                return  # it fires earlier and will look at the real deadlines then
            timer.cancel()
        self.timer_when = when
        self.timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.lingering:
            self.transport.close()  # type: ignore[union-attr]
            return
        if self.state is not None:
            self.state.timer()

    def authenticate(self, ex: Exchange) -> None:
        self._spawn(self._authenticate(ex))

    async def _authenticate(self, ex: Exchange) -> None:
        route = ex.route
        assert route is not None and self.state is not None
        try:
            identity = await route.authenticate(ex.req.authorization)
        except AuthError as exc:
            status = _AUTH_STATUS[exc.reason]
            extra = []
            challenge = route.auth.challenge() if status == 401 else None
            if challenge:
                extra.append(b"WWW-Authenticate: " + challenge.encode())
            route.core.counters.rejected(route.name)
            self.state.auth_refused(ex, status, exc.message, extra)
            return
        except Exception:
            log.exception("auth method %s failed", route.auth.name)
            self.state.auth_refused(ex, 503, "authentication is unavailable", [])
            return
        self.state.auth_result(ex, identity)

    def browser_endpoint(self, ex: Exchange, method: Any, target: str) -> None:
        self._spawn(self._browser_endpoint(ex, method, target))

    async def _browser_endpoint(self, ex: Exchange, method: Any, target: str) -> None:
        from urllib.parse import parse_qsl

        from .admission import hostname_of

        path, _, query = target.partition("?")
        route = ex.route
        where = (ex.host or (route.default_host.encode() if route else b"")).decode("latin-1")
        scheme = "https" if self.tls else "http"
        if not where:
            where = hostname_of(ex.host)
        answer = await method.browser_step(path, dict(parse_qsl(query)), ex.req.cookie, scheme, where, target,
                                           self._home(ex, method, scheme, where))
        self.state.browser_reply(ex, answer)  # type: ignore[union-attr]

    def _home(self, ex: Exchange, method: Any, scheme: str, host: str) -> str:
        """Where a browser goes after signing in when it named no page: the page it came from on
        this origin (Referer), else the first service using this auth method on this listener."""
        from relayd.auth.globus_login import safe_return

        for lname, _, value in ex.req.headers:
            if lname == b"referer":
                back = safe_return(value.decode("latin-1"), scheme, host)
                if back and back.partition("?")[0] not in (method.config.login_path, method.config.logout_path):
                    return back
        for route in self.router.routes:
            if route.auth is method:
                return route.prefix.rstrip("/") + "/"
        return "/"

    def connect(self, ex: Exchange, pooled: bool) -> None:
        conn = ex.route.pool_get() if pooled else None  # type: ignore[union-attr]
        if conn is None:
            self._spawn(self._connect(ex))
        else:
            self._attach(ex, conn, reused=True)

    async def _connect(self, ex: Exchange) -> None:
        state = self.state
        assert state is not None
        try:
            conn = await ex.route.connect()  # type: ignore[union-attr]
        except TimeoutError:
            state.upstream_failed(ex, 504, "upstream connect timed out")
            return
        except (OSError, ssl.SSLError) as exc:
            state.upstream_failed(ex, 502, f"upstream refused the connection: {oserror(exc)}")
            return
        if state.closed or ex.finished:
            conn.drop()
            return
        self._attach(ex, conn, reused=False)

    def _attach(self, ex: Exchange, conn: UpstreamConnection, reused: bool) -> None:
        conn.client = self  # conn.attach(self, ex), inlined: once per request
        conn.ex = ex
        if self.state.writing_paused:  # type: ignore[union-attr]
            conn.transport.pause_reading()  # type: ignore[union-attr]
        self.state.upstream_ready(ex, conn, reused, conn.reader)  # type: ignore[union-attr]

    def send_upstream(self, ex: Exchange, *parts: bytes) -> None:
        transport = ex.upstream.transport
        if len(parts) == 1:
            transport.write(parts[0])
        else:
            transport.writelines(parts)

    def release_upstream(self, ex: Exchange, reusable: bool) -> None:
        if ex.splicer is not None:
            ex.splicer.cancel()
        conn: UpstreamConnection = ex.upstream
        conn.client = conn.ex = None  # conn.detach(), inlined: once per request
        if reusable:
            ex.route.pool_put(conn)  # type: ignore[union-attr]
        else:
            conn.drop()

    def splice(self, ex: Exchange, length: int) -> bool:
        """Hand the rest of a large fixed-length body to splice(2) when both ends allow it."""
        if (length >= splice.MIN_BODY and self.core.splice and not self.tls and not ex.route.tls  # type: ignore[union-attr]
                and self.transport.get_write_buffer_size() == 0):  # type: ignore[union-attr]
            try:
                ex.splicer = splice.Splicer(self, ex.upstream, ex, length)
                return True
            except OSError as exc:  # e.g. out of file descriptors: the copying path still works
                log.debug("splice unavailable: %s", exc)
        return False

    def record(self, ex: Exchange) -> None:
        core = self.core
        core.counters.record(ex.route.name, ex.user, ex.endpoint, ex.bytes_in, ex.bytes_out,  # type: ignore[union-attr]
                             ex.status)
        if core.access is not None:  # access_log = true
            access_line(core.access, ex, self.peer, self.loop.time())

    # -- tasks ---------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.core.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.core.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("http_proxy: internal error", exc_info=task.exception())
            self.internal_error()

