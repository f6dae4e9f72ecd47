"""Draining: requests in flight finish on SIGTERM/SIGINT and on reload; failures name the culprit."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest

from relayd.testing import free_port


def echo_config(port: int, drain: str = "30s", extra: str = "") -> str:
    return f"""
        drain_timeout = "{drain}"
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [components.echo]
        kind = "echo"
        listener = "web"
    """ + extra


class Upload:
    """POST /hold with a body sent in two halves: in flight until the test sends the rest."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.sendall(b"POST /hold HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello")
        self.reply = b""
        # The handler answers "started" before it reads the body: now it is in flight.
        while b"started\n" not in self.reply:
            chunk = self.sock.recv(4096)
            assert chunk, f"closed before the request started: {self.reply!r}"
            self.reply += chunk

    def finish(self) -> bytes:
        self.sock.sendall(b"world")
        return self.read_to_end()

    def read_to_end(self) -> bytes:
        try:
            while chunk := self.sock.recv(4096):
                self.reply += chunk
        except ConnectionResetError:
            pass
        self.sock.close()
        return self.reply


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_drains_the_request_in_flight_then_exits_0(relayd, plugin_site, port, sig):
    daemon = relayd(echo_config(port), env={"PYTHONPATH": str(plugin_site)})
    upload = Upload(port)
    daemon.process.send_signal(sig)
    daemon.manager.wait_for("STOPPING", "1")
    assert daemon.process.poll() is None  # still draining: the upload is not finished
    reply = upload.finish()
    assert reply.startswith(b"HTTP/1.1 200 OK")
    assert b"got helloworld\n" in reply and reply.endswith(b"0\r\n\r\n")  # the last chunk
    assert daemon.process.wait(30) == 0


def test_drain_timeout_bounds_the_wait(relayd, plugin_site, port):
    daemon = relayd(echo_config(port, drain="200ms"), env={"PYTHONPATH": str(plugin_site)})
    upload = Upload(port)
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(30) == 0  # the client never finished; relayd did not wait for it
    reply = upload.read_to_end()
    assert b"got" not in reply and not reply.endswith(b"0\r\n\r\n")


def test_removed_component_drains_across_reloads_and_sockets_stay_valid(relayd, plugin_site, tmp_path):
    """A slow drain outlives later reloads; finishing it must not release their sockets."""
    port = free_port()
    daemon = relayd(echo_config(port), env={"PYTHONPATH": str(plugin_site)})
    config = daemon.config_dir / "relayd.toml"
    upload = Upload(port)

    # Reload 1: the echo component is removed, but its upload keeps it draining.
    nothing = 'drain_timeout = "30s"\n'
    config.write_text(nothing)
    assert daemon.ctl("reload").returncode == 0
    status = json.loads(daemon.ctl("status", "--json").stdout)
    assert status["draining"] == ["components.echo"]
    assert "draining (replaced or removed): components.echo" in daemon.ctl("status").stdout

    # Reload 2: a new unix listener and component appear while the drain goes on.
    path = tmp_path / "late.sock"
    config.write_text(nothing + f"""
        [listeners.late]
        bind = "unix:{path}"
        [components.late]
        kind = "status"
        listener = "late"
    """)
    assert daemon.ctl("reload").returncode == 0

    assert b"got helloworld\n" in upload.finish()
    deadline = time.monotonic() + 20
    while json.loads(daemon.ctl("status", "--json").stdout)["draining"]:
        assert time.monotonic() < deadline, "the drain did not end"
    # The end of the first drain released nothing the current generation uses.
    assert path.exists()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    # The web listener is gone from the configuration: released once its last user drained.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # And a further reload keeps the unix listener (no "address in use" on a forgotten socket).
    assert daemon.ctl("reload").returncode == 0


def test_a_reload_drains_an_upload_on_a_replaced_component(relayd, plugin_site, port):
    daemon = relayd(echo_config(port), env={"PYTHONPATH": str(plugin_site)})
    upload = Upload(port)
    config = daemon.config_dir / "relayd.toml"
    config.write_text(config.read_text().replace('listener = "web"', 'listener = "web"\ngreeting = "hi"'))
    result = daemon.ctl("reload")
    assert result.stdout.strip() == "reloaded: generation 2 (components.echo)"
    assert b"got helloworld\n" in upload.finish()  # the old object finished what it had started
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.endswith(b"hi from echo\n")


def test_connection_accepted_before_a_reload_gets_its_answer(relayd, plugin_site, port):
    """connect(), reload replaces the component, then the request: served, not reset."""
    daemon = relayd(echo_config(port), env={"PYTHONPATH": str(plugin_site)})
    early = socket.create_connection(("127.0.0.1", port), timeout=10)
    config = daemon.config_dir / "relayd.toml"
    config.write_text(config.read_text().replace('listener = "web"', 'listener = "web"\ngreeting = "hi"'))
    # Make sure the old server has accepted it (a request on another connection was served).
    probe = socket.create_connection(("127.0.0.1", port), timeout=10)
    probe.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert probe.recv(100).startswith(b"HTTP/1.1 200")
    probe.close()
    assert daemon.ctl("reload").returncode == 0
    early.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply = b""
    while chunk := early.recv(4096):
        reply += chunk
    early.close()
    assert reply.startswith(b"HTTP/1.1 200 OK"), reply


@pytest.mark.parametrize("where", ["init", "start"])
def test_a_component_failing_to_build_is_named_and_the_old_generation_stays(relayd, plugin_site, port, where):
    # Each component on its own listener: two components on one listener are refused.
    daemon = relayd(echo_config(port) + f"""
        [auth.open]
        method = "none"
        [listeners.status]
        bind = "127.0.0.1:{free_port()}"
        [components.status]
        kind = "status"
        listener = "status"
        auth = "open"
    """, env={"PYTHONPATH": str(plugin_site)})
    config = daemon.config_dir / "relayd.toml"
    text = config.read_text()
    config.write_text(text + f"""
        [listeners.bad]
        bind = "127.0.0.1:{free_port()}"
        [components.zbad]
        kind = "echo"
        listener = "bad"
        fail = "{where}"
    """)
    result = daemon.ctl("reload")
    assert result.returncode == 1
    line = next(n for n, line in enumerate(config.read_text().splitlines(), 1) if "[components.zbad]" in line)
    detail = ("ValueError: told to fail in __init__" if where == "init"
              else "[Errno 98] Address already in use (told to fail in start)")
    assert f"  {config}:{line}: components.zbad: failed to start: {detail}" in result.stderr.splitlines()
    status = json.loads(daemon.ctl("status", "--json").stdout)
    assert status["generation"] == 1 and sorted(status["components"]) == ["echo", "status"]
    # At start-up the same mistake is fatal, with the same message and no traceback.
    daemon.stop()
    from relayd.testing import start_relayd

    second = daemon.config_dir.parent / "second"
    second.mkdir()
    other = start_relayd(second, daemon.config_dir, env={"PYTHONPATH": str(plugin_site)}, wait_ready=False)
    try:
        assert other.process.wait(30) == 1
        assert f"components.zbad: failed to start: {detail}" in other.log
        assert "Traceback" not in other.log
    finally:
        other.kill()
