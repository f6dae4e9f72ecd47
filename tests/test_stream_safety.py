"""Stream safety and honest defaults: rate ignored unless enabled, allowed_targets, per-identity
limits, each refused with a clear gRPC status and message."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from stream_helpers import (
    auth_none,
    free_port,
    hello_when_registered,
    md,
    open_session,
    pb,
    port_range,
    start,
    stream_config,
    stub,
)

Code = grpc.StatusCode
MB = 1_000_000


def _daemon(tmp_path, name, *, extra="", allowed=None, size=8):
    ctl = free_port()
    kwargs = {} if allowed is None else {"allowed": allowed}
    daemon = start(tmp_path, name, stream_config(ctl, port_range(size), auth=auth_none(), extra=extra, **kwargs))
    channel, control = stub(ctl)
    return daemon, channel, control


def _timed_transfer(address: tuple[str, int], app: socket.socket, total: int) -> float:
    """Send `total` bytes through the session; seconds from the first to the last byte at the target."""
    times: dict[str, float] = {}
    received = [0]

    def serve() -> None:
        served, _ = app.accept()
        with served:
            while chunk := served.recv(1 << 20):
                if received[0] == 0:
                    times["first"] = time.monotonic()
                received[0] += len(chunk)
            times["last"] = time.monotonic()

    thread = threading.Thread(target=serve)
    thread.start()
    block = b"x" * (1 << 20)
    with socket.create_connection(address, timeout=60) as client:
        sent = 0
        while sent < total:
            n = min(len(block), total - sent)
            client.sendall(block[:n])
            sent += n
        client.shutdown(socket.SHUT_WR)
        assert client.recv(10) == b""
    thread.join(60)
    assert received[0] == total
    return times["last"] - times["first"]


def _s2uc_session(control, uid, app) -> tuple[str, int]:
    """What an unmodified s2uc asks for: rate = 10000 (10 MB/s if read as kB/s), one connection."""
    _, upd = open_session(control, uid, "PROD", 1, [f"127.0.0.1:{app.getsockname()[1]}"], rate=10000)
    host, port = upd.listeners[0].rsplit(":", 1)
    return host, int(port)


@pytest.fixture
def app():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def test_s2uc_rate_is_not_enforced_by_default(tmp_path, app):
    daemon, channel, control = _daemon(tmp_path, "default")
    try:
        total = 20 * MB  # 2 s at 10 MB/s
        elapsed = _timed_transfer(_s2uc_session(control, "s2uc", app), app, total)
        print(f"default: {total / MB:.0f} MB in {elapsed:.3f} s ({total / elapsed / MB:.0f} MB/s)")
        assert elapsed < 1.0, elapsed  # throttled it would take 1.95 s
        rows = daemon.ctl("sessions", "s2cs", "--json")
        assert '"rate": 10000' in rows.stdout  # still shown as requested
    finally:
        channel.close()
        daemon.kill()


def test_s2uc_rate_is_enforced_within_5_percent_when_enabled(tmp_path, app):
    daemon, channel, control = _daemon(tmp_path, "enforced", extra='rate_unit = "kB/s"')
    try:
        total = 20 * MB
        elapsed = _timed_transfer(_s2uc_session(control, "s2uc", app), app, total)
        rate = total / elapsed
        print(f"rate_unit = kB/s: {total / MB:.0f} MB in {elapsed:.3f} s ({rate / MB:.2f} MB/s)")
        assert abs(rate - 10 * MB) <= 0.05 * 10 * MB, rate
    finally:
        channel.close()
        daemon.kill()


def _refused(control, uid, targets) -> grpc.RpcError:
    future = control.req.future(pb.Request(uid=uid, role="PROD", num_conn=1, rate=0), metadata=md(None), timeout=30)
    hello_when_registered(control, uid, [])
    future.result()
    with pytest.raises(grpc.RpcError) as info:
        control.update(pb.UpdateTargets(uid=uid, remote_listeners=targets, role="PROD"), timeout=10)
    control.release(pb.Release(uid=uid), timeout=10)
    return info.value


def test_loopback_link_local_and_metadata_targets_are_refused_by_default(tmp_path):
    daemon, channel, control = _daemon(tmp_path, "guarded", allowed="")
    try:
        cases = [
            ("127.0.0.1:8080", "loopback address 127.0.0.1:8080 is refused unless allowed_targets lists it"),
            ("127.1.2.3:22", "loopback address 127.1.2.3:22"),
            ("[::1]:8080", "loopback address [::1]:8080"),
            ("[::ffff:127.0.0.1]:8080", "loopback address 127.0.0.1:8080"),
            ("169.254.169.254:80", "cloud metadata address 169.254.169.254:80 is refused"),
            ("169.254.1.1:80", "link-local address 169.254.1.1:80"),
            ("0.0.0.0:80", "unspecified address 0.0.0.0:80"),
            ("localhost:8080", "remote_listeners: localhost:8080: loopback address"),
        ]
        for i, (target, message) in enumerate(cases):
            error = _refused(control, f"g{i}", ["192.0.2.10:5000", target])
            assert error.code() == Code.PERMISSION_DENIED, (target, error)
            assert message in error.details(), (target, error.details())
        # a public or private address is fine (nothing connects until a client does)
        open_session(control, "ok", "PROD", 1, ["192.0.2.10:5000", "10.1.2.3:80"])
        log = daemon.log
        assert "hello refused: no session" not in log  # routine (hello before req): debug only
        assert "update refused: remote_listeners: loopback address 127.0.0.1:8080 is refused" in log
    finally:
        channel.close()
        daemon.kill()


def test_allowed_targets_lists_cidrs_and_ports(tmp_path, app):
    port = app.getsockname()[1]
    allowed = f'allowed_targets = ["10.0.0.0/8:5000-5999", "127.0.0.1/32:{port}"]'
    daemon, channel, control = _daemon(tmp_path, "listed", allowed=allowed)
    try:
        error = _refused(control, "a", ["10.1.2.3:80"])
        assert error.code() == Code.PERMISSION_DENIED
        assert "10.1.2.3:80 is not in allowed_targets" in error.details()
        error = _refused(control, "b", ["192.0.2.1:5000"])
        assert "192.0.2.1:5000 is not in allowed_targets" in error.details()
        error = _refused(control, "c", [f"127.0.0.1:{port + 1}"])
        assert f"loopback address 127.0.0.1:{port + 1} is refused" in error.details()
        open_session(control, "d", "PROD", 1, ["10.1.2.3:5000"])
        # the listed loopback port works end to end
        _, upd = open_session(control, "e", "PROD", 1, [f"127.0.0.1:{port}"])
        host, p = upd.listeners[0].rsplit(":", 1)
        assert _timed_transfer((host, int(p)), app, 1000) >= 0
    finally:
        channel.close()
        daemon.kill()


def test_bad_allowed_targets_entry_is_a_config_error(tmp_path):
    from pydantic import ValidationError

    from relayd.components.stream.config import StreamConfig

    for bad, text in [("10.0.0.0/8:0", "1 <= FIRST"), ("nonsense", "not an IP address"),
                      ("[::1/128]:x", "PORT or FIRST-LAST")]:
        with pytest.raises(ValidationError) as info:
            StreamConfig(kind="stream", listener="l", auth="a", data_bind="127.0.0.1", allowed_targets=[bad])
        assert text in str(info.value)


def test_per_identity_session_and_port_limits(tmp_path):
    daemon, channel, control = _daemon(tmp_path, "limits", size=8, allowed="",
                                       extra="max_sessions_per_identity = 2\nmax_ports_per_identity = 3")
    try:
        open_session(control, "s1", "PROD", 2, ["192.0.2.10:5000"])
        with pytest.raises(grpc.RpcError) as info:
            control.req(pb.Request(uid="s2", role="PROD", num_conn=2, rate=0), timeout=10)
        assert info.value.code() == Code.RESOURCE_EXHAUSTED
        assert "holds 2 ports and asks for 2 more (max_ports_per_identity = 3)" in info.value.details()
        open_session(control, "s3", "PROD", 1, ["192.0.2.10:5000"])
        with pytest.raises(grpc.RpcError) as info:
            control.req(pb.Request(uid="s4", role="PROD", num_conn=1, rate=0), timeout=10)
        assert info.value.code() == Code.RESOURCE_EXHAUSTED
        assert "already holds 2 sessions (max_sessions_per_identity = 2)" in info.value.details()
        control.release(pb.Release(uid="s1"), timeout=10)
        open_session(control, "s5", "PROD", 2, ["192.0.2.10:5000"])  # room again
    finally:
        channel.close()
        daemon.kill()
