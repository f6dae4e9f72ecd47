"""The data plane: per session port, accept connections and pump each to its target.

The byte moving is `relayd.pump`'s; this module adds what belongs to a session: which target a
port dials (read at connect time, so an update re-targets new connections), the target policy
for names resolved late, the session's and the component's counters, and ending a session's
connections when it ends.

Two paths:
- threads (``splice = true``, the default): the port's listening socket is watched on the event
  loop; an accepted socket does its TLS handshake there if the role's side is TLS, is connected
  to its target with a non-blocking connect (and handshake), then both go to a pump with two
  threads per connection: `SplicePump` (splice(2)) when both are plain, `TlsPump` otherwise.
- the event loop (``splice = false``): asyncio server and ``create_connection`` (uvloop's SSL
  transport for TLS) joined by a `ProtocolPump`.
TLS: the PROD (inbound) side accepts mutual TLS from the other facility and connects in plain
text to its local application; the CONS (outbound) side accepts its local application in plain
text and connects with mutual TLS to the PROD side's listener.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import ssl
import threading
from typing import TYPE_CHECKING, Any

from relayd.pump import SPLICE_AVAILABLE, ProtocolPump, SplicePump, TokenBucket
from relayd.pump.tls import TlsEnd, TlsPump, handshake

if TYPE_CHECKING:
    from relayd.components.stream.model import Session

log = logging.getLogger("relayd.stream.data")

ACCEPTS_PER_WAKEUP = 64  # bounded so one busy port cannot hold the loop
ACCEPT_BACKOFF = 0.5  # after EMFILE and the like: the listening socket would stay readable
# connect_timeout = 0 (none) still bounds a TLS client's handshake, as asyncio's servers do
DEFAULT_HANDSHAKE_TIMEOUT = 60.0


class Totals:
    """Component-wide counters (they outlive sessions) for Prometheus."""

    def __init__(self) -> None:
        self.bytes_to_target = 0
        self.bytes_from_target = 0
        self.connections = 0
        self.connections_total = 0
        self.connect_failures = 0


class _Connection:
    """What both paths share: bookkeeping of an accepted connection and dialling its target."""

    def __init__(self, port: PortForwarder) -> None:
        self.port = port
        self.plane = port.plane
        self.session = port.session
        self.task: asyncio.Task | None = None
        self.done = False

    def accepted(self) -> None:
        self.session.connections += 1
        self.session.connections_total += 1
        self.plane.totals.connections += 1
        self.plane.totals.connections_total += 1
        self.plane.idle_event.clear()
        self.port.connections.add(self)
        self.task = self.plane.loop.create_task(self._connect())

    async def _connect(self) -> None:
        raise NotImplementedError

    def count(self, forward: bool, n: int) -> None:
        """Bytes moved; the threaded pumps call this from their threads, hence the lock (`+=` on an
        attribute is not atomic between threads)."""
        session, totals = self.session, self.plane.totals
        with self.plane.count_lock:
            if forward:
                session.bytes_to_target += n
                totals.bytes_to_target += n
            else:
                session.bytes_from_target += n
                totals.bytes_from_target += n

    def connect_failed(self, host: str, port: int, exc: BaseException) -> None:
        self.plane.totals.connect_failures += 1
        log.warning("session %s port %d: cannot connect to %s:%d: %s", self.session.uid,
                    self.port.port, host, port, exc or type(exc).__name__)

    async def allowed_address(self, host: str, port: int) -> str | None:
        """The address to dial: a literal as is (update checked it), a name resolved now and
        checked again (its addresses may have changed since update)."""
        policy = self.plane.policy
        if policy is None or _is_ip(host):
            return host
        infos = await self.plane.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        reasons = []
        for info in infos:
            address = str(info[4][0])
            reason = policy.refusal(address, port)
            if reason is None:
                return address
            reasons.append(reason)
        log.warning("session %s port %d: not connecting to %s:%d: %s", self.session.uid,
                    self.port.port, host, port, "; ".join(reasons) or "no address")
        return None

    def finish(self) -> None:
        """Both connections closed (or the target never connected): on the event loop."""
        if self.done:
            return
        self.done = True
        self.session.connections -= 1
        self.plane.totals.connections -= 1
        if not self.plane.totals.connections:
            self.plane.idle_event.set()
        self.port.connections.discard(self)

    def abort(self) -> None:
        raise NotImplementedError


class Connection(_Connection):
    """Event-loop path: an accepted transport and its target's, joined by a ProtocolPump."""

    def __init__(self, port: PortForwarder) -> None:
        super().__init__(port)
        self.pump = ProtocolPump(self.plane.loop, buffer_size=self.plane.buffer_size, gates=port.buckets,
                                 count=self.count, on_first=self.accepted, on_closed=self.finish)

    async def _connect(self) -> None:
        host, port = self.session.targets[self.port.index]  # read now: update may re-target
        plane = self.plane
        kwargs: dict = {}
        if plane.client_ssl is not None:
            kwargs = {"ssl": plane.client_ssl, "server_hostname": host,
                      "ssl_handshake_timeout": plane.connect_timeout}
        target = self.pump.second_side()
        try:
            async with asyncio.timeout(plane.connect_timeout):
                address = await self.allowed_address(host, port)
                if address is None:
                    self.abort()
                    return
                await plane.loop.create_connection(lambda: target, address, port, **kwargs)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.connect_failed(host, port, exc)
            self.abort()
            return
        self.pump.link(target)

    def abort(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.pump.abort()


class ThreadedConnection(_Connection):
    """Threads path: an accepted socket and its target's (after their TLS handshakes, where the
    role is TLS), joined by a SplicePump or TlsPump once connected."""

    def __init__(self, port: PortForwarder, client: socket.socket) -> None:
        super().__init__(port)
        self.client: socket.socket | None = client
        self.pump: SplicePump | None = None

    async def _connect(self) -> None:
        host, port = self.session.targets[self.port.index]  # read now: update may re-target
        plane = self.plane
        target: socket.socket | None = None
        client_end: socket.socket | TlsEnd | None = self.client
        target_end: socket.socket | TlsEnd | None = None
        if plane.server_ssl is not None:  # authenticate the peer before dialling for it
            assert self.client is not None
            self.client.setblocking(False)
            try:
                async with asyncio.timeout(plane.connect_timeout or DEFAULT_HANDSHAKE_TIMEOUT):
                    client_end = await handshake(plane.loop, self.client, plane.server_ssl, server_side=True)
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                log.info("session %s port %d: TLS handshake with the client failed: %s", self.session.uid,
                         self.port.port, exc or type(exc).__name__)
                self.abort()
                return
        try:
            async with asyncio.timeout(plane.connect_timeout):
                address = await self.allowed_address(host, port)
                if address is None:
                    self.abort()
                    return
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                target = target_end = socket.socket(family, socket.SOCK_STREAM)
                target.setblocking(False)
                await _dial(plane.loop, target, (address, port))
                if plane.client_ssl is not None:
                    target_end = await handshake(plane.loop, target, plane.client_ssl, server_side=False,
                                                 server_hostname=host)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            if target is not None:
                target.close()
            self.connect_failed(host, port, exc)
            self.abort()
            return
        except asyncio.CancelledError:  # aborted while dialling: abort() closes the client
            if target is not None:
                target.close()
            raise
        self.client = None
        assert client_end is not None and target_end is not None
        name = f"{self.session.uid}:{self.port.port}"
        if isinstance(client_end, socket.socket) and isinstance(target_end, socket.socket):
            self.pump = SplicePump(client_end, target_end, loop=plane.loop, gates=self.port.buckets,
                                   count=self.count, on_closed=self.finish, name=name)
        else:
            self.pump = TlsPump(client_end, target_end, loop=plane.loop, gates=self.port.buckets,
                                count=self.count, on_closed=self.finish, name=name)
        self.pump.start()

    def abort(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.pump is not None:
            self.pump.abort()  # its threads end, close both sockets, then call finish()
            return
        if self.client is not None:
            self.client.close()
            self.client = None
        self.finish()


class PortForwarder:
    """Serves one reserved port of a session."""

    def __init__(self, plane: DataPlane, session: Session, index: int, sock: socket.socket,
                 buckets: tuple[TokenBucket | None, TokenBucket | None]) -> None:
        self.plane = plane
        self.session = session
        self.index = index
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.buckets = buckets
        self.server: asyncio.AbstractServer | None = None
        self.accepting = False
        self.retry: asyncio.TimerHandle | None = None
        self.connections: set[_Connection] = set()

    async def start(self) -> None:
        plane = self.plane
        if plane.threads:
            self.sock.setblocking(False)
            self._watch()
            return
        kwargs: dict = {}
        if plane.server_ssl is not None:
            kwargs = {"ssl": plane.server_ssl, "ssl_handshake_timeout": plane.connect_timeout}
        self.server = await plane.loop.create_server(
            lambda: Connection(self).pump.first, sock=self.sock, **kwargs)

    # -- the threads path's accept loop -------------------------------------------------------

    def _watch(self) -> None:
        self.retry = None
        if not self.accepting and self.sock.fileno() >= 0:
            self.plane.loop.add_reader(self.sock.fileno(), self._accept)
            self.accepting = True

    def _unwatch(self) -> None:
        if self.accepting:
            self.plane.loop.remove_reader(self.sock.fileno())
            self.accepting = False
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors or buffers: retry later, do not spin
                log.warning("session %s port %d: accept: %s", self.session.uid, self.port, exc)
                self._unwatch()
                self.retry = self.plane.loop.call_later(ACCEPT_BACKOFF, self._watch)
                return
            ThreadedConnection(self, client).accepted()

    # -- ending --------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Shutdown's first step: no new connections, the open ones go on."""
        if self.server is not None:
            self.server.close()
        elif self.plane.threads:
            self._unwatch()
            self.sock.close()

    def close(self) -> None:
        """Stop accepting and abort every connection (the listening socket is closed)."""
        if self.server is not None:
            self.server.close()
        else:
            self._unwatch()
            self.sock.close()
        for conn in list(self.connections):
            conn.abort()


class DataPlane:
    """Per component: TLS contexts, limits and counters shared by all sessions."""

    def __init__(self, *, role_ssl: dict[str, tuple[ssl.SSLContext | None, ssl.SSLContext | None]],
                 buffer_size: int, connect_timeout: float, splice: bool = True) -> None:
        self.role_ssl = role_ssl  # role -> (server context, client context)
        self.threads = splice and SPLICE_AVAILABLE  # pumps in threads (TLS too), not on the loop
        self.count_lock = threading.Lock()
        self.buffer_size = buffer_size
        self.connect_timeout = connect_timeout or None
        self.totals = Totals()
        self.loop = asyncio.get_running_loop()
        self.server_ssl: ssl.SSLContext | None = None
        self.client_ssl: ssl.SSLContext | None = None
        self.policy: Any = None  # TargetPolicy, set by the session manager
        self.idle_event = asyncio.Event()  # set while no connection is open
        self.idle_event.set()

    async def idle(self) -> None:
        await self.idle_event.wait()

    def for_role(self, role: str) -> DataPlane:
        """A view of the plane with the TLS contexts of `role`."""
        view = object.__new__(DataPlane)
        view.__dict__.update(self.__dict__)
        view.server_ssl, view.client_ssl = self.role_ssl.get(role, (None, None))
        return view


async def _dial(loop: asyncio.AbstractEventLoop, sock: socket.socket, address: tuple[str, int]) -> None:
    """Non-blocking connect to an IP literal. Not ``loop.sock_connect``: uvloop's resolves the
    address in libuv's thread pool first, a round trip (and four threads) for nothing."""
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        ready = loop.create_future()

        def writable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(sock.fileno(), writable)
        try:
            await ready
        finally:
            loop.remove_writer(sock.fileno())
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_buckets(rate_bps: float | None, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
    if not rate_bps:
        return None, None
    burst = max(rate_bps * 0.05, 16384.0)  # 50 ms worth: small enough to keep the average tight
    return TokenBucket(rate_bps, burst, now), TokenBucket(rate_bps, burst, now)


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def client_context(cert: str, key: str, ca: str, verify_hostname: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.check_hostname = verify_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
