"""TLS sessions through the threaded TLS pump, on two real relayd (mutual TLS, a trustme CA per
facility, as in test_stream_e2e): client -> CONS relayd (plain -> TLS) -> PROD relayd (TLS ->
plain) -> application. Bytes exact (1 GiB, num_conn 1 and 4, both ways at once, hashed at both
ends), counters exact, rate, backpressure (neither relayd's memory grows), and ending: a release
in the middle and failed handshakes leave no descriptor or thread behind.

TLS cannot half-close (see relayd.pump.tls): a side's EOF ends the connection, so the ends here
read exact lengths before closing. Waits poll a condition with a deadline, never a sleep.
"""

from __future__ import annotations

import functools
import hashlib
import json
import select
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import grpc
import pytest
import trustme

from stream_helpers import (
    CHUNK,
    auth_none,
    back_to,
    chunk_stream,
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

# The TLS tests keep the connection open after the bytes (the peer's answer comes back on it).
send_exact = functools.partial(send_stream, shutdown=False)

GiB = 1 << 30
MB = 1_000_000


def _start_chain(tmp_path: Path, extra: dict[str, str]):
    """PROD and CONS relayd with security = "tls" (plus extra[side] at the top of the component)."""
    cas = {"prod": trustme.CA(), "cons": trustme.CA()}
    daemons, controls, channels = {}, {}, []
    for side, other in (("prod", "cons"), ("cons", "prod")):
        pem = tmp_path / f"{side}.pem"
        cas[side].issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
        cas[other].cert_pem.write_to_path(str(tmp_path / f"{side}-peer-ca.pem"))
        conf = (f'{extra.get(side, "")}\nrate_unit = "kB/s"\nsecurity = "tls"\n[components.s2cs.tls]\n'
                f'cert = "{pem}"\nkey = "{pem}"\nca = "{tmp_path / f"{side}-peer-ca.pem"}"\n')
        ctl = free_port()
        daemons[side] = start(tmp_path, side, stream_config(ctl, port_range(8), auth=auth_none(), extra=conf))
        channel, controls[side] = stub(ctl)
        channels.append(channel)
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen(64)
    return (daemons, controls, app, cas), channels


@pytest.fixture
def chain(tmp_path: Path):
    """Both relayd on the threaded TLS pump; yields (daemons, controls, app, CAs)."""
    started, channels = _start_chain(tmp_path, {})
    yield started
    _stop_chain(started, channels)


def _stop_chain(started, channels) -> None:
    daemons, _, app, _ = started
    app.close()
    for channel in channels:
        channel.close()
    for daemon in daemons.values():
        daemon.kill()


def _sessions(controls, uid: str, app: socket.socket, num_conn: int = 1,
              rates: dict[str, int] | None = None) -> list[tuple[str, int]]:
    """The PROD session (targets: the application), then the CONS one (targets: PROD's ports);
    returns the CONS listeners the client connects to."""
    rates = rates or {}
    _, prod = open_session(controls["prod"], uid, "PROD", num_conn, [f"127.0.0.1:{app.getsockname()[1]}"],
                           rate=rates.get("prod", 0))
    _, cons = open_session(controls["cons"], uid, "CONS", num_conn, list(prod.listeners),
                           rate=rates.get("cons", 0))
    return [(h, int(p)) for h, p in (item.rsplit(":", 1) for item in cons.listeners)]


def _row(daemon, uid: str) -> dict:
    rows = json.loads(daemon.ctl("sessions", "s2cs", "--json").stdout)["sessions"]
    return next(r for r in rows if r["uid"] == uid)


def _recv_exact(sock: socket.socket, total: int, digest) -> int:
    buf = memoryview(bytearray(CHUNK))
    got = 0
    while got < total:
        n = sock.recv_into(buf[:min(CHUNK, total - got)])
        if not n:
            break
        digest.update(buf[:n])
        got += n
    return got


def _threads_running(errors: list[BaseException]):
    def guarded(fn, *args) -> threading.Thread:
        def run():
            try:
                fn(*args)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
        t = threading.Thread(target=run)
        t.start()
        return t
    return guarded


@pytest.mark.slow
@pytest.mark.parametrize("num_conn", [1, 4])
def test_one_gib_is_byte_exact_and_counted_through_tls(chain, num_conn):
    """1 GiB to the application split over num_conn connections and 64 MiB back on each, at
    once; sha256 at both ends; both relayd count exactly; two pump threads per connection in
    each relayd while it runs, none afterwards."""
    daemons, controls, app, _ = chain
    pids = {side: d.process.pid for side, d in daemons.items()}
    threads0 = {side: thread_count(pid) for side, pid in pids.items()}
    uid = f"tls-gib-{num_conn}"
    addresses = _sessions(controls, uid, app, num_conn=num_conn)
    up, down = GiB // num_conn, 64 << 20
    results: dict = {}
    errors: list[BaseException] = []
    guarded = _threads_running(errors)

    def client_side(i, address):
        with socket.create_connection(address, timeout=120) as c:
            sent, got = hashlib.sha256(), hashlib.sha256()
            reader = guarded(lambda: results.__setitem__(("client got", i), (_recv_exact(c, down, got),
                                                                             got.hexdigest())))
            send_exact(c, up, i, sent)
            results[("client sent", i)] = sent.hexdigest()
            reader.join(600)
            # then close: the application has read everything once its count is reached

    def app_side():
        served = []
        for _ in range(num_conn):
            s, _ = app.accept()
            s.settimeout(120)
            served.append(s)
        workers = []
        for s in served:
            head = b""  # which client is this? the first 16 bytes name the stream (seed, 0)
            while len(head) < 16:
                head += s.recv(16 - len(head))
            seed = struct.unpack_from("<Q", head)[0]

            def serve(s=s, seed=seed, head=head):
                got, sent = hashlib.sha256(), hashlib.sha256()
                got.update(head)
                writer = guarded(send_exact, s, down, 1000 + seed, sent)
                n = 16 + _recv_exact(s, up - 16, got)
                writer.join(600)
                results[("app got", seed)] = (n, got.hexdigest())
                results[("app sent", seed)] = sent.hexdigest()
                assert s.recv(1) == b""  # the client's close arrives as EOF
                s.close()
            workers.append(guarded(serve))
        for w in workers:
            w.join(600)

    app.settimeout(60)
    server = guarded(app_side)
    clients = [guarded(client_side, i, a) for i, a in enumerate(addresses)]
    for side, pid in pids.items():
        poll_until(lambda pid=pid, side=side: errors or thread_count(pid) >= threads0[side] + 2 * num_conn,
                   f"{side}: pump threads start", 60)
    for t in [*clients, server]:
        t.join(900)
    assert not errors, errors
    for i in range(num_conn):
        assert results[("app got", i)] == (up, results[("client sent", i)])
        assert results[("client got", i)] == (down, results[("app sent", i)])
    for side, daemon in daemons.items():
        row = poll_until(lambda d=daemon: (r := _row(d, uid))["connections"] == 0 and r, f"{side}: connections end")
        assert row["bytes_to_target"] == GiB and row["bytes_from_target"] == num_conn * down, (side, row)
        poll_until(lambda s=side: thread_count(pids[s]) <= threads0[s], f"{side}: threads back")


@pytest.mark.parametrize("rated", ["prod", "cons"])
def test_rate_is_enforced_through_tls(chain, rated):
    """20 MB/s on one facility's session (PROD: the pump's decrypting reader is gated; CONS: its
    plain reader before encryption), summed over 4 connections each sending as fast as it can:
    within 5 % at the application."""
    daemons, controls, app, _ = chain
    addresses = _sessions(controls, "tls-rated", app, num_conn=4, rates={rated: 20_000})  # kB/s
    total = 40 * MB  # 2 s at the limit
    per = total // 4
    # timed from the first 4 MB on: the connections' setup through two relayd (handshake, dial)
    # holds the first bytes back while the gate already counts them
    start = 4 * MB
    stamps: list[tuple[float, int]] = []  # (when, bytes received by then)
    received = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []
    guarded = _threads_running(errors)

    def serve(s):
        with s:
            got = 0
            while got < per and (chunk := s.recv(1 << 20)):
                with lock:
                    received[0] += len(chunk)
                    if not stamps and received[0] >= start:
                        stamps.append((time.monotonic(), received[0]))
                got += len(chunk)
            with lock:
                stamps.append((time.monotonic(), received[0]))
            s.sendall(b"k")  # the client closes once the application has it all

    def send(address):
        with socket.create_connection(address, timeout=60) as c:
            send_exact(c, per, 7, hashlib.sha256())
            assert c.recv(1) == b"k"

    app.settimeout(60)
    senders = [guarded(send, a) for a in addresses]
    servers = [guarded(serve, app.accept()[0]) for _ in addresses]
    for t in senders + servers:
        t.join(120)
    assert not errors, errors
    assert received[0] == total
    (t0, n0), (t1, n1) = min(stamps), max(stamps)
    rate = (n1 - n0) / (t1 - t0)
    print(f"TLS, 4 connections at 20 MB/s on {rated}: {rate / MB:.2f} MB/s")
    assert abs(rate - 20 * MB) <= 0.05 * 20 * MB, rate
    for daemon in daemons.values():
        assert _row(daemon, "tls-rated")["bytes_to_target"] == total


def test_slow_reader_does_not_grow_relayd_memory_through_tls(chain):
    """The application stops reading: the client soon cannot send, and neither relayd's RSS grows
    (in flight: socket buffers and each pump's fixed buffers, nothing queued in the heap)."""
    daemons, controls, app, _ = chain
    pids = {side: d.process.pid for side, d in daemons.items()}
    [address] = _sessions(controls, "tls-slow", app)
    client = socket.create_connection(address, timeout=30)
    served, _ = app.accept()
    served.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    rss0 = {side: process_rss(pid) for side, pid in pids.items()}
    client.setblocking(False)
    chunks = chunk_stream(3)
    digest = hashlib.sha256()
    sent = 0
    pending = memoryview(b"")
    while sent < 1 << 30:  # until a send cannot progress for 2 s: everything on the way is full
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
    # three hops of socket buffers, each relayd's pump buffers (1 MiB each way and ciphertext), slack
    bound = 3 * (rmem + wmem) + 2 * 4 * (1 << 20) + (16 << 20)
    assert sent < bound < 1 << 30, (sent, bound)
    for side, pid in pids.items():
        grown = process_rss(pid) - rss0[side]
        assert grown < 16 << 20, f"{side} relayd's RSS grew by {grown} bytes while {sent} were in flight"
    # everything arrives once the application reads
    client.setblocking(True)
    if pending:
        client.sendall(pending)
        digest.update(pending)
        sent += len(pending)
    got = hashlib.sha256()
    served.settimeout(60)
    assert _recv_exact(served, sent, got) == sent and got.hexdigest() == digest.hexdigest()
    client.close()
    assert served.recv(1) == b""
    served.close()


def test_release_mid_transfer_closes_both_sides_and_leaks_nothing(chain):
    """Data flowing both ways on 4 connections; release on both facilities: every socket sees
    the close promptly, each relayd's descriptors and threads return to what they were."""
    daemons, controls, app, _ = chain
    pids = {side: d.process.pid for side, d in daemons.items()}
    for control in controls.values():
        with pytest.raises(grpc.RpcError):  # connects the control channel (it is lazy): not a leak
            control.release(pb.Release(uid="none"), timeout=10)
    before = {side: (open_fds(pid), thread_count(pid)) for side, pid in pids.items()}
    addresses = _sessions(controls, "tls-mid", app, num_conn=4)
    stop = threading.Event()
    ends: list[str] = []

    clients = [socket.create_connection(a, timeout=30) for a in addresses]
    app.settimeout(30)
    served = [app.accept()[0] for _ in addresses]
    workers = flood_both_ways(clients, served, stop, ends)
    poll_until(lambda: (r := _row(daemons["prod"], "tls-mid"))["bytes_to_target"] > 32 << 20
               and r["bytes_from_target"] > 32 << 20, "data flows both ways")
    for control in controls.values():
        control.release(pb.Release(uid="tls-mid"), timeout=10)
    try:
        poll_until(lambda: len(ends) == 2 * len(addresses), "every socket sees the close", 30)
    finally:
        stop.set()
        for t in workers:
            t.join(30)
    for side, pid in pids.items():
        back_to(pid, *before[side])


def test_failed_handshakes_leave_nothing_and_reach_no_application(chain, tmp_path):
    """At PROD's TLS port: a plain-text client, a client with a certificate of an unknown CA, a
    client that closes mid-handshake, one that never says anything (dropped after
    connect_timeout, 10 s). None reaches the application; nothing leaks."""
    daemons, controls, app, cas = chain
    pid = daemons["prod"].process.pid
    _, prod = open_session(controls["prod"], "tls-bad", "PROD", 1, [f"127.0.0.1:{app.getsockname()[1]}"])
    host, port = prod.listeners[0].rsplit(":", 1)
    fds, threads = open_fds(pid), thread_count(pid)
    silent = socket.create_connection((host, int(port)), timeout=30)

    with socket.create_connection((host, int(port)), timeout=30) as s:  # plain text
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        poll_until(lambda: peer_closed(s), "the plain-text client is closed")
    stranger = trustme.CA().issue_cert("127.0.0.1")
    context = ssl.create_default_context(cafile=None)
    cas["prod"].configure_trust(context)  # trusts the server, but PROD does not trust the client's CA
    stranger.configure_cert(context)
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"x")
                assert tls.recv(1) == b""  # TLS 1.3: the refusal arrives after the client's Finished
        except (ssl.SSLError, ConnectionResetError):
            pass
    for _ in range(10):  # half a ClientHello, then gone
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    poll_until(lambda: peer_closed(silent), "the silent client is dropped")
    silent.close()
    poll_until(lambda: _row(daemons["prod"], "tls-bad")["connections"] == 0, "handshake connections end")
    app.setblocking(False)
    with pytest.raises(BlockingIOError):
        app.accept()
    back_to(pid, fds, threads)
    assert _row(daemons["prod"], "tls-bad")["bytes_to_target"] == 0


def test_threaded_and_event_loop_facilities_interoperate(tmp_path):
    """PROD on the event-loop pump (splice = false: uvloop's SSL transport), CONS on the threaded
    one: 64 MiB each way at once, byte-exact, and the application's close reaches the client."""
    started, channels = _start_chain(tmp_path, {"prod": "splice = false"})
    try:
        daemons, controls, app, _ = started
        [address] = _sessions(controls, "tls-mixed", app)
        size = 64 << 20
        results: dict = {}
        errors: list[BaseException] = []
        guarded = _threads_running(errors)
        client = socket.create_connection(address, timeout=60)
        app.settimeout(60)
        served, _ = app.accept()
        served.settimeout(60)

        def exchange(sock, seed, name):
            sent, got = hashlib.sha256(), hashlib.sha256()
            writer = guarded(send_exact, sock, size, seed, sent)
            results[name + " got"] = (_recv_exact(sock, size, got), got.hexdigest())
            writer.join(120)
            results[name + " sent"] = sent.hexdigest()

        workers = [guarded(exchange, client, 1, "client"), guarded(exchange, served, 2, "app")]
        for t in workers:
            t.join(300)
        assert not errors, errors
        assert results["client got"] == (size, results["app sent"])
        assert results["app got"] == (size, results["client sent"])
        served.close()
        assert client.recv(1) == b""
        client.close()
        for daemon in daemons.values():
            row = poll_until(lambda d=daemon: (r := _row(d, "tls-mixed"))["connections"] == 0 and r,
                             "connections end")
            assert row["bytes_to_target"] == size and row["bytes_from_target"] == size
    finally:
        _stop_chain(started, channels)
