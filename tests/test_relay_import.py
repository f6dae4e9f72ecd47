"""relayctl import proxystore-relay: a stock relay's TOML becomes a conf.d fragment relayd accepts."""

from __future__ import annotations

import subprocess
import tomllib

from relayd.testing import BIN


def run_import(*args: str, cwd=None) -> subprocess.CompletedProcess:
    # no --socket and no daemon: the command must not need one
    return subprocess.run([str(BIN / "relayctl"), "--socket", "/nonexistent/control.sock", "import",
                           "proxystore-relay", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


FULL = """
host = "127.0.0.1"
port = 18700
certfile = "/etc/relay/cert.pem"
keyfile = "/etc/relay/privkey.pem"
max_message_bytes = 16384
default_log_level = "DEBUG"

[auth]
method = "globus"
[auth.kwargs]
client_id = "0f2a5b61-1111-4222-8333-444455556666"
client_secret = "s3cret"
audience = "0f2a5b61-1111-4222-8333-444455556666"

[logging]
log_dir = "/var/log/relay"
default_level = "WARNING"
websockets_level = "WARNING"
current_client_interval = 30
current_client_limit = 8
connected_client_logging_limit = 4
"""


def test_full_config_converts_and_lists_what_it_dropped(tmp_path):
    src = tmp_path / "relay.toml"
    src.write_text(FULL)
    out = tmp_path / "50-relay.toml"
    result = run_import(str(src), "--name", "edge", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert (out.stat().st_mode & 0o777) == 0o600  # it holds the client secret
    data = tomllib.loads(out.read_text())
    assert data["listeners"]["edge"] == {"bind": "127.0.0.1:18700",
                                         "tls": {"cert": "/etc/relay/cert.pem", "key": "/etc/relay/privkey.pem"}}
    assert data["auth"]["edge_globus"] == {"method": "globus", "client_id": "0f2a5b61-1111-4222-8333-444455556666",
                                           "client_secret": "s3cret",
                                           "audience": "0f2a5b61-1111-4222-8333-444455556666"}
    assert data["components"]["edge"] == {"kind": "relay", "listener": "edge", "auth": "edge_globus",
                                          "max_message_bytes": 16384 - 49, "current_clients_interval": 30,
                                          "current_clients_limit": 8}
    assert data["logging"]["loggers"] == {"relayd.relay.edge": "warning"}
    for word in ("log_dir", "websockets_level", "default_log_level", "connected_client_logging_limit",
                 "sys.getsizeof"):
        assert word in result.stderr
    # and refusing to overwrite
    again = run_import(str(src), "-o", str(out))
    assert again.returncode == 1 and "exists" in again.stderr


def test_minimal_config_is_accepted_by_relayd(tmp_path):
    src = tmp_path / "relay.toml"
    src.write_text("port = 8701\n")
    result = run_import(str(src))
    assert result.returncode == 0, result.stderr
    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True)
    (etc / "relayd.toml").write_text("")
    (etc / "conf.d" / "50-relay.toml").write_text(result.stdout)
    check = subprocess.run([str(BIN / "relayd"), "--check", "--config", str(etc)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    data = tomllib.loads(result.stdout)
    assert data["listeners"]["relay"]["bind"] == "8701"  # every interface, like proxystore-relay
    assert data["auth"]["relay_open"] == {"method": "none"}
    assert "every interface" in result.stderr and "auth: none" in result.stderr


def test_bad_input_is_a_clear_error(tmp_path):
    src = tmp_path / "relay.toml"
    src.write_text('port = "8700"\n')
    result = run_import(str(src))
    assert result.returncode == 1 and "expected int" in result.stderr and "Traceback" not in result.stderr
    src.write_text('[auth]\nmethod = "basic"\n')
    result = run_import(str(src))
    assert result.returncode == 1 and "globus" in result.stderr
    result = run_import(str(tmp_path / "missing.toml"))
    assert result.returncode == 1 and "cannot read" in result.stderr
