"""sd_notify(3) and sd_listen_fds(3): the pure parts in-process, the sequence on a real relayd."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

import pytest

from relayd.systemd import Notifier, listen_fds, monotonic_usec, parse_listen_env, watchdog_interval
from relayd.testing import FakeServiceManager

STATUS_CONFIG = """
    [listeners.web]
    bind = "127.0.0.1:{port}"
    [components.health]
    kind = "status"
    listener = "web"
"""


# -- parse_listen_env ------------------------------------------------------------------------

def test_listen_env_names_fds_from_3():
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "web:web:control"}
    assert parse_listen_env(env, 42) == [(3, "web"), (4, "web"), (5, "control")]


def test_listen_env_for_another_pid_is_ignored():
    """LISTEN_* inherited by a grandchild must not make it grab fds 3.. (sd_listen_fds(3))."""
    assert parse_listen_env({"LISTEN_PID": "41", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}, 42) == []
    assert parse_listen_env({"LISTEN_FDS": "1"}, 42) == []


def test_listen_env_without_names_uses_unknown():
    assert parse_listen_env({"LISTEN_PID": "7", "LISTEN_FDS": "2"}, 7) == [(3, "unknown"), (4, "unknown")]
    assert parse_listen_env({"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"}, 7) == [
        (3, "a"), (4, "unknown"),
    ]


def test_listen_env_malformed_count_is_ignored():
    assert parse_listen_env({"LISTEN_PID": "7", "LISTEN_FDS": "two"}, 7) == []


def test_listen_fds_removes_the_variables_so_children_do_not_inherit_them():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web", "OTHER": "x"}
    assert listen_fds(env) == {}
    assert env == {"OTHER": "x"}


# -- watchdog_interval -----------------------------------------------------------------------

def test_watchdog_pings_at_half_the_interval():
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}, 5) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "5"}, 5) == 1.5


def test_watchdog_for_another_pid_or_unset_or_malformed_is_off():
    assert watchdog_interval({}, 5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "6"}, 5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 5) is None


# -- Notifier --------------------------------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifier_sends_utf8_status_on_one_line(tmp_path, abstract):
    manager = FakeServiceManager(tmp_path, abstract=abstract)
    notifier = Notifier({"NOTIFY_SOCKET": manager.address})
    try:
        # sdnotify encodes latin-1 and silently drops this message: not us.
        assert notifier.notify(READY=1, STATUS="serving Zürich ✓ 東京\nsecond  line")
        note = manager.receive(5)
        assert note is not None
        assert note.fields == {"READY": "1", "STATUS": "serving Zürich ✓ 東京 second line"}
        assert note.pid == os.getpid()  # what systemd checks for NotifyAccess=main
    finally:
        notifier.close()
        manager.close()


def test_reloading_carries_monotonic_usec_in_the_same_datagram(tmp_path):
    manager = FakeServiceManager(tmp_path)
    notifier = Notifier({"NOTIFY_SOCKET": manager.address})
    try:
        before = monotonic_usec()
        notifier.reloading()
        note = manager.receive(5)
        after = monotonic_usec()
        assert note.fields["RELOADING"] == "1"
        assert before <= int(note.fields["MONOTONIC_USEC"]) <= after
    finally:
        notifier.close()
        manager.close()


def test_notifier_without_notify_socket_is_a_no_op():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.notify(READY=1) is False


def test_notifier_rejects_a_relative_notify_socket():
    with pytest.raises(ValueError, match="neither an absolute path nor an @abstract name"):
        Notifier({"NOTIFY_SOCKET": "relative/notify.sock"})


def test_notifier_logs_but_does_not_raise_when_the_manager_is_gone(tmp_path, caplog):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    try:
        with caplog.at_level(logging.WARNING, logger="relayd.systemd"):
            assert notifier.notify(READY=1) is False
        assert "sd_notify to" in caplog.text
    finally:
        notifier.close()


# -- the sequence a real relayd sends --------------------------------------------------------

def test_ready_reload_stop_sequence(relayd, port):
    daemon = relayd(STATUS_CONFIG.format(port=port))
    ready = daemon.manager.received[-1]
    assert ready.pid == daemon.process.pid
    assert ready.fields["STATUS"] == "generation 1: 1 components, 0 clients"

    for generation in (2, 3):
        before = monotonic_usec()
        daemon.process.send_signal(signal.SIGHUP)
        reloading = daemon.manager.wait_for("RELOADING", "1")
        assert reloading.pid == daemon.process.pid
        assert int(reloading.fields["MONOTONIC_USEC"]) >= before
        ready = daemon.manager.wait_for("READY", "1")
        assert ready.fields["STATUS"] == f"generation {generation}: 1 components, 0 clients"
        # READY must come after RELOADING, with nothing claiming readiness in between.
        between = daemon.manager.received[daemon.manager.received.index(reloading) + 1:-1]
        assert not any("READY" in n.fields for n in between)

    daemon.process.send_signal(signal.SIGTERM)
    stopping = daemon.manager.wait_for("STOPPING", "1")
    assert stopping.pid == daemon.process.pid
    assert daemon.process.wait(30) == 0


def test_sigint_also_stops_cleanly(relayd, port):
    daemon = relayd(STATUS_CONFIG.format(port=port))
    daemon.process.send_signal(signal.SIGINT)
    daemon.manager.wait_for("STOPPING", "1")
    assert daemon.process.wait(30) == 0


def test_watchdog_pings_from_the_main_pid(relayd, port):
    daemon = relayd(STATUS_CONFIG.format(port=port), env={"WATCHDOG_USEC": "200000"})
    pings = [daemon.manager.wait_for("WATCHDOG", "1", timeout=10) for _ in range(3)]
    assert {p.pid for p in pings} == {daemon.process.pid}


def test_no_watchdog_pings_when_watchdog_pid_is_another_process(relayd, port):
    # 10 ms interval: a wrongly enabled watchdog would ping many times during what follows.
    daemon = relayd(STATUS_CONFIG.format(port=port), env={"WATCHDOG_USEC": "20000", "WATCHDOG_PID": "1"})
    assert daemon.ctl("status").returncode == 0
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(30) == 0
    while daemon.manager.receive(0):
        pass
    assert not [n for n in daemon.manager.received if "WATCHDOG" in n.fields]


def test_notify_socket_refusing_messages_does_not_stop_relayd(relayd, port, tmp_path):
    """A service manager that went away: sd_notify errors are logged, serving continues."""
    daemon = relayd(STATUS_CONFIG.format(port=port))
    daemon.manager.sock.close()
    os.unlink(daemon.manager.path)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    daemon.process.send_signal(signal.SIGHUP)
    result = daemon.ctl("status", "--json")
    assert result.returncode == 0
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(30) == 0
    assert "sd_notify to" in daemon.log


# -- signals during a slow start-up ----------------------------------------------------------

def slow_start(relayd, plugin_site, tmp_path, port):
    gate = tmp_path / "gate"
    daemon = relayd(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [components.slow]
        kind = "echo"
        listener = "web"
        start_gate = "{gate}"
    """, env={"PYTHONPATH": str(plugin_site)}, wait_ready=False)
    started = tmp_path / "gate.started"
    deadline = time.monotonic() + 30
    while not started.exists():  # relayd is inside the component's start()
        assert daemon.process.poll() is None, daemon.log
        assert time.monotonic() < deadline, "start() never began"
        daemon.manager.receive(0.01)
    return daemon, gate


def test_sigterm_during_start_up_stops_cleanly(relayd, plugin_site, tmp_path, port):
    daemon, _ = slow_start(relayd, plugin_site, tmp_path, port)
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(30) == 0  # not killed by the signal's default action
    daemon.manager.drain()
    assert any(n.fields.get("STOPPING") == "1" for n in daemon.manager.received)
    assert not any("READY" in n.fields for n in daemon.manager.received)
    assert "stop requested during start-up" in daemon.log


def test_sighup_during_start_up_reloads_once_started(relayd, plugin_site, tmp_path, port):
    daemon, gate = slow_start(relayd, plugin_site, tmp_path, port)
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "SIGHUP during start-up: will reload once started" not in daemon.log:
        assert time.monotonic() < deadline, daemon.log
        daemon.manager.receive(0.01)  # (nothing expected: a poll interval)
    gate.touch()
    assert daemon.manager.wait_for("READY", "1").fields["STATUS"].startswith("generation 1:")
    daemon.manager.wait_for("RELOADING", "1")
    assert daemon.manager.wait_for("READY", "1").fields["STATUS"].startswith("generation 2:")
    assert daemon.process.poll() is None
