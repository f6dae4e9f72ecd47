"""The data plane of one relayd: backpressure, half-close, rate-limited sessions, dead targets."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from stream_helpers import auth_none, free_port, open_session, pb, port_range, start, stream_config, stub


@pytest.fixture
def plane(tmp_path):
    ctl = free_port()
    daemon = start(tmp_path, "plane", stream_config(ctl, port_range(8), auth=auth_none(),
                                                       extra='rate_unit = "kB/s"'))
    channel, control = stub(ctl)
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen()
    yield daemon, control, app
    app.close()
    channel.close()
    daemon.kill()


def _session(control, uid, app, rate=0, num_conn=1):
    _, upd = open_session(control, uid, "PROD", num_conn, [f"127.0.0.1:{app.getsockname()[1]}"], rate=rate)
    host, port = upd.listeners[0].rsplit(":", 1)
    return host, int(port)


def _row(daemon, uid):
    rows = json.loads(daemon.ctl("sessions", "s2cs", "--json").stdout)["sessions"]
    return next(r for r in rows if r["uid"] == uid)


def test_slow_reader_backpressure(plane):
    """The application does not read: relayd stops reading from the client instead of buffering."""
    daemon, control, app = plane
    client = socket.create_connection(_session(control, "bp", app), timeout=30)
    served, _ = app.accept()
    chunk = os.urandom(1 << 20)
    client.settimeout(3)  # a send that cannot progress for 3 s: everything on the way is full
    sent = 0
    digest = hashlib.sha256()
    try:
        while sent < 512 << 20:
            n = client.send(chunk)
            digest.update(chunk[:n])
            sent += n
    except TimeoutError:
        pass
    # at most the kernel socket buffers of both hops plus relayd's 1 MiB (here about 75 MiB);
    # without backpressure relayd would read all 512 MiB
    rmem, wmem = (int(Path(f"/proc/sys/net/ipv4/tcp_{k}").read_text().split()[2]) for k in ("rmem", "wmem"))
    bound = 2 * (rmem + wmem) + (2 << 20) + (8 << 20)
    assert bound < 512 << 20
    assert sent < bound, (sent, bound)
    assert _row(daemon, "bp")["bytes_to_target"] <= sent
    client.shutdown(socket.SHUT_WR)
    got = hashlib.sha256()
    received = 0
    while data := served.recv(1 << 20):
        got.update(data)
        received += len(data)
    assert received == sent and got.hexdigest() == digest.hexdigest()
    client.close()
    served.close()


def test_half_close_and_reply(plane):
    """Request, EOF, then the reply: the EOF is forwarded while the other direction stays open."""
    daemon, control, app = plane
    client = socket.create_connection(_session(control, "hc", app), timeout=30)
    served, _ = app.accept()
    client.sendall(b"question")
    client.shutdown(socket.SHUT_WR)
    request = b""
    while data := served.recv(100):
        request += data
    assert request == b"question"
    served.sendall(b"answer")
    served.close()
    reply = b""
    while data := client.recv(100):
        reply += data
    assert reply == b"answer"
    client.close()


def test_rate_limited_session_moves_exact_bytes(plane):
    """rate pauses and resumes reading; the bytes still arrive complete and in order."""
    daemon, control, app = plane
    address = _session(control, "rl", app, rate=20_000)  # 20 MB/s per direction
    payload = os.urandom(4 << 20)
    result = {}

    def serve():
        served, _ = app.accept()
        data = bytearray()
        while chunk := served.recv(1 << 20):
            data += chunk
        result["data"] = bytes(data)
        served.close()

    thread = threading.Thread(target=serve)
    thread.start()
    with socket.create_connection(address, timeout=30) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        assert client.recv(10) == b""
    thread.join(60)
    assert result["data"] == payload
    row = _row(daemon, "rl")
    assert row["rate"] == 20_000 and row["bytes_to_target"] == len(payload)


def test_dead_target_closes_the_client(plane):
    daemon, control, app = plane
    dead = free_port()  # nobody listens there
    _, upd = open_session(control, "dead", "PROD", 1, [f"127.0.0.1:{dead}"])
    host, port = upd.listeners[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as client:
        assert client.recv(10) == b""
    metrics = daemon.ctl("metrics").stdout
    assert 'relayd_stream_connect_failures_total{component="s2cs"} 1.0' in metrics
    control.release(pb.Release(uid="dead"), timeout=10)
