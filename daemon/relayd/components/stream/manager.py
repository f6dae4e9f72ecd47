"""Session orchestration: the semantics of req/hello/update/release over ports and forwarders.

Every session is independent (its own future, ports, forwarders, buckets); `req` awaits its
hello on a future, so any number of sessions can be in setup without a thread each.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

from grpclib.const import Status

from relayd.auth.base import Identity
from relayd.components.stream.config import StreamConfig
from relayd.components.stream.forward import DataPlane, PortForwarder, make_buckets
from relayd.components.stream.model import (
    Session,
    StreamError,
    TargetPolicy,
    check_request,
    check_uid,
    format_hostport,
    parse_hostport,
    parse_targets,
    round_robin,
)
from relayd.components.stream.ports import PortPool
from relayd.logsetup import quote


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass
class _Live:
    """What a session holds besides its public state."""

    session: Session
    ports: list[int]
    socks: list[socket.socket]
    hello: asyncio.Future
    forwarders: list[PortForwarder] = field(default_factory=list)


class SessionManager:
    def __init__(self, config: StreamConfig, pool: PortPool, plane: DataPlane, log: logging.Logger) -> None:
        self.config = config
        self.pool = pool
        self.plane = plane
        self.log = log
        self.live: dict[str, _Live] = {}
        self.ended: Counter[str] = Counter()  # reason -> sessions
        self.closing = False
        self.access: logging.Logger | None = None  # access_log = true
        self.policy = TargetPolicy(config.allowed_targets)
        plane.policy = self.policy

    @property
    def sessions(self) -> list[Session]:
        return [live.session for live in self.live.values()]

    def _get(self, uid: str) -> _Live:
        check_uid(uid)
        live = self.live.get(uid)
        if live is None:
            raise StreamError(Status.NOT_FOUND, f"no session with uid {uid}")
        return live

    # -- the four RPCs ---------------------------------------------------------------------

    async def req(self, who: Identity, uid: str, role: str, num_conn: int, rate: int) -> Session:
        cfg = self.config
        check_request(uid, role, num_conn, rate, cfg.max_num_conn)
        if self.closing:
            raise StreamError(Status.UNAVAILABLE, "relayd is shutting down")
        if uid in self.live:
            raise StreamError(Status.ALREADY_EXISTS, f"session {uid} already exists")
        if len(self.live) >= cfg.max_sessions:
            raise StreamError(Status.RESOURCE_EXHAUSTED, f"too many sessions (max_sessions = {cfg.max_sessions})")
        mine = [live for live in self.live.values() if live.session.owner == who.sub]
        if len(mine) >= cfg.max_sessions_per_identity:
            raise StreamError(Status.RESOURCE_EXHAUSTED,
                              f"{who.username or who.sub} already holds {len(mine)} sessions "
                              f"(max_sessions_per_identity = {cfg.max_sessions_per_identity})")
        held = sum(len(live.ports) for live in mine)
        if held + num_conn > cfg.max_ports_per_identity:
            raise StreamError(Status.RESOURCE_EXHAUSTED,
                              f"{who.username or who.sub} holds {held} ports and asks for {num_conn} "
                              f"more (max_ports_per_identity = {cfg.max_ports_per_identity})")
        socks = self.pool.reserve(num_conn)
        ports = [s.getsockname()[1] for s in socks]
        factor = cfg.rate_factor
        session = Session(
            uid=uid, role=role, num_conn=num_conn, rate=rate,
            rate_bps=rate * factor if (factor and rate) else None,
            owner=who.sub, owner_name=who.username or who.sub,
            listeners=[format_hostport(cfg.advertised_host, p) for p in ports],
        )
        live = _Live(session, ports, socks, asyncio.get_running_loop().create_future())
        self.live[uid] = live
        self.log.debug("session %s: req role=%s num_conn=%d rate=%d by %s; ports %s", uid, role, num_conn,
                      rate, session.owner_name, ",".join(map(str, ports)))
        try:
            async with asyncio.timeout(cfg.hello_timeout or None):
                await asyncio.shield(live.hello)
        except TimeoutError:
            self._end(live, "timeout")
            raise StreamError(Status.DEADLINE_EXCEEDED, "Hello not received within the timeout period") from None
        except asyncio.CancelledError:
            if session.state == "setup":  # the client gave up before the hello: free the ports
                self._end(live, "cancelled")
            raise
        return session

    def hello(self, who: Identity, uid: str, prod_listeners: list[str]) -> Session:
        live = self._get(uid)
        session = live.session
        session.check_owner(who.sub, "send the hello of")
        if session.state != "setup":
            raise StreamError(Status.FAILED_PRECONDITION, f"session {uid} already received its hello")
        try:
            for item in prod_listeners:
                parse_hostport(item)
        except ValueError as exc:
            raise StreamError(Status.INVALID_ARGUMENT, f"prod_listeners: {exc}") from None
        session.prod_listeners = list(prod_listeners)
        session.state = "ready"
        if not live.hello.done():
            live.hello.set_result(None)
        self.log.debug("session %s: hello, prod_listeners %s", uid, ",".join(prod_listeners) or "-")
        return session

    async def update(self, who: Identity, uid: str, remote_listeners: list[str]) -> Session:
        live = self._get(uid)
        session = live.session
        session.check_owner(who.sub, "update")
        if session.state == "setup":
            raise StreamError(Status.FAILED_PRECONDITION, f"session {uid} has not received its hello yet")
        targets = parse_targets(list(remote_listeners), "remote_listeners")
        await self.check_targets(targets)
        # A second update re-targets: connections accepted from now on use the new mapping.
        session.targets = round_robin(targets, session.num_conn)
        if not live.forwarders:
            plane = self.plane.for_role(session.role)
            buckets = make_buckets(session.rate_bps, plane.loop.time())
            forwarders = [PortForwarder(plane, session, i, sock, buckets) for i, sock in enumerate(live.socks)]
            try:
                for fwd in forwarders:
                    await fwd.start()
            except OSError as exc:
                for fwd in forwarders:
                    fwd.close()
                self._end(live, "failed")
                raise StreamError(Status.INTERNAL, f"cannot start the data plane: {exc}") from None
            live.forwarders = forwarders
            live.socks = []  # the servers own them now
        session.state = "active"
        self.log.debug("session %s: targets %s", uid,
                      ",".join(format_hostport(h, p) for h, p in session.targets))
        return session

    async def check_targets(self, targets: list[tuple[str, int]]) -> None:
        """PERMISSION_DENIED unless every address of every target is allowed (names resolved)."""
        loop = asyncio.get_running_loop()
        for host, port in targets:
            try:
                addresses = [host] if _is_ip(host) else sorted({
                    info[4][0] for info in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
            except OSError as exc:
                raise StreamError(Status.INVALID_ARGUMENT,
                                  f"remote_listeners: cannot resolve {host!r}: {exc}") from None
            for address in addresses:
                reason = self.policy.refusal(str(address), port)
                if reason is not None:
                    where = "" if address == host else f"{format_hostport(host, port)}: "
                    raise StreamError(Status.PERMISSION_DENIED, f"remote_listeners: {where}{reason}")

    def release(self, who: Identity, uid: str) -> None:
        live = self._get(uid)
        live.session.check_owner(who.sub, "release")
        self._end(live, "released")

    # -- ending ------------------------------------------------------------------------------

    def _end(self, live: _Live, reason: str) -> None:
        session = live.session
        if self.live.get(session.uid) is not live:
            return
        del self.live[session.uid]
        session.state = "released"
        if not live.hello.done():
            live.hello.set_exception(StreamError(
                Status.UNAVAILABLE if reason == "shutdown" else Status.ABORTED,
                f"session {session.uid} ended ({reason}) before its hello"))
            live.hello.exception()  # retrieved: nobody may be waiting any more
        for fwd in live.forwarders:
            fwd.close()
        self.pool.release(live.ports, live.socks)
        self.ended[reason] += 1
        self.log.info("session %s: ended (%s); %d bytes to target, %d from target", session.uid, reason,
                      session.bytes_to_target, session.bytes_from_target)
        if self.access is not None:
            self.access.info(
                "session=%s user=%s role=%s num_conn=%d rate=%d targets=%s reason=%s bytes_to_target=%d "
                "bytes_from_target=%d connections=%d duration=%.3f", quote(session.uid),
                quote(session.owner_name or session.owner), session.role, session.num_conn, session.rate,
                ",".join(format_hostport(h, p) for h, p in session.targets) or "-", reason,
                session.bytes_to_target, session.bytes_from_target, session.connections_total,
                time.time() - session.created_at)

    def stop_accepting(self) -> None:
        """Shutdown, first step: sessions in setup end; active ones stop taking connections."""
        self.closing = True
        for live in list(self.live.values()):
            if live.session.state != "active":
                self._end(live, "shutdown")
            else:
                for fwd in live.forwarders:
                    fwd.stop_accepting()

    def end_all(self) -> None:
        for live in list(self.live.values()):
            self._end(live, "shutdown")
