"""scistream.Control over the wire: a real relayd, the grpcio stub (the stack s2uc uses)."""

from __future__ import annotations

import concurrent.futures
import socket

import grpc
import pytest
import trustme

from stream_helpers import (
    auth_globus,
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
    wait_bindable,
)

Code = grpc.StatusCode


def _err(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=10, **kwargs)
    return info.value


@pytest.fixture
def s2cs(tmp_path):
    """An auth-less stream component (explicit method = "none"), hello_timeout 3 s."""
    ctl, ports = free_port(), port_range(6)
    daemon = start(tmp_path, "s2cs", stream_config(ctl, ports, auth=auth_none(), extra="hello_timeout = 3"))
    channel, control = stub(ctl)
    yield daemon, control, ports
    channel.close()
    daemon.kill()


def test_session_flow_and_round_robin_mapping(s2cs):
    daemon, control, (first, last) = s2cs
    req, upd = open_session(control, "u-flow", "PROD", 3, ["127.0.0.1:7001", "127.0.0.1:7002"],
                            token="INVALID_TOKEN")  # what s2uc sends when it has no token
    assert len(req.listeners) == 3
    assert all(first <= int(l.rsplit(":", 1)[1]) <= last and l.startswith("127.0.0.1:") for l in req.listeners)
    assert list(req.prod_listeners) == ["127.0.0.1:7001", "127.0.0.1:7002"]
    assert list(upd.listeners) == list(req.listeners)
    assert list(upd.prod_listeners) == ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7001"]
    # a second update re-targets the same ports
    upd2 = control.update(pb.UpdateTargets(uid="u-flow", remote_listeners=["[::1]:7003"], role="PROD"), timeout=10)
    assert list(upd2.prod_listeners) == ["[::1]:7003"] * 3 and upd2.listeners == upd.listeners
    out = daemon.ctl("sessions", "s2cs", "--json")
    assert out.returncode == 0, out.stderr
    (row,) = __import__("json").loads(out.stdout)["sessions"]
    assert row["uid"] == "u-flow" and row["state"] == "active" and row["owner"] == "anonymous"
    assert control.release(pb.Release(uid="u-flow"), timeout=10) == pb.Response()
    wait_bindable([int(l.rsplit(":", 1)[1]) for l in req.listeners])
    assert "no sessions" in daemon.ctl("sessions", "s2cs").stdout


def test_request_validation(s2cs):
    _, control, _ = s2cs
    cases = [
        (pb.Request(uid="", role="PROD", num_conn=1), "uid"),
        (pb.Request(uid="x", role="prod", num_conn=1), "role must be PROD or CONS"),
        (pb.Request(uid="x", role="PROD", num_conn=0), "num_conn must be 1-64"),
        (pb.Request(uid="x", role="PROD", num_conn=65), "num_conn must be 1-64"),
        (pb.Request(uid="x", role="PROD", num_conn=1, rate=-1), "rate must not be negative"),
    ]
    for request, text in cases:
        err = _err(control.req, request)
        assert err.code() == Code.INVALID_ARGUMENT and text in err.details()


def test_unknown_uid_and_state_errors(s2cs):
    _, control, _ = s2cs
    for call, msg in [(control.hello, pb.Hello(uid="nope")),
                      (control.update, pb.UpdateTargets(uid="nope", remote_listeners=["a:1"])),
                      (control.release, pb.Release(uid="nope"))]:
        err = _err(call, msg)
        assert err.code() == Code.NOT_FOUND and err.details() == "no session with uid nope"

    future = control.req.future(pb.Request(uid="dup", role="CONS", num_conn=1), timeout=30)
    err = _err(control.update, pb.UpdateTargets(uid="dup", remote_listeners=["127.0.0.1:1"])) \
        if _registered(control, "dup") else None
    assert err is not None and err.code() == Code.FAILED_PRECONDITION and "has not received its hello" in err.details()
    err = _err(control.req, pb.Request(uid="dup", role="CONS", num_conn=1))
    assert err.code() == Code.ALREADY_EXISTS and err.details() == "session dup already exists"
    err = _err(control.hello, pb.Hello(uid="dup", prod_listeners=["no-port"]))
    assert err.code() == Code.INVALID_ARGUMENT and "prod_listeners" in err.details()
    hello_when_registered(control, "dup", [], role="PROD")  # s2uc sends role PROD here: tolerated
    assert list(future.result().prod_listeners) == []
    err = _err(control.hello, pb.Hello(uid="dup"))
    assert err.code() == Code.FAILED_PRECONDITION and "already received its hello" in err.details()
    for targets, text in [([], "remote_listeners is empty"), (["host-only"], "is not HOST:PORT"),
                          (["h:99999"], "port must be 1-65535"), (["::1:80"], "write IPv6 addresses as")]:
        err = _err(control.update, pb.UpdateTargets(uid="dup", remote_listeners=targets))
        assert err.code() == Code.INVALID_ARGUMENT and text in err.details(), err.details()
    control.release(pb.Release(uid="dup"), timeout=10)


def _registered(control, uid: str) -> bool:
    """Wait (deadline) until `uid` is known: update answers FAILED_PRECONDITION, not NOT_FOUND."""
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            control.update(pb.UpdateTargets(uid=uid, remote_listeners=["127.0.0.1:1"]), timeout=10)
        except grpc.RpcError as exc:
            if exc.code() != Code.NOT_FOUND:
                return True
        time.sleep(0.02)
    return False


def test_hello_timeout_frees_ports_and_release_in_setup_aborts(s2cs):
    daemon, control, (first, last) = s2cs
    err = _err(control.req, pb.Request(uid="late", role="PROD", num_conn=6))  # the whole range
    assert err.code() == Code.DEADLINE_EXCEEDED
    assert err.details() == "Hello not received within the timeout period"
    wait_bindable(list(range(first, last + 1)))
    # all ports were returned: the whole range can be taken again
    future = control.req.future(pb.Request(uid="gone", role="PROD", num_conn=6), timeout=30)
    assert _registered(control, "gone")
    control.release(pb.Release(uid="gone"), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        future.result()
    assert info.value.code() == Code.ABORTED and "released" in info.value.details()
    assert "ports_free=6" in daemon.ctl("status").stdout


def test_port_exhaustion_and_ports_taken_by_others(s2cs):
    _, control, (first, last) = s2cs
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", first + 1))
    squatter.listen()
    try:
        _, upd = open_session(control, "five", "PROD", 5, ["127.0.0.1:9"])
        ports = {int(l.rsplit(":", 1)[1]) for l in upd.listeners}
        assert ports == set(range(first, last + 1)) - {first + 1}  # the taken port was skipped
        err = _err(control.req, pb.Request(uid="more", role="PROD", num_conn=1))
        assert err.code() == Code.RESOURCE_EXHAUSTED
        assert err.details() == f"only 0 free ports in {first}-{last}, 1 requested"
        control.release(pb.Release(uid="five"), timeout=10)
    finally:
        squatter.close()


def test_many_sessions_in_setup_at_once(s2cs):
    """s2cs holds a worker thread per pending req (10 at most); relayd awaits a future each."""
    _, control, _ = s2cs
    n = 6  # = the port range; each session holds one port while it waits for its hello
    futures = [control.req.future(pb.Request(uid=f"c{i}", role="PROD", num_conn=1), timeout=30) for i in range(n)]
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        hellos = list(pool.map(lambda i: hello_when_registered(control, f"c{i}", [f"127.0.0.1:{7000 + i}"]), range(n)))
    responses = [f.result() for f in futures]
    assert all(len(h.listeners) == 1 for h in hellos)
    assert [list(r.prod_listeners) for r in responses] == [[f"127.0.0.1:{7000 + i}"] for i in range(n)]
    assert len({r.listeners[0] for r in responses}) == n  # distinct ports: no shared "last response"
    for i in range(n):
        control.release(pb.Release(uid=f"c{i}"), timeout=10)


def test_malformed_message_and_unknown_method(s2cs):
    ch = grpc.insecure_channel(control_target(s2cs))
    raw = ch.unary_unary("/scistream.Control/req", request_serializer=None, response_deserializer=None)
    err = _err(raw, b"\xff\xff\xff")
    assert err.code() == Code.INVALID_ARGUMENT and err.details() == "malformed req message"
    other = ch.unary_unary("/scistream.Control/nosuch")
    err = _err(other, b"")
    assert err.code() == Code.UNIMPLEMENTED
    ch.close()


def control_target(s2cs) -> str:
    daemon = s2cs[0]
    port = daemon.config_dir.joinpath("relayd.toml").read_text().split('bind = "127.0.0.1:')[1].split('"')[0]
    return f"127.0.0.1:{port}"


# -- auth (Globus, through the fake) -------------------------------------------------------------


@pytest.fixture
def guarded(tmp_path, fake_globus):
    scope = f"https://auth.globus.org/scopes/{fake_globus.client_id}/scistream"
    ctl, ports = free_port(), port_range(4)
    daemon = start(tmp_path, "guarded", stream_config(
        ctl, ports, auth=auth_globus(fake_globus, scope), auth_name="globus", extra="hello_timeout = 30"))
    channel, control = stub(ctl)
    alice = fake_globus.issue_token(sub="a1a1a1a1-0000-0000-0000-000000000001", username="alice@example.org",
                                    scopes=[scope])
    bob = fake_globus.issue_token(sub="b2b2b2b2-0000-0000-0000-000000000002", username="bob@example.org",
                                  scopes=[scope])
    yield daemon, control, fake_globus, scope, alice, bob
    channel.close()
    daemon.kill()


def test_auth_wording_matches_s2cs(guarded):
    daemon, control, fake, scope, alice, bob = guarded
    cid = fake.client_id
    err = _err(control.req, pb.Request(uid="a", role="PROD", num_conn=1))
    assert err.code() == Code.UNAUTHENTICATED
    assert err.details() == f"Authentication token is missing for scope {cid}"
    err = _err(control.req, pb.Request(uid="a", role="PROD", num_conn=1), metadata=md("INVALID_TOKEN"))
    assert err.code() == Code.UNAUTHENTICATED
    assert err.details() == f"Authentication token is invalid for scope {cid}"
    other_scope = fake.issue_token(scopes=[f"https://auth.globus.org/scopes/{cid}/other"])
    err = _err(control.req, pb.Request(uid="a", role="PROD", num_conn=1), metadata=md(other_scope))
    assert err.code() == Code.UNAUTHENTICATED and err.details().endswith(f"invalid for scope {cid}")
    # auth is checked before the uid: an unauthenticated caller learns nothing about sessions
    for call, msg in [(control.release, pb.Release(uid="nope")), (control.hello, pb.Hello(uid="nope"))]:
        assert _err(call, msg).code() == Code.UNAUTHENTICATED
    # Globus down: UNAVAILABLE, not a misleading "invalid token"
    fake.down = True
    fresh = fake.issue_token(scopes=[scope])
    err = _err(control.release, pb.Release(uid="x"), metadata=md(fresh))
    assert err.code() == Code.UNAVAILABLE
    fake.down = False


def test_sessions_belong_to_their_creator(guarded):
    daemon, control, fake, scope, alice, bob = guarded
    future = control.req.future(pb.Request(uid="mine", role="PROD", num_conn=2), metadata=md(alice), timeout=30)
    # bob cannot complete alice's setup, re-target or release her session
    import time

    deadline = time.monotonic() + 10
    while True:
        err = _err(control.hello, pb.Hello(uid="mine", prod_listeners=["127.0.0.1:1"]), metadata=md(bob))
        if err.code() != Code.NOT_FOUND or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert err.code() == Code.PERMISSION_DENIED
    hello_when_registered(control, "mine", ["127.0.0.1:7001"], token=f"Bearer {alice}")  # Bearer form too
    future.result()
    control.update(pb.UpdateTargets(uid="mine", remote_listeners=["127.0.0.1:7001"]), metadata=md(alice), timeout=10)
    for call, msg, verb in [(control.update, pb.UpdateTargets(uid="mine", remote_listeners=["127.0.0.1:6666"]), "update"),
                            (control.release, pb.Release(uid="mine"), "release")]:
        err = _err(call, msg, metadata=md(bob))
        assert err.code() == Code.PERMISSION_DENIED
        assert err.details() == f"session mine belongs to another identity; it cannot {verb} it"
    rows = __import__("json").loads(daemon.ctl("sessions", "s2cs", "--json").stdout)["sessions"]
    assert rows[0]["owner"] == "alice@example.org" and rows[0]["targets"] == "127.0.0.1:7001,127.0.0.1:7001"
    control.release(pb.Release(uid="mine"), metadata=md(alice), timeout=10)


# -- TLS control channel -----------------------------------------------------------------------


def test_tls_control_channel_with_grpcio(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ctl, ports = free_port(), port_range(2)
    tls = f'tls = {{ cert = "{tmp_path / "server.pem"}", key = "{tmp_path / "server.pem"}" }}'
    daemon = start(tmp_path, "tls", stream_config(ctl, ports, auth=auth_none(), listener_tls=tls))
    channel, control = stub(ctl, root_cert=ca.cert_pem.bytes())
    try:
        _, upd = open_session(control, "t", "CONS", 2, ["127.0.0.1:7001"])
        assert len(upd.listeners) == 2
        control.release(pb.Release(uid="t"), timeout=10)
        # a client that does not trust the server's CA is refused
        bad_channel, bad = stub(ctl, root_cert=trustme.CA().cert_pem.bytes())
        assert _err(bad.release, pb.Release(uid="t")).code() == Code.UNAVAILABLE
        bad_channel.close()
        # relayctl's errors: exit 2 when the server cannot be talked to, 1 for bad input
        s2cs = f"127.0.0.1:{ctl}"
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        cases = [
            (["release", "--insecure", "x"], 2, "closed the connection"),
            (["release", "--server_cert", str(tmp_path / "server.pem").replace("server", "nope"), "x"], 1,
             "--server_cert"),
            (["release", "x"], 2, "CERTIFICATE_VERIFY_FAILED"),  # system CAs do not know trustme's
            (["release", "--server_cert", str(tmp_path / "ca.pem"), "x"], 1, "NOT_FOUND: no session with uid x"),
            (["inbound-request", "--server_cert", str(tmp_path / "ca.pem"), "--receiver_ports", "1,x"], 1,
             "--receiver_ports"),
        ]
        for args, code, text in cases:
            out = daemon.ctl("stream", args[0], "--s2cs", s2cs, "--no-auth", *args[1:])
            assert out.returncode == code and text in out.stderr, (args, out.returncode, out.stderr)
        out = daemon.ctl("stream", "release", "--s2cs", "nohostport", "--no-auth", "x")
        assert out.returncode == 1 and "--s2cs" in out.stderr
    finally:
        channel.close()
        daemon.kill()


def test_config_errors(tmp_path):
    """As `relayd --check` reports them (the other rules: test_stream_units.py)."""
    import subprocess

    from relayd.testing import BIN, write_config

    cases = [
        ('data_bind = "0.0.0.0"', "set 'advertise' to the address"),
        ('data_bind = "127.0.0.1"\nsecurity = "tls"', 'needs a [tls] table'),
    ]
    for i, (line, message) in enumerate(cases):
        text = f"""
[listeners.ctl]
bind = "127.0.0.1:1"
[auth.open]
method = "none"
[components.s2cs]
kind = "stream"
listener = "ctl"
auth = "open"
{line}
"""
        conf = write_config(tmp_path / f"c{i}", text)
        out = subprocess.run([str(BIN / "relayd"), "--check", "--config", str(conf)], capture_output=True, text=True)
        assert out.returncode != 0 and message in out.stdout + out.stderr, out.stdout + out.stderr
    # auth is required: an auth-less stream component must say so
    conf = write_config(tmp_path / "noauth", '[listeners.ctl]\nbind = "127.0.0.1:1"\n[components.s2cs]\n'
                        'kind = "stream"\nlistener = "ctl"\ndata_bind = "127.0.0.1"\n')
    out = subprocess.run([str(BIN / "relayd"), "--check", "--config", str(conf)], capture_output=True, text=True)
    assert out.returncode != 0 and "auth" in out.stdout + out.stderr


def test_shutdown_ends_sessions_and_frees_ports(tmp_path):
    """SIGTERM with a session in setup and an active one carrying a connection: relayd exits,
    the pending req fails, the connection is closed and every port can be bound again."""
    ctl, (first, last) = free_port(), port_range(4)
    # the live connection holds the stop for drain_timeout, then is closed
    daemon = start(tmp_path, "down", "drain_timeout = 1\n" + stream_config(ctl, (first, last), auth=auth_none()))
    channel, control = stub(ctl)
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen()
    try:
        _, upd = open_session(control, "live", "PROD", 2, [f"127.0.0.1:{app.getsockname()[1]}"])
        host, port = upd.listeners[0].rsplit(":", 1)
        client = socket.create_connection((host, int(port)), timeout=30)
        served, _ = app.accept()  # the forwarder connected through to the application
        pending = control.req.future(pb.Request(uid="pending", role="CONS", num_conn=1), timeout=30)
        assert _registered(control, "pending")
        assert daemon.stop(timeout=30) == 0
        with pytest.raises(grpc.RpcError):
            pending.result()
        assert client.recv(10) == b""  # closed by relayd
        wait_bindable(list(range(first, last + 1)))
        client.close()
        served.close()
    finally:
        app.close()
        channel.close()
        daemon.kill()


def test_reload_keeps_or_replaces_the_component(tmp_path):
    """An unchanged table keeps the component and its sessions; a changed one replaces it: the
    old sessions end (ports freed) and the new component serves on the same control listener."""
    ctl, (first, last) = free_port(), port_range(4)
    text = "drain_timeout = 1\n" + stream_config(ctl, (first, last), auth=auth_none())
    daemon = start(tmp_path, "reload", text)
    channel, control = stub(ctl)
    try:
        _, upd = open_session(control, "kept", "PROD", 2, ["127.0.0.1:9"])
        out = daemon.ctl("reload")
        assert out.returncode == 0, out.stderr
        assert "kept" in daemon.ctl("sessions", "s2cs").stdout
        (daemon.config_dir / "relayd.toml").write_text(text + "hello_timeout = 30\n")
        out = daemon.ctl("reload")
        assert out.returncode == 0 and "components.s2cs" in out.stdout, out.stdout + out.stderr
        assert "no sessions" in daemon.ctl("sessions", "s2cs").stdout
        wait_bindable([int(l.rsplit(":", 1)[1]) for l in upd.listeners])
        _, again = open_session(control, "after", "PROD", 4, ["127.0.0.1:9"])  # the whole range again
        assert len(again.listeners) == 4
    finally:
        channel.close()
        daemon.kill()
