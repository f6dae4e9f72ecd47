"""Plain sessions through the splice(2) pump, on a real relayd: bytes exact (1 GiB, num_conn 1
and 4, hashed at both ends), counters exact, rate, backpressure (relayd's memory does not grow),
and ending: hostile peers and a release in the middle leave no descriptor or thread behind.

Nothing here waits on time for synchronisation: each wait polls a condition with a deadline.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import struct
import threading
import time
from pathlib import Path

import grpc
import pytest

from stream_helpers import (
    auth_none,
    back_to,
    chunk_stream,
    drain,
    flood_both_ways,
    free_port,
    open_fds,
    open_session,
    pb,
    peer_closed,
    poll_until,
    port_range,
    process_rss,
    send_stream,
    start,
    stream_config,
    stub,
    thread_count,
)

GiB = 1 << 30
MB = 1_000_000


@pytest.fixture
def plane(tmp_path):
    ctl = free_port()
    daemon = start(tmp_path, "splice", stream_config(ctl, port_range(8), auth=auth_none(),
                                                       extra='rate_unit = "kB/s"'))
    channel, control = stub(ctl)
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen(64)
    yield daemon, control, app
    app.close()
    channel.close()
    daemon.kill()


# -- helpers ---------------------------------------------------------------------------------


def _session(control, uid: str, app: socket.socket, num_conn: int = 1, rate: int = 0) -> list[tuple[str, int]]:
    _, upd = open_session(control, uid, "PROD", num_conn, [f"127.0.0.1:{app.getsockname()[1]}"], rate=rate)
    return [(h, int(p)) for h, p in (item.rsplit(":", 1) for item in upd.listeners)]


def _row(daemon, uid: str) -> dict:
    rows = json.loads(daemon.ctl("sessions", "s2cs", "--json").stdout)["sessions"]
    return next(r for r in rows if r["uid"] == uid)


# -- hostile peers first --------------------------------------------------------------------


def test_hostile_peers_leave_no_descriptor_or_thread(plane):
    """Clients that reset at once, half-send then reset, or close before the target answers;
    a target that resets in the middle: every connection ends, nothing leaks."""
    daemon, control, app = plane
    pid = daemon.process.pid
    [address] = _session(control, "hostile", app)
    fds, threads = open_fds(pid), thread_count(pid)

    for _ in range(20):  # connect and reset before relayd has dialled the target
        c = socket.create_connection(address)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    for _ in range(20):  # some bytes, then a reset
        c = socket.create_connection(address)
        c.sendall(b"x" * 100_000)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    accepted: list[socket.socket] = []

    def settled() -> bool:  # accept whatever relayd dialled until all those connections ended
        app.setblocking(False)
        try:
            while True:
                accepted.append(app.accept()[0])
        except BlockingIOError:
            pass
        return _row(daemon, "hostile")["connections"] == 0

    poll_until(settled, "the reset clients' connections end")
    settled()
    for s in accepted:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    # a transfer whose target resets while the client is still sending
    app.settimeout(30)
    client = socket.create_connection(address, timeout=30)
    served, _ = app.accept()
    client.sendall(b"y" * (4 << 20))
    assert served.recv(1 << 16)
    served.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    served.close()
    poll_until(lambda: peer_closed(client), "the client sees the target's reset")
    client.close()

    poll_until(lambda: _row(daemon, "hostile")["connections"] == 0, "connections end")
    back_to(pid, fds, threads)


# -- bytes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_conn", [1, 4])
def test_one_gib_is_byte_exact_and_counted(plane, num_conn):
    """1 GiB to the target split over num_conn connections, and 64 MiB back on each, at once;
    sha256 at both ends; relayd's counters equal what was sent; splice threads run (two per
    connection) and are gone afterwards."""
    daemon, control, app = plane
    pid = daemon.process.pid
    threads0 = thread_count(pid)
    uid = f"gib-{num_conn}"
    addresses = _session(control, uid, app, num_conn=num_conn)
    assert len(addresses) == num_conn
    up, down = GiB // num_conn, 64 << 20
    results: dict = {}
    errors: list[BaseException] = []

    def guarded(fn, *args):
        def run():
            try:
                fn(*args)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
        t = threading.Thread(target=run)
        t.start()
        return t

    def client_side(i, address):
        with socket.create_connection(address, timeout=120) as c:
            sent, got = hashlib.sha256(), hashlib.sha256()
            reader = guarded(lambda: results.__setitem__(("client got", i), (drain(c, got), got.hexdigest())))
            send_stream(c, up, i, sent)
            reader.join(300)
            results[("client sent", i)] = sent.hexdigest()

    def app_side():
        served = []
        for _ in range(num_conn):
            s, _ = app.accept()
            s.settimeout(120)
            served.append(s)
        workers = []
        for s in served:
            # which client is this? the first 16 bytes name the stream (seed, 0)
            head = b""
            while len(head) < 16:
                head += s.recv(16 - len(head))
            seed = struct.unpack_from("<Q", head)[0]

            def serve(s=s, seed=seed, head=head):
                got, sent = hashlib.sha256(), hashlib.sha256()
                got.update(head)
                writer = guarded(send_stream, s, down, 1000 + seed, sent)
                n = 16 + drain(s, got)
                writer.join(300)
                results[("app got", seed)] = (n, got.hexdigest())
                results[("app sent", seed)] = sent.hexdigest()
                s.close()
            workers.append(guarded(serve))
        for w in workers:
            w.join(300)

    app.settimeout(60)
    server = guarded(app_side)
    clients = [guarded(client_side, i, a) for i, a in enumerate(addresses)]
    # two splice threads per connection while they run
    poll_until(lambda: errors or thread_count(pid) >= threads0 + 2 * num_conn, "splice threads start", 60)
    for t in [*clients, server]:
        t.join(600)
    assert not errors, errors
    for i in range(num_conn):
        assert results[("app got", i)] == (up, results[("client sent", i)])
        assert results[("client got", i)] == (down, results[("app sent", i)])
    row = poll_until(lambda: (r := _row(daemon, uid))["connections"] == 0 and r, "connections end")
    assert row["bytes_to_target"] == GiB and row["bytes_from_target"] == num_conn * down
    poll_until(lambda: thread_count(pid) <= threads0, f"threads back to {threads0}")


def test_rate_is_enforced_through_splice(plane):
    """20 MB/s summed over 4 connections, each sending as fast as it can: within 5 %."""
    daemon, control, app = plane
    addresses = _session(control, "rated", app, num_conn=4, rate=20_000)  # kB/s
    total = 40 * MB  # 2 s at the limit
    per = total // 4
    stamps: list[float] = []
    received = [0]
    lock = threading.Lock()

    def serve(s):
        with s:
            while chunk := s.recv(1 << 20):
                with lock:
                    if not stamps:
                        stamps.append(time.monotonic())
                    received[0] += len(chunk)
            with lock:
                stamps.append(time.monotonic())

    def send(address):
        with socket.create_connection(address, timeout=60) as c:
            send_stream(c, per, 7, hashlib.sha256())
            c.recv(1)

    app.settimeout(60)
    senders = [threading.Thread(target=send, args=(a,)) for a in addresses]
    for t in senders:
        t.start()
    servers = []
    for _ in addresses:
        s, _ = app.accept()
        servers.append(threading.Thread(target=serve, args=(s,)))
        servers[-1].start()
    for t in senders + servers:
        t.join(120)
    assert received[0] == total
    rate = total / (max(stamps) - min(stamps))
    print(f"splice, 4 connections at 20 MB/s: {rate / MB:.2f} MB/s")
    assert abs(rate - 20 * MB) <= 0.05 * 20 * MB, rate
    assert _row(daemon, "rated")["bytes_to_target"] == total


def test_slow_reader_does_not_grow_relayd_memory(plane):
    """The application stops reading: the client soon cannot send, relayd's RSS stays put
    (the bytes in flight are in the kernel's socket buffers and pipe, never in relayd)."""
    daemon, control, app = plane
    pid = daemon.process.pid
    [address] = _session(control, "slow", app)
    client = socket.create_connection(address, timeout=30)
    served, _ = app.accept()
    served.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    rss0 = process_rss(pid)
    client.setblocking(False)
    chunks = chunk_stream(3)
    digest = hashlib.sha256()
    sent = 0
    pending = memoryview(b"")
    while sent < 512 << 20:  # until a send cannot progress for 2 s: everything on the way is full
        if not select.select([], [client], [], 2.0)[1]:
            break
        if not pending:
            pending = memoryview(bytes(next(chunks)))
        try:
            n = client.send(pending)
        except BlockingIOError:
            continue
        digest.update(pending[:n])
        pending = pending[n:]
        sent += n
    rmem, wmem = (int(Path(f"/proc/sys/net/ipv4/tcp_{k}").read_text().split()[2]) for k in ("rmem", "wmem"))
    bound = 2 * (rmem + wmem) + 2 * (1 << 20) + (8 << 20)  # socket buffers, the pipe, slack
    assert sent < bound < 512 << 20, (sent, bound)
    grown = process_rss(pid) - rss0
    assert grown < 16 << 20, f"relayd's RSS grew by {grown} bytes while {sent} were in flight"
    # everything arrives once the application reads
    client.setblocking(True)
    if pending:
        client.sendall(pending)
        digest.update(pending)
        sent += len(pending)
    client.shutdown(socket.SHUT_WR)
    got = hashlib.sha256()
    served.settimeout(60)
    assert drain(served, got) == sent and got.hexdigest() == digest.hexdigest()
    client.close()
    served.close()


def test_release_mid_transfer_closes_both_sides_and_leaks_nothing(plane):
    """Data flowing both ways on 4 connections; release: every socket on both sides sees the
    close promptly, relayd's descriptors and threads return to what they were before."""
    daemon, control, app = plane
    pid = daemon.process.pid
    with pytest.raises(grpc.RpcError):  # connects the control channel (it is lazy): not a leak
        control.release(pb.Release(uid="none"), timeout=10)
    fds, threads = open_fds(pid), thread_count(pid)
    addresses = _session(control, "mid", app, num_conn=4)
    stop = threading.Event()
    ends: list[str] = []

    clients = [socket.create_connection(a, timeout=30) for a in addresses]
    app.settimeout(30)
    served = [app.accept()[0] for _ in addresses]
    workers = flood_both_ways(clients, served, stop, ends)
    poll_until(lambda: (r := _row(daemon, "mid"))["bytes_to_target"] > 64 << 20
          and r["bytes_from_target"] > 64 << 20, "data flows both ways")
    control.release(pb.Release(uid="mid"), timeout=10)
    try:
        poll_until(lambda: len(ends) == 2 * len(addresses), "every socket sees the close", 30)
    finally:
        stop.set()
        for t in workers:
            t.join(30)
    back_to(pid, fds, threads)
    rows = json.loads(daemon.ctl("sessions", "s2cs", "--json").stdout)["sessions"]
    assert all(r["uid"] != "mid" for r in rows)


def test_stop_with_splice_connections_open_ends_promptly(tmp_path):
    """relayd stops (SIGTERM) while a spliced connection moves data: the drain ends with the
    connection reset, the process exits, the peers see the close."""
    ctl = free_port()
    # drain_timeout is top-level: before the first table
    daemon = start(tmp_path, "stop", "drain_timeout = 1\n" + stream_config(ctl, port_range(4), auth=auth_none()))
    channel, control = stub(ctl)
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen()
    try:
        [address] = _session(control, "stopping", app)
        client = socket.create_connection(address, timeout=30)
        served, _ = app.accept()
        client.sendall(b"q" * (1 << 20))
        assert served.recv(1 << 16)
        assert daemon.stop(timeout=30) == 0
        poll_until(lambda: peer_closed(client), "the client sees the close")
        poll_until(lambda: peer_closed(served), "the target sees the close")
        client.close()
        served.close()
    finally:
        app.close()
        channel.close()
        daemon.kill()


def test_reload_replacing_the_component_lets_a_spliced_transfer_finish(tmp_path):
    """A reload that rebuilds the stream component: the old one drains (drain_timeout), so a
    spliced connection in flight carries on and ends byte-exact; descriptors are released."""
    ctl = free_port()
    ports = port_range(8)
    config = "drain_timeout = 60\n" + stream_config(ctl, ports, auth=auth_none())
    daemon = start(tmp_path, "reload", config)
    channel, control = stub(ctl)
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen()
    try:
        [address] = _session(control, "reloaded", app)
        client = socket.create_connection(address, timeout=60)
        served, _ = app.accept()
        served.settimeout(60)
        sent, got = hashlib.sha256(), hashlib.sha256()
        chunks = chunk_stream(5)
        first = bytes(next(chunks))
        client.sendall(first)
        sent.update(first)
        received = 0
        while received < len(first):
            data = served.recv(1 << 20)
            got.update(data)
            received += len(data)
        # rebuild the component (max_sessions changed), keeping the listener
        (tmp_path / "reload" / "etc" / "relayd.toml").write_text(config.replace(
            'kind = "stream"', 'kind = "stream"\nmax_sessions = 512'))
        result = daemon.ctl("reload")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "draining (replaced or removed): components.s2cs" in daemon.ctl("status").stdout
        total = [received]

        def read_rest():
            total[0] += drain(served, got)

        reader = threading.Thread(target=read_rest)
        reader.start()
        send_stream(client, 256 << 20, 6, sent)
        reader.join(120)
        assert total[0] == len(first) + (256 << 20) and got.hexdigest() == sent.hexdigest()
        served.close()  # the application's close reaches the client through the old component
        poll_until(lambda: peer_closed(client), "the client sees the close")
        client.close()
    finally:
        app.close()
        channel.close()
        daemon.kill()
