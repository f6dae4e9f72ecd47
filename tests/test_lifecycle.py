"""A relayd process from start to stop, as systemd and an operator see it."""

from __future__ import annotations

import json
import os
import signal

from relayd.systemd import monotonic_usec
from relayd.testing import get_text as get


def status_config(port: int) -> str:
    return f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [components.health]
        kind = "status"
        listener = "web"
    """


def test_ready_reload_stop_notifications(relayd, port):
    daemon = relayd(status_config(port))
    ready = daemon.manager.received[-1]
    assert ready.pid == daemon.process.pid
    assert "generation 1" in ready.fields["STATUS"]
    assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")

    before = monotonic_usec()
    daemon.process.send_signal(signal.SIGHUP)
    reloading = daemon.manager.wait_for("RELOADING", "1")
    assert int(reloading.fields["MONOTONIC_USEC"]) >= before
    assert "generation 2" in daemon.manager.wait_for("READY", "1").fields["STATUS"]

    daemon.process.send_signal(signal.SIGTERM)
    stopping = daemon.manager.wait_for("STOPPING", "1")
    assert stopping.pid == daemon.process.pid
    assert daemon.process.wait(30) == 0


def test_status_and_metrics(relayd, port):
    daemon = relayd(status_config(port))
    result = daemon.ctl("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["generation"] == 1
    assert status["components"]["health"] == {
        "kind": "status", "state": "serving", "requests": 0, "connections": 0,
    }
    code, text = get(f"http://127.0.0.1:{port}/metrics")
    assert 'relayd_component_up{component="health",kind="status"} 1.0' in text
    assert daemon.ctl("status").stdout.count("health") == 1


def test_relayctl_unreachable_exits_2(tmp_path):
    import subprocess

    from relayd.testing import BIN

    result = subprocess.run([str(BIN / "relayctl"), "--socket", str(tmp_path / "none.sock"), "status"],
                            capture_output=True, text=True, env={**os.environ, "RELAYD_CONTROL__SOCKET": ""})
    assert result.returncode == 2
    assert "cannot reach relayd" in result.stderr
