"""The asyncio shell of the relay: aiohttp's WebSocket server on the listener's sockets.

aiohttp was chosen by measurement: on this project's 2-core machine its WebSocket server
relayed about twice what the ``websockets`` library did (62k vs 26k small messages/s, see
bench/README.md). Frames to receivers are written straight to the transport, never awaited:
a slow receiver's backlog is checked against ``send_buffer_bytes`` and the receiver is closed
(4005) instead of stalling the sender, which is what proxystore-relay does.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from relayd.auth.base import AuthError, AuthFailure
from relayd.components.relay import protocol as p
from relayd.httpserve import HttpService
from relayd.lifecycle import drain
from relayd.logsetup import quote

if TYPE_CHECKING:
    from relayd.auth.base import AuthMethod
    from relayd.components.relay.cluster import ClusterBus
    from relayd.components.relay.config import RelayConfig

_HEADER2 = struct.Struct("!BBH").pack
_HEADER8 = struct.Struct("!BBQ").pack
WRITE_AT = 65536  # queued bytes that are written at once rather than at the end of the iteration


def text_frame(data: bytes) -> bytes:
    """An unmasked, final, uncompressed text frame (servers never mask, RFC 6455 5.1)."""
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return _HEADER2(0x81, 126, n) + data
    return _HEADER8(0x81, 127, n) + data


class Conn:
    """The shell's handle on one connection (Client.conn)."""

    __slots__ = ("ws", "transport", "close_task", "timer", "pending", "pending_bytes", "sent")

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport) -> None:
        self.ws = ws
        self.transport = transport
        self.close_task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.pending: list[bytes] | None = None  # frames waiting for this loop iteration's flush
        self.pending_bytes = 0
        self.sent = 0  # bytes of the messages queued for this client


class RelayServer:
    def __init__(self, config: RelayConfig, auth: AuthMethod, log: logging.Logger) -> None:
        self.config = config
        self.auth = auth
        self.log = log
        self.core = p.RelayCore(max_message_bytes=config.max_message_bytes, max_clients=config.max_clients,
                                max_messages_per_second=config.max_messages_per_second)
        # aiohttp's keep-alive timer also runs before the first request, and is cancelled by the
        # upgrade: it is our handshake deadline against connections that never speak.
        self.http = HttpService(self.handle, keepalive_timeout=config.open_timeout)
        self.handlers: set[asyncio.Task] = set()
        self.dirty: list[p.Client] = []  # clients with frames queued for this loop iteration
        self.stopping = False
        self.auth_failures = 0
        self.access: logging.Logger | None = None  # access_log = true
        self.cluster: ClusterBus | None = None  # set by the component when [cluster] redis is

    # -- HTTP entry --------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/.well-known/relayd" and request.headers.get("Upgrade", "").lower() != "websocket":
            return self.discovery()
        ws = web.WebSocketResponse(
            autoping=True, compress=False, max_msg_size=p.HARD_MAX_BYTES,
            heartbeat=self.config.keepalive_interval or None, timeout=self.config.close_timeout,
        )
        if not ws.can_prepare(request).ok:
            return web.Response(status=426, headers={"Upgrade": "websocket"},
                                text="This is a ProxyStore-compatible WebSocket relay: connect with ws:// or wss://\n")
        await ws.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            await self.serve_connection(request, ws)
        finally:
            self.handlers.discard(task)
        return ws

    def discovery(self) -> web.Response:
        try:
            from relayd.auth.discovery import document
        except ImportError:
            return web.json_response({"message": "not found"}, status=404)
        return web.json_response(document([self.auth]))

    async def serve_connection(self, request: web.BaseRequest, ws: web.WebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        transport = request.transport
        assert transport is not None
        conn = Conn(ws, transport)
        peer = transport.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        client = p.Client(conn, address, time.time(), request.headers.get("Authorization"))
        refused = self.core.open(client, loop.time())
        if refused is None and self.stopping:
            # Never fail the handshake with an HTTP error (RelayClient would not retry it);
            # a 1001 after the upgrade is retried.
            refused = self.core.close(client, p.GOING_AWAY, p.REASON_GOING_AWAY)
        if refused is not None:
            self.close_peer(refused)
        elif self.config.register_timeout:
            conn.timer = loop.call_later(self.config.register_timeout, self._register_timeout, client)
        core = self.core
        received = 0
        started = loop.time()
        try:
            while not client.closed:
                msg = await ws.receive()
                kind = msg.type
                if kind is WSMsgType.TEXT:
                    received += len(msg.data)
                    result = core.receive(client, msg.data, loop.time())
                    actions = await self.register(client, result) if isinstance(result, p.Register) else result
                elif kind is WSMsgType.BINARY:
                    actions = core.receive_binary(client)
                else:  # CLOSE, CLOSING, CLOSED, ERROR (e.g. 1009 from the WebSocket layer)
                    if kind is WSMsgType.ERROR:
                        core.count_close(ws.close_code or p.MESSAGE_TOO_BIG)
                    break
                self.execute(actions)
                if self.cluster is not None:
                    await self.cluster.wait_for_room()
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # a bug: say so with 1011 rather than leave the client hanging
            self.log.exception("relay connection from %s failed", client.address)
            if not client.closed:
                self.close_peer(core.close(client, p.INTERNAL_ERROR, p.REASON_INTERNAL_ERROR))
        finally:
            core.disconnect(client)
            if self.cluster is not None and client.uuid is not None:
                self.cluster.release(client, client.uuid)
            if client.uuid is not None:
                self.log.info("unregistered client %s (%r), close code %s", client.uuid, client.name,
                              ws.close_code)
            if self.access is not None:
                self.access.info(
                    "client=%s user=%s name=%s uuid=%s close=%s messages_in=%d messages_out=%d "
                    "bytes_in=%d bytes_out=%d duration=%.3f", client.address,
                    quote(client.identity_label or "-"), quote(client.name or "-"), client.uuid or "-",
                    ws.close_code if ws.close_code is not None else "-", client.messages_in,
                    client.messages_out, received, conn.sent, loop.time() - started)
            if conn.timer:
                conn.timer.cancel()
            if conn.close_task:
                try:
                    await conn.close_task
                except asyncio.CancelledError:
                    pass

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

    # -- output ------------------------------------------------------------------------------

    def execute(self, actions: Any) -> None:
        for action in actions:
            kind = type(action)
            if kind is p.Send:
                self.send(action.client, action.text)
            elif kind is p.Close:
                self.close_peer(action)
            else:  # p.Remote: only a clustered core returns these
                self.cluster.forward(action)  # type: ignore[union-attr]

    def send(self, client: p.Client, text: str) -> None:
        """Queue a frame; a client's frames are written together once per loop iteration (one
        syscall for many messages under load), or as soon as 64 KiB are queued."""
        conn: Conn = client.conn
        if client.closed:
            return
        frame = text_frame(text.encode())
        if conn.pending is None:
            conn.sent += len(frame)
            conn.pending, conn.pending_bytes = [frame], len(frame)
            if not self.dirty:
                asyncio.get_running_loop().call_soon(self.flush)
            self.dirty.append(client)
        else:
            conn.pending.append(frame)
            conn.sent += len(frame)
            conn.pending_bytes += len(frame)
        if conn.pending_bytes >= WRITE_AT:
            self.write(client)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for client in dirty:
            if client.conn.pending is not None:
                self.write(client)

    def write(self, client: p.Client) -> None:
        """Hand the queued frames to the transport; whatever the kernel does not take stays in the
        transport's buffer, and a client whose buffer passes send_buffer_bytes is not reading:
        close it (4005) rather than buffer without bound or make its senders wait."""
        conn: Conn = client.conn
        pending = conn.pending
        conn.pending, conn.pending_bytes = None, 0
        transport = conn.transport
        if not pending or client.closed or transport.is_closing():
            return
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if transport.get_write_buffer_size() > self.config.send_buffer_bytes:
            self.log.warning("closing %s (%r) at %s: send buffer full, it does not read", client.uuid,
                             client.name, client.address)
            self.close_peer(self.core.close(client, p.SLOW_RECEIVER, p.REASON_SLOW_RECEIVER))

    def close_peer(self, action: p.Close) -> None:
        """Close a connection without waiting (it may be another connection's turn)."""
        conn: Conn = action.client.conn
        if conn.pending and not conn.transport.is_closing():  # what was decided before goes first
            conn.transport.write(b"".join(conn.pending))
            conn.pending, conn.pending_bytes = None, 0
        if conn.close_task is None and not conn.ws.closed:
            conn.close_task = asyncio.get_running_loop().create_task(
                self._close(conn, action.code, action.reason))

    async def _close(self, conn: Conn, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(conn.ws.close(code=code, message=reason.encode(), drain=False),
                                   self.config.close_timeout + 1)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            # A receiver that stopped reading never takes our close frame: cut it off.
            if not conn.transport.is_closing() or conn.transport.get_write_buffer_size():
                conn.transport.abort()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, listener: Any) -> None:
        await self.http.serve(listener)

    async def stop(self, drain_timeout: float) -> None:
        self.stopping = True
        for server in self.http.servers:
            server.close()  # stop accepting; the listener itself stays open for the next generation
        for client in list(self.core.connections):
            self.close_peer(self.core.close(client, p.GOING_AWAY, p.REASON_GOING_AWAY))
        if self.handlers:
            await drain(asyncio.wait(list(self.handlers)), max(drain_timeout, 0.1))
        await self.http.stop(0)
