"""The scistream.Control gRPC service (grpclib) over the session manager.

Every RPC authenticates first (before looking at the uid, unlike s2cs), with the token from
the ``authorization`` metadata, raw as s2uc sends it or with a ``Bearer``/other scheme.
Auth failures use s2cs's exact status and wording, which s2uc keys on:
UNAUTHENTICATED "Authentication token is missing|invalid for scope <scope id>".
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from relayd.auth.base import AuthError, AuthFailure, AuthMethod, Identity
from relayd.components.stream.manager import SessionManager
from relayd.components.stream.model import StreamError, format_hostport
from relayd.components.stream.proto import scistream_pb2 as pb
from relayd.components.stream.proto.scistream_grpc import ControlBase

_SCHEMES = ("bearer ", "basic ")


class ControlService(ControlBase):
    def __init__(self, manager: SessionManager, auth: AuthMethod, scope_id: str, log: logging.Logger) -> None:
        self.manager = manager
        self.auth = auth
        self.scope_id = scope_id
        self.log = log
        self.calls: Counter[tuple[str, str]] = Counter()  # (rpc, status name) -> calls

    async def _authenticate(self, rpc: str, stream: Stream) -> Identity:
        value = stream.metadata.get("authorization") if stream.metadata else None
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if value is not None:
            value = value.strip()
            if value and not value.lower().startswith(_SCHEMES):
                value = f"Bearer {value}"  # s2uc sends the bare token
        try:
            return await self.auth.authenticate(value or None)
        except AuthError as exc:
            self.log.info("%s refused: %s (%s)", rpc, exc.reason.value, exc.message)
            if exc.reason is AuthFailure.UNAVAILABLE:
                raise GRPCError(Status.UNAVAILABLE, f"cannot check the token now: {exc.message}") from None
            word = "missing" if exc.reason is AuthFailure.MISSING else "invalid"
            raise GRPCError(Status.UNAUTHENTICATED,
                            f"Authentication token is {word} for scope {self.scope_id}") from None

    async def _serve(self, rpc: str, stream: Stream, handle: Callable[[Identity, Any], Awaitable[Any]]) -> None:
        status = "OK"
        try:
            try:
                request = await stream.recv_message()
            except DecodeError:
                raise StreamError(Status.INVALID_ARGUMENT, f"malformed {rpc} message") from None
            identity = await self._authenticate(rpc, stream)
            reply = await handle(identity, request)
            await stream.send_message(reply)
        except StreamError as exc:
            status = exc.status.name
            # A hello before its req is routine (appctrl and our own clients retry until the req
            # is registered); so is a client's own mistake. The client hears the reason.
            routine = exc.status in (Status.NOT_FOUND, Status.INVALID_ARGUMENT, Status.ALREADY_EXISTS,
                                     Status.FAILED_PRECONDITION)
            self.log.log(logging.DEBUG if routine else logging.INFO, "%s refused: %s", rpc, exc.message)
            raise GRPCError(exc.status, exc.message) from None
        except GRPCError as exc:
            status = exc.status.name
            raise
        except Exception:
            status = "UNKNOWN"
            raise
        finally:
            self.calls[(rpc, status)] += 1

    # -- RPCs ------------------------------------------------------------------------------

    async def req(self, stream: Stream) -> None:
        async def handle(who: Identity, msg: pb.Request) -> pb.Response:
            session = await self.manager.req(who, msg.uid, msg.role, msg.num_conn, msg.rate)
            return pb.Response(listeners=session.listeners, prod_listeners=session.prod_listeners)

        await self._serve("req", stream, handle)

    async def hello(self, stream: Stream) -> None:
        async def handle(who: Identity, msg: pb.Hello) -> pb.AppResponse:
            session = self.manager.hello(who, msg.uid, list(msg.prod_listeners))
            return pb.AppResponse(message="Sending Prod listeners...", listeners=session.listeners)

        await self._serve("hello", stream, handle)

    async def update(self, stream: Stream) -> None:
        async def handle(who: Identity, msg: pb.UpdateTargets) -> pb.Response:
            session = await self.manager.update(who, msg.uid, list(msg.remote_listeners))
            mapped = [format_hostport(h, p) for h, p in session.targets]
            return pb.Response(listeners=session.listeners, prod_listeners=mapped)

        await self._serve("update", stream, handle)

    async def release(self, stream: Stream) -> None:
        async def handle(who: Identity, msg: pb.Release) -> pb.Response:
            self.manager.release(who, msg.uid)
            return pb.Response()

        await self._serve("release", stream, handle)
