"""Fuzz the relay over real sockets: malformed frames never crash it, never leave a stale
registration, and every close uses a documented code. The relay runs in-process (in a thread)
so the test can look at its registry after every example."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from relayd.auth.none import NoAuth, NoAuthConfig
from relayd.components.relay import protocol as p
from relayd.components.relay.config import RelayConfig
from relayd.components.relay.server import RelayServer
from relayd.config.model import ListenerConfig
from relayd.listeners import Listener, bind_socket


class InProcessRelay:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        sock = bind_socket("127.0.0.1:0", 64)
        self.port = sock.getsockname()[1]
        self.listener = Listener("fuzz", ListenerConfig(bind=f"127.0.0.1:{self.port}"), [sock], None, False)
        config = RelayConfig(kind="relay", listener="fuzz", auth="open", max_message_bytes=2000,
                             register_timeout=None, current_clients_interval=None)
        auth = NoAuth("open", NoAuthConfig(method="none"), None)  # type: ignore[arg-type]
        import logging

        async def start() -> RelayServer:  # aiohttp's server wants the running loop
            server = RelayServer(config, auth, logging.getLogger("relayd.relay.fuzz"))
            await server.start(self.listener)
            return server

        self.server = self.call(start())

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def snapshot(self) -> tuple[int, int]:
        async def read():
            return len(self.server.core.connections), len(self.server.core.by_uuid)
        return self.call(read())

    def wait_idle(self, timeout: float = 10.0) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while (state := self.snapshot()) != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        return state

    def stop(self) -> None:
        self.call(self.server.stop(1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.listener.sockets[0].close()


@pytest.fixture(scope="module")
def relay():
    server = InProcessRelay()
    yield server
    server.stop()


UUIDS = [str(uuid.UUID(int=i)) for i in range(1, 3)]
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.sampled_from(UUIDS),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)


@st.composite
def mutated(draw):
    base = draw(st.sampled_from([
        {"name": "n", "uuid": UUIDS[0], "message_type": "relay_registration"},
        {"source_uuid": UUIDS[0], "source_name": "s", "peer_uuid": UUIDS[1], "description_type": "offer",
         "description": "d", "error": None, "message_type": "peer_connection"},
        {"success": True, "message": None, "error": False, "message_type": "relay_response"},
    ]))
    obj = dict(base)
    for key in draw(st.lists(st.sampled_from(sorted(obj)), max_size=2)):
        obj.pop(key, None)
    obj.update(draw(st.dictionaries(st.sampled_from(["name", "uuid", "message_type", "peer_uuid", "error",
                                                     "description_type", "x"]), json_values, max_size=2)))
    return json.dumps(obj)


frames = st.one_of(mutated(), json_values.map(json.dumps), st.text(max_size=30), st.binary(max_size=30),
                   st.sampled_from(["{" * 5000, "[" * 100000, "\"" + "x" * 3000 + "\""]))


def finish(ws) -> int:
    """Read until the relay closes; our own close (1000) if it never does."""
    try:
        while True:
            ws.recv(timeout=0.3)
    except TimeoutError:
        ws.close()
    except ConnectionClosed:
        pass
    rcvd = ws.protocol.close_rcvd
    return rcvd.code if rcvd else 1006


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(register_first=st.booleans(), script=st.lists(frames, min_size=1, max_size=4))
def test_fuzz_frames_over_websocket(relay, register_first, script):
    with connect(f"ws://127.0.0.1:{relay.port}", compression=None, open_timeout=10) as ws:
        try:
            if register_first:
                ws.send(json.dumps({"name": "f", "uuid": str(uuid.uuid4()), "message_type": "relay_registration"}))
                assert json.loads(ws.recv(timeout=10))["success"] is True
            for frame in script:
                ws.send(frame)
        except ConnectionClosed:
            pass
        code = finish(ws)
    assert code in p.DOCUMENTED_CODES | {1000}
    assert code != p.INTERNAL_ERROR  # documented, but only a bug produces it
    assert relay.wait_idle() == (0, 0), "stale connection or registration"


HANDSHAKE = (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.integers(0, 255), second=st.integers(0, 255), tail=st.binary(max_size=40))
def test_fuzz_raw_frame_bytes(relay, first, second, tail):
    """Arbitrary frame headers: bad opcodes, reserved bits, unmasked frames, bad UTF-8, truncation."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(HANDSHAKE)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        assert data.startswith(b"HTTP/1.1 101")
        sock.sendall(bytes([first, second]) + tail)
        sock.shutdown(socket.SHUT_WR)  # then the relay sees EOF, whatever the frame was
        data = data.split(b"\r\n\r\n", 1)[1]
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
    if len(data) >= 4 and data[0] == 0x88:  # a close frame: check its code
        code = int.from_bytes(data[2:4], "big")
        assert code in p.DOCUMENTED_CODES | {1000} and code != p.INTERNAL_ERROR
    assert relay.wait_idle() == (0, 0), "stale connection or registration"
