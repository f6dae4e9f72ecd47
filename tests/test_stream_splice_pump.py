"""relayd.pump on its own (no stream session, no relayd process): what another component reusing
the pumps may rely on. Real TCP sockets on 127.0.0.1; waits are on events or futures."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading

import pytest

from relayd.pump import SPLICE_AVAILABLE, ProtocolPump, SplicePump, TokenBucket

pytestmark = pytest.mark.skipif(not SPLICE_AVAILABLE, reason="os.splice is Linux-only")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


def _read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(1 << 20):
        out += data
    return bytes(out)


async def _splice(data_fwd: bytes, data_back: bytes, gates=(None, None)):
    """client <-> (c_side | pump | t_side) <-> target; returns what each end read and the counts."""
    loop = asyncio.get_running_loop()
    client, c_side = tcp_pair()
    t_side, target = tcp_pair()
    counts = {True: 0, False: 0}
    lock = threading.Lock()

    def count(forward: bool, n: int) -> None:
        with lock:
            counts[forward] += n

    closed = loop.create_future()
    pump = SplicePump(c_side, t_side, loop=loop, gates=gates, count=count,
                      on_closed=lambda: closed.set_result(True), name="test")
    pump.start()

    def end(sock: socket.socket, data: bytes) -> bytes:
        writer = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
        writer.start()
        got = _read_all(sock)
        writer.join()
        sock.close()
        return got

    got_target, got_client = await asyncio.gather(asyncio.to_thread(end, target, data_back),
                                                  asyncio.to_thread(end, client, data_fwd))
    await asyncio.wait_for(closed, 30)
    return got_target, got_client, counts, (c_side, t_side)


def test_splice_pump_moves_both_ways_with_half_close_and_counts():
    fwd, back = os.urandom(40 << 20), os.urandom(3 << 20)
    got_target, got_client, counts, socks = asyncio.run(_splice(fwd, back))
    assert hashlib.sha256(got_target).digest() == hashlib.sha256(fwd).digest()
    assert got_client == back
    assert counts == {True: len(fwd), False: len(back)}
    assert all(s.fileno() == -1 for s in socks)  # the pump closed what it owned


def test_splice_pump_gate_holds_the_rate():
    rate = 8_000_000.0  # 8 MB/s, 4 MB: about half a second

    async def run() -> float:
        loop = asyncio.get_running_loop()
        gate = TokenBucket(rate, rate * 0.05, loop.time())
        t0 = loop.time()
        got_target, _, _, _ = await _splice(b"r" * 4_000_000, b"", gates=(gate, None))
        assert len(got_target) == 4_000_000
        return loop.time() - t0

    elapsed = asyncio.run(run())
    # at least the time the bucket allows (minus its initial burst); no upper bound: not timed
    assert elapsed >= (4_000_000 - rate * 0.05) / rate * 0.95, elapsed


def test_splice_pump_abort_wakes_blocked_threads_and_resets_both_ends():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        client, c_side = tcp_pair()
        t_side, target = tcp_pair()
        closed = loop.create_future()
        pump = SplicePump(c_side, t_side, loop=loop, on_closed=lambda: closed.set_result(True))
        pump.start()  # both threads now block in splice: nothing is sent either way
        pump.abort()
        await asyncio.wait_for(closed, 30)
        for sock in (client, target):
            sock.settimeout(30)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
            sock.close()

    asyncio.run(run())


def test_protocol_pump_joins_two_transports():
    """The event-loop pump with an accepted first connection and a dialled second, as stream
    uses it, but with nothing of stream's: bytes both ways, half-close, counts, on_closed."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        target_srv = socket.create_server(("127.0.0.1", 0))
        target_srv.setblocking(False)
        counts = {True: 0, False: 0}
        closed = loop.create_future()

        def make_pump():
            pump = ProtocolPump(loop, buffer_size=1 << 20, count=lambda f, n: counts.__setitem__(f, counts[f] + n),
                                on_closed=lambda: closed.done() or closed.set_result(True))

            async def dial() -> None:
                second = pump.second_side()
                await loop.create_connection(lambda: second, *target_srv.getsockname())
                pump.link(second)

            pump.on_first = lambda: loop.create_task(dial())
            return pump.first

        server = await loop.create_server(make_pump, "127.0.0.1", 0)
        client = socket.create_connection(server.sockets[0].getsockname())
        target, _ = await loop.sock_accept(target_srv)
        target.setblocking(True)
        fwd, back = os.urandom(8 << 20), os.urandom(1 << 20)

        def end(sock: socket.socket, data: bytes) -> bytes:
            writer = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
            writer.start()
            got = _read_all(sock)
            writer.join()
            sock.close()
            return got

        got_target, got_client = await asyncio.gather(asyncio.to_thread(end, target, back),
                                                      asyncio.to_thread(end, client, fwd))
        await asyncio.wait_for(closed, 30)
        assert got_target == fwd and got_client == back
        assert counts == {True: len(fwd), False: len(back)}
        server.close()
        target_srv.close()

    asyncio.run(run())
