"""A scistream.Control client (grpclib): the s2uc workflow used by ``relayctl stream``.

inbound:  req(PROD) + hello(PROD, app endpoints) concurrently -> update(PROD, app endpoints)
outbound: req(CONS) + hello(CONS)                             -> update(CONS, inbound listeners)
The token goes raw in the ``authorization`` metadata, as s2uc sends it (s2cs does not strip a
``Bearer`` prefix; relayd accepts both).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from relayd.components.stream.model import parse_hostport
from relayd.components.stream.proto import scistream_pb2 as pb
from relayd.components.stream.proto.scistream_grpc import ControlStub


@dataclass
class Result:
    uid: str
    role: str
    listeners: list[str]  # where applications connect (this side's proxy ports)
    targets: list[str]  # what each listener forwards to


def client_ssl(server_cert: Path | None) -> ssl.SSLContext:
    """Verify the control server against `server_cert` (s2uc's pinned root) or system CAs."""
    ctx = ssl.create_default_context(cafile=str(server_cert) if server_cert else None)
    ctx.set_alpn_protocols(["h2"])
    return ctx


class StreamClient:
    def __init__(self, s2cs: str, *, ssl_context: ssl.SSLContext | None, token: str | None,
                 timeout: float = 30.0, hello_wait: float = 10.0) -> None:
        self.host, self.port = parse_hostport(s2cs)
        self.ssl_context = ssl_context
        self.metadata = {"authorization": token} if token else None
        self.timeout = timeout
        self.hello_wait = hello_wait

    async def __aenter__(self) -> StreamClient:
        self.channel = Channel(self.host, self.port, ssl=self.ssl_context)
        self.stub = ControlStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.channel.close()

    async def open_session(self, uid: str, role: str, num_conn: int, rate: int,
                           hello_listeners: list[str], targets: list[str]) -> Result:
        """req + hello, then update with `targets`; the session's listeners and mapping."""
        req = asyncio.ensure_future(self.stub.req(
            pb.Request(uid=uid, role=role, num_conn=num_conn, rate=rate), metadata=self.metadata))
        try:
            await self._hello(req, pb.Hello(uid=uid, prod_listeners=hello_listeners, role=role))
            response = await asyncio.wait_for(req, self.timeout)
        finally:
            if not req.done():
                req.cancel()
        if role == "PROD":
            targets = list(response.prod_listeners)  # the app endpoints the hello announced
        updated = await self.stub.update(
            pb.UpdateTargets(uid=uid, remote_listeners=targets, role=role),
            metadata=self.metadata, timeout=self.timeout)
        return Result(uid, role, list(updated.listeners), list(updated.prod_listeners))

    async def _hello(self, req: asyncio.Future, hello: pb.Hello) -> None:
        """Send the hello once the server has registered the req (retrying NOT_FOUND briefly)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hello_wait
        while True:
            try:
                await self.stub.hello(hello, metadata=self.metadata, timeout=self.timeout)
                return
            except GRPCError as exc:
                if exc.status is not Status.NOT_FOUND or loop.time() > deadline:
                    failure = req.exception() if req.done() else None
                    if failure is not None:
                        raise failure from None
                    raise
            # The req has not reached the server yet: wait for it to fail, or a moment.
            await asyncio.wait([req], timeout=0.05)
            if req.done():
                req.result()  # raises the req's error

    async def release(self, uid: str) -> None:
        await self.stub.release(pb.Release(uid=uid), metadata=self.metadata, timeout=self.timeout)
