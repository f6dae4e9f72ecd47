"""Log formats (timestamps by hand, <N> priorities under journald, JSON unchanged), the listen
line of every component, and the access logs of http_proxy, relay and stream (no credentials)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket

import pytest
import websockets

import configs
from polling import wait_for
from relayd.logsetup import JournalFormatter, TextFormatter, stream_is_journal
from relayd.testing import free_port, start_relayd, write_config
from stream_helpers import open_session, pb, port_range, stub
from test_http_proxy import Upstream, control, proxy_config, request

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}"
# Under a shell wrapper, the way systemd sets JOURNAL_STREAM: the device:inode of our stderr.
AS_JOURNAL = ["sh", "-c", 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$@"', "sh"]


def _lines(daemon) -> list[str]:
    return daemon.log.splitlines()


def _all_components(ports: dict[str, int], s2cs_ports, extra: str = "") -> str:
    """relay, status, http_proxy and stream on the listeners named by ports; extra: lines for
    each component but status."""
    return configs.config(
        configs.auth(open="none"), configs.listeners(**ports), configs.relay() + extra, configs.status(),
        configs.http_proxy("proxy", auth="open", extra_listeners=["web"]) + extra,
        configs.stream("s2cs", ports=s2cs_ports) + extra)


@pytest.fixture
def ports():
    return {name: free_port() for name in ("relay", "status", "web", "ctl")}


def test_text_logs_have_timestamps_and_every_component_says_where_it_listens(tmp_path, ports):
    daemon = start_relayd(tmp_path, write_config(tmp_path / "etc", _all_components(ports, port_range(4))))
    try:
        lines = _lines(daemon)
        assert lines and all(re.match(STAMP + r" (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ", l) for l in lines
                             if not l.startswith(" ")), lines
        text = daemon.log
        assert f"relay listening on ws://127.0.0.1:{ports['relay']}" in text
        assert f"status listening on http://127.0.0.1:{ports['status']}" in text
        assert f"http_proxy listening on http://127.0.0.1:{ports['web']} (listener web)" in text
        assert f"stream control (gRPC) listening on grpc://127.0.0.1:{ports['ctl']}" in text
        assert "<6>" not in text
    finally:
        daemon.kill()


def test_priority_prefixes_under_journald(tmp_path, ports):
    config_dir = write_config(tmp_path / "etc", _all_components(ports, port_range(4)))
    daemon = start_relayd(tmp_path, config_dir, wrapper=AS_JOURNAL)
    try:
        (config_dir / "relayd.toml").write_text((config_dir / "relayd.toml").read_text()
                                                + '\n[components.bad]\nkind = "nonsense"\n')
        result = daemon.ctl("reload")
        assert result.returncode != 0
        lines = _lines(daemon)
        assert all(re.match(r"<[2-7]>", l) for l in lines), lines
        assert not any(re.search(STAMP, l) for l in lines)  # journald adds the time
        assert "<6>INFO relayd.relay.relay: relay listening on" in daemon.log
        rejected = [i for i, l in enumerate(lines) if "reload rejected" in l]
        assert rejected and lines[rejected[0]].startswith("<3>ERROR relayd: reload rejected")
        # the problem lines after it (file:line) carry the error priority too: journalctl -p err
        following = lines[rejected[0] + 1]
        assert following.startswith("<3>  ") and "relayd.toml" in following, following
    finally:
        daemon.kill()


def test_journal_stream_of_another_file_is_not_the_journal(tmp_path, ports):
    daemon = start_relayd(tmp_path, write_config(tmp_path / "etc", _all_components(ports, port_range(4))),
                          env={"JOURNAL_STREAM": "1:1"})
    try:
        assert all(re.match(STAMP, l) for l in _lines(daemon))
    finally:
        daemon.kill()


def test_json_format_is_unchanged_under_journald(tmp_path, ports):
    config = "[logging]\nformat = \"json\"\n" + _all_components(ports, port_range(4))
    daemon = start_relayd(tmp_path, write_config(tmp_path / "etc", config), wrapper=AS_JOURNAL)
    try:
        entries = [json.loads(l) for l in _lines(daemon)]
        assert entries and all(set(e) == {"time", "level", "logger", "message"} for e in entries)
    finally:
        daemon.kill()


def test_formatters_and_journal_detection(tmp_path):
    import logging

    record = logging.LogRecord("relayd", logging.ERROR, __file__, 1, "bad\n  file:3: x", None, None)
    assert JournalFormatter().format(record) == "<3>ERROR relayd: bad\n<3>  file:3: x"
    assert re.fullmatch(STAMP + " ERROR relayd: bad\n  file:3: x", TextFormatter().format(record))
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    assert JournalFormatter().format(record).startswith("<7>DEBUG")
    with open(tmp_path / "f", "w") as f:
        import os

        st = os.fstat(f.fileno())
        assert stream_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not stream_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not stream_is_journal(f, {})


# -- access logs ---------------------------------------------------------------------------------

def _access(daemon, component: str) -> list[str]:
    return [l.split(f"relayd.access.{component}: ", 1)[1] for l in _lines(daemon)
            if f"INFO relayd.access.{component}: " in l]


def test_http_proxy_access_log_without_credentials(relayd, port):
    with Upstream() as upstream:
        daemon = relayd(proxy_config(port, upstream.url, auth="users", extra="access_log = true"))
        assert control(daemon, "POST", "services/acme/users", {"username": "alice", "password": "s3cret-pw"})[0] == 200
        auth = "Basic " + base64.b64encode(b"alice:s3cret-pw").decode()
        status, _, _ = request(port, "GET", "/acme/data?access_token=tok-abc&x=1", {"Authorization": auth})
        assert status == 200
        status, _, _ = request(port, "POST", "/acme/up", {"Authorization": auth}, body=b"x" * 1000)
        assert status == 200
        lines = wait_for(lambda: len(_access(daemon, "web")) >= 2 and _access(daemon, "web"), "two web access lines",
                         timeout=10.0)
    first = lines[0]
    assert re.fullmatch(r"client=127\.0\.0\.1 user=alice service=acme method=GET path=/acme/data status=200 "
                        r"bytes_in=\d+ bytes_out=\d+ duration=\d+\.\d{3}", first), first
    assert re.search(r"method=POST path=/acme/up status=200 bytes_in=1\d\d\d ", lines[1]), lines[1]
    text = daemon.log
    for secret in ("s3cret-pw", "tok-abc", base64.b64encode(b"alice:s3cret-pw").decode(), "Authorization"):
        assert secret not in text


def test_access_log_is_off_by_default(relayd, port):
    with Upstream() as upstream:
        daemon = relayd(proxy_config(port, upstream.url))
        assert request(port, "GET", "/acme/x")[0] == 200
        assert request(port, "GET", "/acme/y")[0] == 200
    assert not _access(daemon, "web")


def test_relay_and_stream_access_logs(tmp_path, ports):
    s2cs_ports = port_range(4)
    config = _all_components(ports, s2cs_ports, extra="access_log = true").replace(
        'ports = "', 'allowed_targets = ["127.0.0.0/8"]\nports = "')
    daemon = start_relayd(tmp_path, write_config(tmp_path / "etc", config))
    try:
        async def relay_client():
            headers = {"Authorization": "Bearer relay-secret-token"}
            try:
                ws = await websockets.connect(f"ws://127.0.0.1:{ports['relay']}", additional_headers=headers)
            except TypeError:  # older websockets
                ws = await websockets.connect(f"ws://127.0.0.1:{ports['relay']}", extra_headers=headers)
            async with ws:
                await ws.send(json.dumps({"name": "alpha", "uuid": "11111111-1111-1111-1111-111111111111",
                                          "message_type": "relay_registration"}))
                await ws.recv()
        asyncio.run(asyncio.wait_for(relay_client(), 30))
        line = wait_for(lambda: _access(daemon, "relay"), "a relay access line", timeout=10.0)[0]
        assert re.fullmatch(r"client=127\.0\.0\.1:\d+ user=anonymous name=alpha "
                            r"uuid=11111111-1111-1111-1111-111111111111 close=1000 messages_in=1 "
                            r"messages_out=1 bytes_in=\d+ bytes_out=\d+ duration=\d+\.\d{3}", line), line

        app = socket.socket()
        app.bind(("127.0.0.1", 0))
        app.listen()
        channel, control_stub = stub(ports["ctl"])
        _, upd = open_session(control_stub, "sess-1", "PROD", 1, [f"127.0.0.1:{app.getsockname()[1]}"],
                              token="stream-secret-token", rate=10000)
        host, port = upd.listeners[0].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as client:
            served, _ = app.accept()
            client.sendall(b"y" * 5000)
            got = b""
            while len(got) < 5000:
                got += served.recv(65536)
            served.close()
        control_stub.release(pb.Release(uid="sess-1"), timeout=10)
        channel.close()
        app.close()
        line = wait_for(lambda: _access(daemon, "s2cs"), "a stream access line", timeout=10.0)[0]
        assert re.fullmatch(r"session=sess-1 user=anonymous role=PROD num_conn=1 rate=10000 "
                            r"targets=127\.0\.0\.1:\d+ reason=released bytes_to_target=5000 "
                            r"bytes_from_target=0 connections=1 duration=\d+\.\d{3}", line), line
        assert "secret-token" not in daemon.log
    finally:
        daemon.kill()
