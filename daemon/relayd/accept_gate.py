"""Connection caps per listener: at ``max_connections`` stop accepting, resume when some close.

Every client connection costs file descriptors: one for the client, one more for the upstream
of an http_proxy exchange, four more (a pipe and two dups) while a splice moves a large body.
Without a cap, idle connections exhaust RLIMIT_NOFILE and then everything in the process fails
with EMFILE: the other listeners (a status component's /healthz), the control socket, upstream
connections, the state databases. With a cap, a listener at its limit just stops calling
accept(): new connections wait in the kernel's listen backlog, neither accepted-and-closed nor
refused, and are accepted in arrival order as connections close.

How. Components serve on dups of the listening sockets (``Listener.serving_sockets()``). A
:class:`GatedServer` is one component's asyncio servers on one listener; the listener's
:class:`AcceptGate` counts the connections of all the GatedServers on it (a reload may have an
old and a new component serving it) and, at the limit, closes their servers, i.e. only their
dups: the listening socket in the daemon's pool keeps its backlog. When a connection closes
below the limit, each GatedServer makes a new server on a fresh dup.

Exactness. On uvloop (relayd's loop) the protocol factory runs inside the accept callback, one
accept per readiness event of a listening fd, and the gate closes the servers (``call_soon``)
before the loop polls again: a listener never exceeds its limit, except by at most one connection
per *other* listening fd of the same listener ready in that same poll (several fds of one
``fd_name``, or an old and a new component during a reload). The default asyncio loop accepts up
to ``backlog`` connections per readiness event before any protocol factory runs, so there a burst
may overshoot; relayd does not run on it.

Counting. A connection counts from its protocol factory call until it closes. A plain
connection's protocol reports its close through ``attach(protocol, release)``; the default
(:func:`set_on_closed`) sets the protocol's ``on_closed`` attribute, which the protocol must call
once from ``connection_lost``. For TLS the gate puts its own TLS layer (the loop's SSLProtocol)
between the transport and the component's protocol and counts the raw connection: a component's
protocol never hears of a connection whose handshake failed, which would otherwise keep its slot.

The default limit. See :func:`relayd.fd_limits.plan_limits` and relayd.toml(5), LISTENERS.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import sys
import time
from asyncio import sslproto
from collections.abc import Callable, Iterable
from typing import Any, Protocol

# The limits themselves live in relayd.fd_limits; imported from here by older code and tests.
from relayd.fd_limits import RESERVED_FDS, LimitPlan, nofile_limit, plan_limits, raise_nofile_limit

log = logging.getLogger("relayd.listeners")

UNLIMITED = sys.maxsize
RETRY_DELAY = 1.0  # seconds before trying again to accept after a failure (e.g. EMFILE on dup)

Release = Callable[[], None]
Attach = Callable[[Any, Release], None]


# -- the gate ----------------------------------------------------------------------------------

_TCP_INFO = getattr(socket, "TCP_INFO", None)


def backlog_length(sockets: Iterable[socket.socket]) -> int | None:
    """Connections waiting in the accept queues of listening TCP sockets (None if unknown).

    Linux reports a listening socket's queue length in tcp_info.tcpi_unacked (what `ss -lt`
    shows as Recv-Q).
    """
    total = None
    for sock in sockets:
        if _TCP_INFO is None or sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.fileno() < 0:
            continue
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 32)
        except OSError:
            continue
        if len(info) >= 28:
            total = (total or 0) + struct.unpack_from("I", info, 24)[0]
    return total


class AcceptGate:
    """The connection count and cap of one listening socket (set), shared by its servers.

    Lives as long as the listening sockets (in the daemon's SocketPool), across generations;
    a reload changes the limit in place.
    """

    def __init__(self, name: str, limit: int = UNLIMITED, sockets: list[socket.socket] | None = None) -> None:
        self.name = name
        self.limit = limit
        self.sockets = sockets or []  # the pool's listening sockets: their backlog length
        self.open = 0
        self.paused = False  # at the limit: the servers are (being) closed
        self.reached = 0  # episodes of reaching the limit (relayd_listener_limit_reached_total)
        self.servers: set[GatedServer] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._apply_pending = False
        self._episode_since: float | None = None
        self._waited: int | None = None  # most connections seen waiting in this episode

    @property
    def enforced(self) -> bool:
        """True once a component counts its connections here (stream components do not)."""
        return self._loop is not None

    @property
    def low_water(self) -> int:
        """An episode at the limit ends when open connections drop to this (10% below) and no
        connection waits in the backlog (when its length is known: TCP on Linux); until then,
        accepting resumes and pauses again without a log line each time."""
        return self.limit - max(1, self.limit // 10)

    def set_limit(self, limit: int, name: str | None = None) -> None:
        if name:
            self.name = name
        if limit != self.limit:
            self.limit = limit
            self._update()

    def acquire(self) -> Release:
        """Count a new connection; the returned function (idempotent) uncounts it."""
        self.open += 1
        if self.open >= self.limit and not self.paused:
            self._update()
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.open -= 1
            if self.paused or self._episode_since is not None:
                self._update()

        return release

    def _update(self) -> None:
        full = self.open >= self.limit
        if full != self.paused:
            self.paused = full
            self._schedule_apply()
        if full:
            if self._episode_since is None:
                self._begin_episode()
        elif self._episode_since is not None:
            waiting = self._note_waiting()
            if self.open <= self.low_water and not waiting:
                self._end_episode()

    def _schedule_apply(self) -> None:
        # Deferred: the protocol factory runs inside uvloop's accept callback, where closing the
        # server would close the connection being accepted. call_soon still runs before the
        # loop polls (and so accepts) again.
        if self._apply_pending or self._loop is None or self._loop.is_closed():
            return
        self._apply_pending = True
        self._loop.call_soon(self._apply)

    def _apply(self) -> None:
        self._apply_pending = False
        for server in list(self.servers):
            if self.paused:
                server._stop_serving()
            else:
                server._start_serving()

    def _register(self, server: GatedServer, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.servers.add(server)

    def _unregister(self, server: GatedServer) -> None:
        self.servers.discard(server)

    # -- episodes: one warning when the limit is reached, one info line when it is left ---------

    def _begin_episode(self) -> None:
        self._episode_since = time.monotonic()
        self._waited = None
        self.reached += 1
        self._note_waiting()
        log.warning("listener %s: %d connections open, its max_connections (%d): not accepting "
                    "until some close (new connections wait in the listen backlog)",
                    self.name, self.open, self.limit)

    def _note_waiting(self) -> int | None:
        waiting = backlog_length(self.sockets)
        if waiting is not None:
            self._waited = max(self._waited or 0, waiting)
        return waiting

    def _end_episode(self) -> None:
        since, self._episode_since = self._episode_since, None
        assert since is not None
        waited = "" if self._waited is None else f"; up to {self._waited} connection(s) waited in the backlog"
        log.info("listener %s: accepting again (%d connections open) after %.1fs at max_connections (%d)%s",
                 self.name, self.open, time.monotonic() - since, self.limit, waited)

    def status(self) -> dict[str, Any]:
        return {"connections": self.open if self.enforced else None,
                "max_connections": self.limit, "accepting": not self.paused}


def set_on_closed(protocol: Any, release: Release) -> None:
    """The default ``attach``: the protocol calls ``on_closed()`` once from connection_lost."""
    protocol.on_closed = release


class GatedListener(Protocol):
    """What a gated server needs of a listener (relayd.listeners.Listener has this shape)."""

    gate: AcceptGate | None

    def serving_sockets(self) -> list[socket.socket]: ...

    @property
    def backlog(self) -> int: ...


# -- one component's servers on one listener -----------------------------------------------------

def _counted_tls(base: type) -> type:
    class CountedTLS(base):
        """The loop's TLS layer, releasing its slot when the raw connection closes."""

        release: Release

        def connection_lost(self, exc: BaseException | None) -> None:
            try:
                super().connection_lost(exc)
            finally:
                self.release()

    return CountedTLS


_AsyncioTLS = _counted_tls(sslproto.SSLProtocol)
_UvloopLoop: type | None
_UvloopTLS: type | None
try:
    import uvloop
    from uvloop import loop as _uvloop_loop
except ImportError:  # pragma: no cover - uvloop is a dependency
    _UvloopLoop = _UvloopTLS = None
else:
    _UvloopLoop = uvloop.Loop
    # uvloop's stubs do not declare its TLS layer, a Cython class of uvloop.loop.
    _UvloopTLS = _counted_tls(vars(_uvloop_loop)["SSLProtocol"])


def _tls_class(loop: asyncio.AbstractEventLoop) -> type:
    if _UvloopLoop is not None and _UvloopTLS is not None and isinstance(loop, _UvloopLoop):
        return _UvloopTLS
    return _AsyncioTLS


class GatedServer:
    """A component's asyncio servers on every socket of a listener, paused by its gate.

    Use like an asyncio server: ``await start()``, then ``close()`` to stop accepting for good
    (connections already accepted stay, and keep counting until they close).
    """

    def __init__(self, listener: GatedListener, protocol_factory: Callable[[], Any], *,
                 ssl: ssl.SSLContext | None = None, attach: Attach = set_on_closed,
                 ssl_handshake_timeout: float | None = None) -> None:
        gate = listener.gate
        assert gate is not None
        self.gate: AcceptGate = gate
        self.listener = listener
        self.protocol_factory = protocol_factory
        self.ssl = ssl
        self.attach = attach
        self.ssl_handshake_timeout = ssl_handshake_timeout
        self.servers: list[asyncio.Server] = []
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tls_class: type | None = None
        self._epoch = 0  # bumped by every stop: an open in progress must not keep its servers
        self._opening: asyncio.Task | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._failing = False  # reopening failed: logged once until it works again

    async def start(self) -> None:
        """Start serving (unless the listener is at its limit); errors propagate."""
        self._loop = asyncio.get_running_loop()
        self._tls_class = _tls_class(self._loop)
        self.gate._register(self, self._loop)
        if self.gate.paused:
            return
        try:
            await self._open(self._epoch)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.closed = True
        self._stop_serving()
        self.gate._unregister(self)

    async def wait_closed(self) -> None:
        return None

    @property
    def sockets(self) -> list[Any]:
        return [sock for server in self.servers for sock in server.sockets]

    @property
    def is_serving(self) -> bool:
        return bool(self.servers)

    def _factory(self) -> Any:
        protocol = self.protocol_factory()
        release = self.gate.acquire()
        if self.ssl is None:
            try:
                self.attach(protocol, release)
            except BaseException:
                release()
                raise
            return protocol
        assert self._tls_class is not None
        layer = self._tls_class(self._loop, protocol, self.ssl, None, server_side=True,
                                ssl_handshake_timeout=self.ssl_handshake_timeout)
        layer.release = release
        return layer

    async def _open(self, epoch: int) -> None:
        assert self._loop is not None
        socks = self.listener.serving_sockets()
        for index, sock in enumerate(socks):
            if epoch != self._epoch:  # stopped meanwhile (the listener reached its limit again)
                for rest in socks[index:]:
                    rest.close()
                return
            try:
                server = await self._loop.create_server(self._factory, sock=sock,
                                                        backlog=self.listener.backlog)
            except BaseException:
                for rest in socks[index + 1:]:
                    rest.close()
                raise
            if epoch != self._epoch:
                server.close()
                continue
            self.servers.append(server)

    def _stop_serving(self) -> None:
        self._epoch += 1
        for server in self.servers:
            server.close()  # closes the dup only; connections already accepted stay
        self.servers.clear()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _start_serving(self) -> None:
        if self.closed or self.servers or self._opening is not None or self._retry is not None:
            return
        assert self._loop is not None
        self._opening = self._loop.create_task(self._reopen())

    async def _reopen(self) -> None:
        epoch = self._epoch
        try:
            await self._open(epoch)
        except Exception as exc:  # e.g. EMFILE on dup(): try again later rather than never
            self._stop_serving()
            if not self.closed:
                log.log(logging.DEBUG if self._failing else logging.ERROR,
                        "listener %s: cannot accept again: %s; retrying every %.0fs",
                        self.gate.name, exc, RETRY_DELAY)
                self._failing = True
                assert self._loop is not None
                self._retry = self._loop.call_later(RETRY_DELAY, self._retry_now)
        else:
            if self._failing and self.servers:
                self._failing = False
                log.info("listener %s: accepting again after the error above", self.gate.name)
        finally:
            self._opening = None
        if epoch != self._epoch and not self.closed and not self.gate.paused:
            self._start_serving()  # paused and resumed while opening: open again

    def _retry_now(self) -> None:
        self._retry = None
        if not self.gate.paused:
            self._start_serving()


async def serve_gated(listener: GatedListener, protocol_factory: Callable[[], Any], *,
                      ssl: ssl.SSLContext | None = None, attach: Attach = set_on_closed) -> GatedServer:
    """Serve `protocol_factory` on every socket of `listener`, under its connection cap."""
    server = GatedServer(listener, protocol_factory, ssl=ssl, attach=attach)
    await server.start()
    return server


__all__ = ["RESERVED_FDS", "UNLIMITED", "AcceptGate", "Attach", "GatedListener", "GatedServer", "LimitPlan",
           "Release", "backlog_length", "nofile_limit", "plan_limits", "raise_nofile_limit", "serve_gated",
           "set_on_closed"]
