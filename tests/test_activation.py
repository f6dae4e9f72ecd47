"""Socket activation: relayd takes its listeners (and control socket) from its service manager."""

from __future__ import annotations

import json
import signal
import socket

import pytest

from relayd.testing import free_port, have, listening_socket, start_relayd, write_config
from relayd.testing import get_text as get

ACTIVATED = """
    [listeners.web]
    fd_name = "web"
    [components.health]
    kind = "status"
    listener = "web"
"""


def test_python_activator_passes_listener_and_control_socket(tmp_path):
    web = listening_socket("127.0.0.1:0")
    control_path = tmp_path / "ctl.sock"
    control = listening_socket(control_path)
    port = web.getsockname()[1]
    config = write_config(tmp_path / "etc", ACTIVATED)
    daemon = start_relayd(tmp_path, config, activate={"web": [web], "control": [control]},
                          control_socket=str(control_path))
    try:
        # The test keeps its copies, like PID 1 does; relayd serves on what it was passed.
        web.close()
        control.close()
        ready = daemon.manager.received[-1]
        assert ready.pid == daemon.process.pid  # the activator exec'd relayd: LISTEN_PID matched
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")

        result = daemon.ctl("status", "--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        web_status = status["listeners"]["web"]
        assert {k: web_status[k] for k in ("addresses", "tls", "activated")} == {
            "addresses": [f"127.0.0.1:{port}"], "tls": False, "activated": True,
        }
        assert web_status["max_connections"] > 0 and web_status["accepting"] is True
        assert "(socket-activated)" in daemon.ctl("status").stdout
        assert "control socket on systemd socket 'control'" in daemon.log

        daemon.process.send_signal(signal.SIGTERM)
        daemon.manager.wait_for("STOPPING", "1")
        assert daemon.process.wait(30) == 0
        # A socket unit's file belongs to systemd: relayd must not unlink it.
        assert control_path.exists()
    finally:
        daemon.kill()


def test_two_sockets_with_one_name_are_both_served(tmp_path):
    """All fds of one socket unit share its FileDescriptorName= (e.g. IPv4 + IPv6 lines)."""
    first, second = listening_socket("127.0.0.1:0"), listening_socket("127.0.0.1:0")
    ports = [first.getsockname()[1], second.getsockname()[1]]
    config = write_config(tmp_path / "etc", ACTIVATED)
    daemon = start_relayd(tmp_path, config, activate={"web": [first, second]})
    try:
        for port in ports:
            assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
    finally:
        daemon.kill()


@pytest.mark.skipif(not have("systemd-socket-activate"), reason="systemd-socket-activate not installed")
def test_systemd_socket_activate_with_abstract_notify_socket(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "etc", ACTIVATED)
    daemon = start_relayd(tmp_path, config, systemd_activate=[(f"127.0.0.1:{port}", "web")],
                          abstract_notify=True)
    try:
        assert daemon.env["NOTIFY_SOCKET"].startswith("@")
        ready = daemon.manager.received[-1]
        assert ready.pid == daemon.process.pid  # systemd-socket-activate execs relayd
        assert ready.fields["STATUS"] == "generation 1: 1 components, 0 clients"
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        status = json.loads(daemon.ctl("status", "--json").stdout)
        assert status["listeners"]["web"]["activated"] is True

        daemon.process.send_signal(signal.SIGHUP)
        daemon.manager.wait_for("RELOADING", "1")
        daemon.manager.wait_for("READY", "1")
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        daemon.process.send_signal(signal.SIGTERM)
        daemon.manager.wait_for("STOPPING", "1")
        assert daemon.process.wait(30) == 0
    finally:
        daemon.kill()


def test_unpassed_fd_name_without_bind_is_a_clear_error(tmp_path):
    config = write_config(tmp_path / "etc", ACTIVATED)
    daemon = start_relayd(tmp_path, config, wait_ready=False)
    try:
        assert daemon.process.wait(30) == 1
        expected = ("listeners.web: socket 'web' was not passed by systemd (passed: none) "
                    "and no 'bind' fallback is set")
        assert expected in daemon.log
        assert "Traceback" not in daemon.log
        note = daemon.manager.wait_for("STATUS", timeout=5)
        assert expected in note.fields["STATUS"]
        assert note.fields.get("ERRNO") == "22"
        assert "READY" not in note.fields
    finally:
        daemon.kill()


def test_other_passed_names_are_listed_in_the_error(tmp_path):
    other = listening_socket("127.0.0.1:0")
    config = write_config(tmp_path / "etc", ACTIVATED)
    daemon = start_relayd(tmp_path, config, activate={"admin": [other]}, wait_ready=False)
    try:
        assert daemon.process.wait(30) == 1
        assert "socket 'web' was not passed by systemd (passed: admin)" in daemon.log
    finally:
        other.close()
        daemon.kill()


def test_bind_is_the_fallback_when_the_fd_name_is_not_passed(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "etc", ACTIVATED.replace('fd_name = "web"',
                                                               f'fd_name = "web"\nbind = "127.0.0.1:{port}"'))
    daemon = start_relayd(tmp_path, config)
    try:
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        status = json.loads(daemon.ctl("status", "--json").stdout)
        assert status["listeners"]["web"]["activated"] is False
    finally:
        daemon.kill()


def test_unix_and_abstract_listeners_bound_by_relayd(tmp_path):
    """relayd binds unix:PATH and unix:@NAME itself; a stale socket file is replaced."""
    path = tmp_path / "web.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays: what a crashed process leaves behind
    abstract = f"relayd-test-{free_port()}"
    config = write_config(tmp_path / "etc", f"""
        [listeners.file]
        bind = "unix:{path}"
        [listeners.abstract]
        bind = "unix:@{abstract}"
        [components.one]
        kind = "status"
        listener = "file"
        [components.two]
        kind = "status"
        listener = "abstract"
    """)
    daemon = start_relayd(tmp_path, config)
    try:
        for address in (str(path), "\0" + abstract):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(address)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 200"), reply
        status = json.loads(daemon.ctl("status", "--json").stdout)
        assert status["listeners"]["abstract"]["addresses"] == [f"unix:@{abstract}"]
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(30) == 0
        assert not path.exists()  # relayd bound it, relayd removes it
    finally:
        daemon.kill()


def test_listen_fds_naming_a_closed_fd_is_a_clear_error(tmp_path):
    """A service manager (or wrapper) that lies about LISTEN_FDS: an error, not a traceback."""
    config = write_config(tmp_path / "etc", ACTIVATED)
    # sh's $$ is the pid that exec's relayd, so LISTEN_PID matches; fd 3 is not open.
    wrapper = ["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web exec "$@"', "sh"]
    daemon = start_relayd(tmp_path, config, wrapper=wrapper, wait_ready=False)
    try:
        assert daemon.process.wait(30) == 1
        assert ("socket activation: LISTEN_FDS names fd 3 ('web'), which is not an open socket: "
                "Bad file descriptor") in daemon.log
        assert "Traceback" not in daemon.log
    finally:
        daemon.kill()


def test_malformed_notify_socket_is_a_clear_error(tmp_path):
    config = write_config(tmp_path / "etc", ACTIVATED)
    daemon = start_relayd(tmp_path, config, env={"NOTIFY_SOCKET": "relative.sock"}, wait_ready=False)
    try:
        assert daemon.process.wait(30) == 1
        assert "NOTIFY_SOCKET='relative.sock' is neither an absolute path nor an @abstract name" in daemon.log
        assert "Traceback" not in daemon.log
    finally:
        daemon.kill()


def test_a_passed_socket_no_listener_uses_is_logged(tmp_path):
    web, spare = listening_socket("127.0.0.1:0"), listening_socket("127.0.0.1:0")
    config = write_config(tmp_path / "etc", ACTIVATED)
    daemon = start_relayd(tmp_path, config, activate={"web": [web], "admin": [spare]})
    try:
        assert "socket-activated fd name 'admin' is not used by any listener" in daemon.log
    finally:
        web.close()
        spare.close()
        daemon.kill()


def test_a_passed_socket_that_does_not_listen_is_a_clear_error(tmp_path):
    """E.g. a socket unit with Accept=yes passes a connected socket: not for relayd."""
    server = listening_socket("127.0.0.1:0")
    connected = socket.create_connection(server.getsockname())
    config = write_config(tmp_path / "etc", ACTIVATED)
    daemon = start_relayd(tmp_path, config, activate={"web": [connected]}, wait_ready=False)
    try:
        assert daemon.process.wait(30) == 1
        assert ("socket activation: fd 3 ('web') is not a listening stream socket "
                "(relayd needs ListenStream= with Accept=no)") in daemon.log
    finally:
        connected.close()
        server.close()
        daemon.kill()


def test_a_tcp_socket_passed_as_control_is_refused(tmp_path):
    web, tcp_control = listening_socket("127.0.0.1:0"), listening_socket("127.0.0.1:0")
    config = write_config(tmp_path / "etc", ACTIVATED)
    daemon = start_relayd(tmp_path, config, activate={"web": [web], "control": [tcp_control]},
                          wait_ready=False)
    try:
        assert daemon.process.wait(30) == 1
        assert ("control socket: the socket passed as 'control' is not a unix socket; refusing to serve "
                "the control API on it") in daemon.log
    finally:
        web.close()
        tcp_control.close()
        daemon.kill()


def test_a_control_socket_in_use_by_another_relayd_is_a_clear_error(relayd, tmp_path):
    first = relayd(ACTIVATED.replace('fd_name = "web"', f'bind = "127.0.0.1:{free_port()}"'))
    config = write_config(tmp_path / "second", ACTIVATED.replace('fd_name = "web"',
                                                                  f'bind = "127.0.0.1:{free_port()}"'))
    second = start_relayd(tmp_path / "second", config, control_socket=first.control_socket, wait_ready=False)
    try:
        assert second.process.wait(30) == 1
        assert f"control socket: {first.control_socket} is in use by another process" in second.log
        assert first.ctl("status").returncode == 0  # the first one's socket was left alone
    finally:
        second.kill()
