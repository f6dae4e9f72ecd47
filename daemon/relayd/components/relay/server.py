"""The asyncio shell of the relay: the listener's sockets, one WsConnection per client.

Each connection is a small ``asyncio.Protocol`` (``wsconn.py``) on the ``websockets`` library's
sans-I/O parser, so an idle registered client costs a few KiB and no task; it replaced
aiohttp's WebSocket server, which cost about 15 KiB per idle client (bench/README.md). Frames
to receivers are written straight to the transport, never awaited: a slow receiver's backlog
is checked against ``send_buffer_bytes`` and the receiver is closed (4005) instead of stalling
the sender, which is what proxystore-relay does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from websockets.datastructures import Headers

from relayd.accept_gate import GatedServer, serve_gated
from relayd.auth.base import AuthError, AuthFailure
from relayd.components.relay import protocol as p
from relayd.components.relay.cluster import OUTBOX_LIMIT
from relayd.components.relay.wsconn import Request, Response, WsConnection
from relayd.lifecycle import drain, with_unread_bytes
from relayd.logsetup import quote

if TYPE_CHECKING:
    from relayd.auth.base import AuthMethod
    from relayd.components.relay.cluster import ClusterBus
    from relayd.components.relay.config import RelayConfig

_HEADER2 = struct.Struct("!BBH").pack
_HEADER8 = struct.Struct("!BBQ").pack
WRITE_AT = 65536  # queued bytes that are written at once rather than at the end of the iteration
DISCOVERY_PATH = "/.well-known/relayd"
HINT = "This is a ProxyStore-compatible WebSocket relay: connect with ws:// or wss://\n"
FIRST_REQUEST_GRACE = 1.0  # a retiring relay lets just-accepted connections finish their handshake


def text_frame(data: bytes) -> bytes:
    """An unmasked, final, uncompressed text frame (servers never mask, RFC 6455 5.1)."""
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return _HEADER2(0x81, 126, n) + data
    return _HEADER8(0x81, 127, n) + data


def http_response(status: int, phrase: str, body: bytes, content_type: str, **headers: str) -> Response:
    fields = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                      ("Connection", "close")])
    for name, value in headers.items():
        fields[name.replace("_", "-")] = value
    return Response(status, phrase, fields, body)


class RelayServer:
    def __init__(self, config: RelayConfig, auth: AuthMethod, log: logging.Logger) -> None:
        self.config = config
        self.auth = auth
        self.log = log
        self.core = p.RelayCore(max_message_bytes=config.max_message_bytes, max_clients=config.max_clients,
                                max_messages_per_second=config.max_messages_per_second)
        self.max_message_bytes = p.HARD_MAX_BYTES
        self.connections: set[WsConnection] = set()  # every open connection, handshake or not
        self._changed: asyncio.Event | None = None  # made by a stop() waiting on connections
        self.servers: list[GatedServer] = []
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self.dirty: list[p.Client] = []  # clients with frames queued for this loop iteration
        self.stopping = False
        self.auth_failures = 0
        self.access: logging.Logger | None = None  # access_log = true
        self._keepalive: asyncio.TimerHandle | None = None
        self.cluster: ClusterBus | None = None  # set by the component when [cluster] redis is

    # -- HTTP and the handshake (called by WsConnection) ---------------------------------------

    def http_response(self, request: Request) -> Response:
        """The answer to a request that is not a WebSocket handshake: the discovery document,
        or a hint for a browser (426, as aiohttp answered it before)."""
        if request.path.split("?", 1)[0] == DISCOVERY_PATH:
            return self.discovery()
        return http_response(426, "Upgrade Required", HINT.encode(), "text/plain; charset=utf-8",
                             Upgrade="websocket")

    def discovery(self) -> Response:
        try:
            from relayd.auth.discovery import document
        except ImportError:
            return http_response(404, "Not Found", b'{"message": "not found"}', "application/json")
        body = json.dumps(document([self.auth])).encode()
        return http_response(200, "OK", body, "application/json; charset=utf-8")

    def opened(self, conn: WsConnection, request: Request) -> None:
        """The handshake answered 101: the connection is a relay client from now on."""
        authorization = request.headers.get_all("Authorization")
        client = p.Client(conn, conn.address, time.time(), authorization[0] if authorization else None)
        conn.client = client
        self.connection_changed()
        refused = self.core.open(client, self.loop.time())
        if refused is None and self.stopping:
            # Never fail the handshake with an HTTP error (RelayClient would not retry it);
            # a 1001 after the upgrade is retried.
            refused = self.core.close(client, p.GOING_AWAY, p.REASON_GOING_AWAY)
        if refused is not None:
            self.close_peer(refused)
        elif self.config.register_timeout:
            conn.timer = self.loop.call_later(self.config.register_timeout, self._register_timeout, client)

    # -- messages (called by WsConnection, in order, one connection at a time) -------------------

    def message(self, conn: WsConnection, text: str | None) -> Awaitable[None] | None:
        """One message from a client (None: a binary one). Returns an awaitable when the
        connection must wait for it before its next message is read (a registration)."""
        client = conn.client
        try:
            if text is None:
                self.execute(self.core.receive_binary(client))
            else:
                result = self.core.receive(client, text, self.loop.time())
                if type(result) is p.Register:
                    return self._register_and_execute(client, result)
                self.execute(result)
        except Exception:  # a bug: say so with 1011 rather than leave the client hanging
            self._internal_error(client)
        cluster = self.cluster
        if cluster is not None and len(cluster.outbox) >= OUTBOX_LIMIT:
            return cluster.wait_for_room()  # Redis is slower than this sender: stop reading it
        return None

    async def _register_and_execute(self, client: p.Client, request: p.Register) -> None:
        try:
            self.execute(await self.register(client, request))
        except Exception:
            self._internal_error(client)

    def _internal_error(self, client: p.Client) -> None:
        self.log.exception("relay connection from %s failed", client.address)
        if not client.closed:
            self.close_peer(self.core.close(client, p.INTERNAL_ERROR, p.REASON_INTERNAL_ERROR))

    def execute(self, actions: Any) -> None:
        for action in actions:
            kind = type(action)
            if kind is p.Send:
                self.send(action.client, action.text)
            elif kind is p.Close:
                self.close_peer(action)
            else:  # p.Remote: only a clustered core returns these
                assert self.cluster is not None
                self.cluster.forward(action)

    async def register(self, client: p.Client, request: p.Register) -> list[p.Action]:
        try:
            identity = await self.auth.authenticate(client.authorization)
        except AuthError as exc:
            self.auth_failures += 1
            if exc.reason in (AuthFailure.MISSING, AuthFailure.MALFORMED):
                code, reason = p.UNAUTHORIZED, f"UnauthorizedError: {exc.message}"
            elif exc.reason is AuthFailure.UNAVAILABLE:
                code, reason = p.TRY_AGAIN_LATER, exc.message
            else:
                code, reason = p.FORBIDDEN, f"ForbiddenError: {exc.message}"
            self.log.info("registration of %s (%r) from %s refused: %s", request.uuid, request.name,
                          client.address, reason)
            return self.core.auth_failed(client, code, reason)
        except Exception:
            self.auth_failures += 1
            self.log.exception("auth method %s failed", self.auth.name)
            return self.core.auth_failed(client, p.TRY_AGAIN_LATER, "Authentication failed; try again later.")
        label = identity.username or identity.sub
        if self.cluster is not None and not await self.cluster.claim(client, identity.sub, request.uuid):
            # the same verdict as for a UUID another identity holds on this node
            return [self.core.close(client, p.FORBIDDEN, p.other_user_registration(request.uuid))]
        previous = client.uuid
        actions = self.core.register(client, identity.sub, label, request.name, request.uuid)
        if self.cluster is not None:
            if previous is not None and previous != client.uuid:
                self.cluster.release(client, previous)  # one UUID per socket, here as in Redis
            if client.uuid != request.uuid or client.closed:
                self.cluster.release(client, request.uuid)  # closed while we were claiming
        if client.uuid == request.uuid and not client.closed:
            if client.conn.timer:
                client.conn.timer.cancel()
                client.conn.timer = None
            self.log.info("registered client %s (%r) of %s from %s", request.uuid, request.name, label,
                          client.address)
        return actions

    def _register_timeout(self, client: p.Client) -> None:
        client.conn.timer = None
        if client.uuid is None and not client.closed:
            self.close_peer(self.core.close(client, p.REGISTER_TIMEOUT, p.REASON_REGISTER_TIMEOUT))

    def lost(self, conn: WsConnection) -> None:
        """The connection is gone (called once, from connection_lost)."""
        client: p.Client = conn.client
        self.core.disconnect(client)
        if self.cluster is not None and client.uuid is not None:
            self.cluster.release(client, client.uuid)
        if conn.timer:
            conn.timer.cancel()
            conn.timer = None
        if client.uuid is not None:
            self.log.info("unregistered client %s (%r), close code %s", client.uuid, client.name, conn.close_code)
        if self.access is not None:
            self.access.info(
                "client=%s user=%s name=%s uuid=%s close=%s messages_in=%d messages_out=%d "
                "bytes_in=%d bytes_out=%d duration=%.3f", client.address,
                quote(client.identity_label or "-"), quote(client.name or "-"), client.uuid or "-",
                conn.close_code if conn.close_code is not None else "-", client.messages_in,
                client.messages_out, conn.received, conn.sent, self.loop.time() - conn.started)

    # -- output ------------------------------------------------------------------------------

    def send(self, client: p.Client, text: str) -> None:
        """Queue a frame; a client's frames are written together once per loop iteration (one
        syscall for many messages under load), or as soon as 64 KiB are queued."""
        conn: WsConnection = client.conn
        if client.closed:
            return
        frame = text_frame(text.encode())
        if conn.pending is None:
            conn.sent += len(frame)
            conn.pending, conn.pending_bytes = [frame], len(frame)
            if not self.dirty:
                self.loop.call_soon(self.flush)
            self.dirty.append(client)
        else:
            conn.pending.append(frame)
            conn.sent += len(frame)
            conn.pending_bytes += len(frame)
        if conn.pending_bytes >= WRITE_AT:
            self.write(conn)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for client in dirty:
            if client.conn.pending is not None:
                self.write(client.conn)

    def write(self, conn: WsConnection) -> None:
        """Hand the queued frames to the transport; whatever the kernel does not take stays in the
        transport's buffer, and a client whose buffer passes send_buffer_bytes is not reading:
        close it (4005) rather than buffer without bound or make its senders wait."""
        pending = conn.pending
        conn.pending, conn.pending_bytes = None, 0
        transport = conn.transport
        client = conn.client
        if not pending or client.closed or transport.is_closing():
            return
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if transport.get_write_buffer_size() > self.config.send_buffer_bytes:
            self.log.warning("closing %s (%r) at %s: send buffer full, it does not read", client.uuid,
                             client.name, client.address)
            self.close_peer(self.core.close(client, p.SLOW_RECEIVER, p.REASON_SLOW_RECEIVER))

    def close_peer(self, action: p.Close) -> None:
        """Close a connection without waiting (it may be another connection's turn); what was
        decided for it before is written first."""
        conn: WsConnection = action.client.conn
        if conn.pending and not conn.transport.is_closing():
            conn.transport.write(b"".join(conn.pending))
        conn.pending, conn.pending_bytes = None, 0
        conn.close(action.code, action.reason)

    # -- keepalive: one timer for all connections ------------------------------------------------

    def _keepalive_sweep(self) -> None:
        """Every quarter of keepalive_interval: ping a connection quiet for at least an interval
        (5th sweep without data), drop it if nothing, not even the pong, arrives in the next
        three quarters (8th sweep): answering within half an interval is always in time,
        also on a loaded machine. One timer for all connections, none per connection."""
        interval = self.config.keepalive_interval
        assert interval
        self._keepalive = self.loop.call_later(interval / 4, self._keepalive_sweep)
        for conn in list(self.connections):
            if conn.client is not None:
                conn.keepalive_tick(5, 8)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, listener: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self.servers.append(await serve_gated(listener, lambda: WsConnection(self), ssl=listener.ssl_context))
        if self.config.keepalive_interval and self._keepalive is None:
            self._keepalive = self.loop.call_later(self.config.keepalive_interval / 4, self._keepalive_sweep)

    def connection_changed(self) -> None:
        """A connection finished its handshake or went away: wake a stop() waiting on it."""
        if self._changed is not None:
            self._changed.set()

    async def _until(self, done: Callable[[], bool]) -> None:
        """Return once ``done()`` holds, re-checked at each connection_changed (no polling)."""
        while not done():
            self._changed = asyncio.Event()
            await self._changed.wait()

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting, let just-accepted connections finish their handshake (a reload must
        not drop a client's request), close every client with 1001, wait up to drain_timeout
        for them to go, then cut off the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(drain_timeout, 0.1)
        self.stopping = True
        for server in self.servers:
            server.close()  # stop accepting; the listener itself stays open for the next generation
        self.servers.clear()
        await drain(self._until(lambda: all(c.client is not None for c in self.connections)),
                    min(drain_timeout, FIRST_REQUEST_GRACE))
        for client in list(self.core.connections):
            self.close_peer(self.core.close(client, p.GOING_AWAY, p.REASON_GOING_AWAY))
        # Never sent a handshake: closed, unless it is in the socket, not yet read (the grace
        # timer may run before the loop reads it); opened() then closes it with 1001.
        quiet = [c.transport for c in self.connections if c.client is None]
        asking = with_unread_bytes(quiet)
        for transport in quiet:
            if transport not in asking:
                transport.close()
        await drain(self._until(lambda: not self.connections), deadline - loop.time())
        for conn in list(self.connections):
            conn.transport.abort()
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        await asyncio.sleep(0)  # let connection_lost run for what was just aborted
