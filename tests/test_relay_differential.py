"""Differential test: the same frames to the stock ``proxystore-relay`` and to relayd's relay give
the same bytes back and the same close codes and reasons, except where relayd deliberately
differs (documented in relayd.toml(5): non-objects and relay_response get 4000, not 1011)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets

from relayd.testing import free_port

STOCK = shutil.which("proxystore-relay", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(STOCK is None, reason="proxystore-relay is not installed")


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "relay exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def start_stock_relay(tmp: Path) -> tuple[subprocess.Popen, int]:
    """proxystore-relay on a free port; another port if one was taken between free_port() and
    its bind (it then exits: "address already in use"), which happens on a busy machine."""
    for _ in range(5):
        port = free_port()
        log = tmp / f"proxystore-relay-{port}.log"
        with log.open("wb") as out:
            stock = subprocess.Popen([STOCK, "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"],
                                     stdout=subprocess.DEVNULL, stderr=out, env={**os.environ})
        try:
            wait_listening(port, stock)
            return stock, port
        except AssertionError:
            stock.kill()
            stock.wait(15)
            if "address already in use" not in log.read_text(errors="replace"):
                raise AssertionError(f"proxystore-relay did not start: {log.read_text(errors='replace')}") from None
    raise AssertionError("proxystore-relay found no free port in 5 tries")


@pytest.fixture(scope="module")
def relays(tmp_path_factory):
    from relayd.testing import start_relayd, write_config

    tmp = tmp_path_factory.mktemp("diff")
    stock, stock_port = start_stock_relay(tmp)
    ours_port = free_port()
    ours = start_relayd(tmp, write_config(tmp / "etc", f"""
        [auth.open]
        method = "none"
        [listeners.relay]
        bind = "127.0.0.1:{ours_port}"
        [components.relay]
        kind = "relay"
        listener = "relay"
        auth = "open"
    """))
    try:
        yield {"stock": f"ws://127.0.0.1:{stock_port}", "relayd": f"ws://127.0.0.1:{ours_port}"}
    finally:
        stock.terminate()
        stock.wait(15)
        ours.kill()


U1, U2, U3 = "4f0d7f2e-8c1b-4e59-a1a4-0d6f4b6c2d11", "9a3e1b7c-55aa-4c1e-8d2f-7e6b5a4c3d22", "1b2c3d4e-0000-4000-8000-00000000abcd"


def reg(name: str, u: str) -> str:
    return json.dumps({"name": name, "uuid": u, "message_type": "relay_registration"})


def peer(src: str, dst: str, desc: str = "d", name: str = "alice", **extra) -> str:
    return json.dumps({"source_uuid": src, "source_name": name, "peer_uuid": dst, "description_type": "offer",
                       "description": desc, **extra, "message_type": "peer_connection"})


BARRIER = "--barrier--"


async def transcript(base: str, script: list[tuple[int, str | bytes]], conns: int = 2) -> list:
    """Send each (connection, frame) in order and record, per step, what every connection
    receives and how it is closed.

    No timeouts decide anything: after each step every registered connection sends itself a
    barrier message and reads up to it. Both relays handle a connection's messages in order,
    and a forward is written to the target before the sender's next message is handled, so
    whatever a step caused is read before the barrier. An unregistered connection that sent a
    frame reads exactly one reply or its close."""
    sockets = [await websockets.connect(base, compression=None) for _ in range(conns)]
    names: dict[int, tuple[str, str]] = {}  # connection -> (registered uuid, name)
    closed: set[int] = set()
    seen: list = []

    async def read(i: int, until_barrier: bool) -> None:
        ws = sockets[i]
        while True:
            try:
                text = await asyncio.wait_for(ws.recv(), 20)  # a guard only: a hang fails the test
            except websockets.ConnectionClosed:
                rcvd = ws.protocol.close_rcvd
                seen.append((i, "closed", rcvd.code if rcvd else None, rcvd.reason if rcvd else None))
                closed.add(i)
                names.pop(i, None)
                return
            if BARRIER in text:
                return
            seen.append((i, text))
            if not until_barrier:
                return

    for index, frame in script:
        if index in closed:
            continue
        await sockets[index].send(frame)
        if index not in names:
            await read(index, until_barrier=False)  # the registration reply, or a close
            if index not in closed and isinstance(frame, str) and '"relay_registration"' in frame \
                    and seen[-1][1].startswith('{"success": true'):
                obj = json.loads(frame)
                names[index] = (obj["uuid"], obj["name"])
        elif isinstance(frame, str) and '"relay_registration"' in frame:
            obj = json.loads(frame)
            names[index] = (obj["uuid"], obj["name"])
        for i in sorted(names, key=lambda c: c != index):
            if i in names:
                u, name = names[i]
                try:
                    await sockets[i].send(peer(u, u, BARRIER, name))
                except websockets.ConnectionClosed:
                    pass
                await read(i, until_barrier=True)
    for ws in sockets:
        await ws.close()
    return seen


SCRIPTS = {
    "register, forward with odd UUID spellings, unknown peer, re-register": [
        (0, reg("alice", U1)), (1, reg("bob", U2.upper().replace("-", ""))),
        (0, peer(U1, "{" + U2.upper() + "}", "caf\u00e9 \u2603")),
        (1, peer(U2.upper(), "urn:uuid:" + U1, "ans", "bob", error=None)),
        (0, peer(U1, U3, "nobody")), (0, reg("alice2", U1)), (0, peer(U1, U2, "after rename", "alice2")),
    ],
    "duplicate uuid kicks the old socket": [
        (0, reg("one", U1)), (1, reg("two", U1)), (1, peer(U1, U1, "self", "two")),
    ],
    "forward before registering": [(0, peer(U1, U2))],
    "binary frame": [(0, reg("a", U1)), (0, b"\x01\x02")],
    "not json": [(0, "{nope")],
    "class name as message_type": [(0, json.dumps({"name": "a", "uuid": U1, "message_type": "RelayRegistrationRequest"}))],
    "extra key": [(0, json.dumps({"name": "a", "uuid": U1, "x": 1, "message_type": "relay_registration"}))],
    "missing key": [(0, reg("a", U1)), (0, json.dumps({"source_uuid": U1, "peer_uuid": U1, "description_type": "offer",
                                                       "description": "d", "message_type": "peer_connection"}))],
    "bad uuid": [(0, json.dumps({"name": "a", "uuid": "zzz", "message_type": "relay_registration"}))],
}

# Where relayd differs on purpose (the stock relay crashes its handler with 1011 and, for
# relay_response, leaves a stale registration).
DELIBERATE = {
    "spoofed source": ([(0, reg("alice", U1)), (1, reg("bob", U2)), (0, peer(U3, U2, "x", "mallory"))], None, None),
    "non-object JSON": ([(0, reg("a", U1)), (0, "[1, 2]")], 1011, 4000),
    "client sends relay_response": ([(0, reg("a", U1)), (0, '{"success": true, "message": null, "error": false, '
                                                             '"message_type": "relay_response"}')], 1011, 4000),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_same_bytes_and_close_codes_as_proxystore_relay(relays, name):
    async def main():
        stock = await transcript(relays["stock"], SCRIPTS[name])
        ours = await transcript(relays["relayd"], SCRIPTS[name])
        assert ours == stock
        assert stock  # the script produced something to compare

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("name", list(DELIBERATE))
def test_deliberate_differences(relays, name):
    script, stock_code, our_code = DELIBERATE[name]

    async def main():
        stock = await transcript(relays["stock"], script)
        ours = await transcript(relays["relayd"], script)
        if stock_code is None:  # the stock relay forwards the forged source; relayd the registered one
            assert json.loads(stock[-1][1])["source_uuid"] == U3 and json.loads(ours[-1][1])["source_uuid"] == U1
            assert json.loads(ours[-1][1])["source_name"] == "alice" and stock[:-1] == ours[:-1]
            return
        assert [e[2] for e in stock if e[1] == "closed"] == [stock_code]
        assert [e[2:] for e in ours if e[1] == "closed"] == [(our_code, "Unknown message type.")]

    asyncio.run(asyncio.wait_for(main(), 60))
