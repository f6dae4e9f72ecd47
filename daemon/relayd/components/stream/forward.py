"""The data plane: per session port, an asyncio server forwarding each connection to its target.

Protocol-level I/O (no StreamReader copy loop), as ``asyncio.BufferedProtocol``: the event
loop receives straight into a 1 MiB buffer of ours and we hand a view of it to the peer
transport's ``write``, so a chunk is not copied on its way through (a new buffer is taken only
while the peer still queues part of the previous one). Backpressure: when the peer's write buffer passes
``buffer_size`` it calls ``pause_writing`` and we stop reading from this side until
``resume_writing``, so a slow reader never makes memory grow. The session's rate limit pauses
reading the same way, for as long as the token bucket is in debt.

TLS (security = "tls"): the PROD (inbound) side accepts mutual TLS from the other facility and
connects in plain text to its local application; the CONS (outbound) side accepts its local
application in plain text and connects with mutual TLS to the PROD side's listener.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any

from relayd.components.stream.ratelimit import TokenBucket

if TYPE_CHECKING:
    from relayd.components.stream.model import Session

log = logging.getLogger("relayd.stream.data")

# Reasons a side is not reading; it reads again only when none is left.
BACKPRESSURE, RATE, LINKING = 1, 2, 4
READ_SIZE = 1024 * 1024


class Totals:
    """Component-wide counters (they outlive sessions) for Prometheus."""

    def __init__(self) -> None:
        self.bytes_to_target = 0
        self.bytes_from_target = 0
        self.connections = 0
        self.connections_total = 0
        self.connect_failures = 0


class Side(asyncio.BufferedProtocol):
    """One TCP/TLS connection of a forwarded pair; what it reads is written to `peer`."""

    def __init__(self, conn: Connection, to_target: bool) -> None:
        self.conn = conn
        self.to_target = to_target  # True: reads the accepted client, writes the target
        self.bucket = conn.buckets[0 if to_target else 1]
        self.peer: Side | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = 0
        self.eof = False
        self.closed = False
        self.early: list[bytes] = []
        self.view: memoryview | None = None  # allocated at the first read: idle sides cost nothing

    # -- flow control ------------------------------------------------------------------------

    def pause(self, reason: int) -> None:
        # Asks the transport whether it reads rather than trusting `paused`: uvloop starts
        # reading after connection_made() returns even if connection_made paused it.
        transport = self.transport
        if transport is not None and not self.closed and transport.is_reading():
            transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        was = self.paused
        self.paused &= ~reason
        if was and not self.paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause(BACKPRESSURE)

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume(BACKPRESSURE)

    # -- protocol callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=self.conn.plane.buffer_size)  # type: ignore[attr-defined]
        if self.to_target:  # the accepted side: wait for the target before reading
            self.pause(LINKING)
            self.conn.accepted(self)
            # uvloop resumes reading right after connection_made: pause again once it has
            self.conn.plane.loop.call_soon(self._repause)

    def _repause(self) -> None:
        if self.paused and self.transport is not None and not self.closed and self.transport.is_reading():
            self.transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        peer = self.peer
        if self.view is None or (peer is not None and peer.transport is not None
                                 and peer.transport.get_write_buffer_size()):
            # the peer's transport may still hold a view of the old buffer: never overwrite it
            self.view = memoryview(bytearray(READ_SIZE))
        return self.view

    def buffer_updated(self, n: int) -> None:
        self.data_received(self.view[:n])  # type: ignore[index]

    def data_received(self, data: memoryview | bytes) -> None:
        peer = self.peer
        if peer is None:  # only if the transport delivers despite pause_reading
            self.early.append(bytes(data))
            return
        n = len(data)
        peer.transport.write(data)  # type: ignore[union-attr]
        session, totals = self.conn.session, self.conn.plane.totals
        if self.to_target:
            session.bytes_to_target += n
            totals.bytes_to_target += n
        else:
            session.bytes_from_target += n
            totals.bytes_from_target += n
        if self.bucket is not None:
            loop = self.conn.plane.loop
            delay = self.bucket.consume(n, loop.time())
            if delay > 0:
                self.pause(RATE)
                loop.call_later(delay, self.resume, RATE)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None:
            return True  # accepted side, target not connected yet: Connection forwards it
        return self.conn.forward_eof(self, peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.conn.side_lost(self)


class Connection:
    """An accepted connection and its connection to the target."""

    def __init__(self, port: PortForwarder) -> None:
        self.port = port
        self.plane = port.plane
        self.session = port.session
        self.buckets = port.buckets
        self.client = Side(self, to_target=True)
        self.target: Side | None = None
        self.task: asyncio.Task | None = None
        self.done = False

    def accepted(self, client: Side) -> None:
        self.session.connections += 1
        self.session.connections_total += 1
        self.plane.totals.connections += 1
        self.plane.totals.connections_total += 1
        self.plane.idle_event.clear()
        self.port.connections.add(self)
        self.task = self.plane.loop.create_task(self._connect())

    async def _connect(self) -> None:
        host, port = self.session.targets[self.port.index]  # read now: update may re-target
        plane = self.plane
        kwargs: dict = {}
        if plane.client_ssl is not None:
            kwargs = {"ssl": plane.client_ssl, "server_hostname": host,
                      "ssl_handshake_timeout": plane.connect_timeout}
        target = Side(self, to_target=False)
        target.peer = self.client  # the target may send before create_connection returns
        try:
            async with asyncio.timeout(plane.connect_timeout):
                address = await self._allowed_address(host, port)
                if address is None:
                    self.abort()
                    return
                await plane.loop.create_connection(lambda: target, address, port, **kwargs)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            plane.totals.connect_failures += 1
            log.warning("session %s port %d: cannot connect to %s:%d: %s", self.session.uid,
                        self.port.port, host, port, exc or type(exc).__name__)
            self.abort()
            return
        self.target = target
        client = self.client
        client.peer = target
        if client.closed:
            target.transport.close()  # type: ignore[union-attr]
            return
        for data in client.early:
            client.data_received(data)
        client.early.clear()
        if client.eof:
            self.forward_eof(client, target)
        client.resume(LINKING)

    async def _allowed_address(self, host: str, port: int) -> str | None:
        """The address to dial: a literal as is (update checked it), a name resolved now and
        checked again (its addresses may have changed since update)."""
        policy = self.plane.policy
        if policy is None or _is_ip(host):
            return host
        infos = await self.plane.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        reasons = []
        for info in infos:
            reason = policy.refusal(info[4][0], port)
            if reason is None:
                return info[4][0]
            reasons.append(reason)
        log.warning("session %s port %d: not connecting to %s:%d: %s", self.session.uid,
                    self.port.port, host, port, "; ".join(reasons) or "no address")
        return None

    def forward_eof(self, side: Side, peer: Side) -> bool:
        """`side` read EOF: half-close towards its peer; True keeps side's transport open."""
        pt = peer.transport
        assert pt is not None
        if pt.is_closing():
            return False
        if peer.eof:  # both directions done
            pt.close()
            return False
        if pt.can_write_eof():
            pt.write_eof()
            return side.transport.can_write_eof()  # type: ignore[union-attr]
        pt.close()  # TLS cannot half-close: close after flushing what is queued
        return False

    def side_lost(self, side: Side) -> None:
        other = self.target if side is self.client else self.client
        if other is not None and other.transport is not None and not other.closed:
            other.transport.close()  # flushes what is queued, then closes
        if not self.done and (other is None or other.closed or other.transport is None):
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.session.connections -= 1
        self.plane.totals.connections -= 1
        if not self.plane.totals.connections:
            self.plane.idle_event.set()
        self.port.connections.discard(self)

    def abort(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        for side in (self.client, self.target):
            if side is not None and side.transport is not None and not side.closed:
                side.transport.abort()
        if self.target is None or self.target.transport is None:
            self._finish()


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
        self.connections: set[Connection] = set()

    async def start(self) -> None:
        plane = self.plane
        kwargs: dict = {}
        if plane.server_ssl is not None:
            kwargs = {"ssl": plane.server_ssl, "ssl_handshake_timeout": plane.connect_timeout}
        self.server = await plane.loop.create_server(
            lambda: Connection(self).client, sock=self.sock, **kwargs)

    def close(self) -> None:
        """Stop accepting and abort every connection (the socket is closed with the server)."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.abort()


class DataPlane:
    """Per component: TLS contexts, limits and counters shared by all sessions."""

    def __init__(self, *, role_ssl: dict[str, tuple[ssl.SSLContext | None, ssl.SSLContext | None]],
                 buffer_size: int, connect_timeout: float) -> None:
        self.role_ssl = role_ssl  # role -> (server context, client context)
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
