"""`token = "none"`: the management API without a bearer token, as an unmodified
ya-runtime-http-auth runtime drives it (plain HTTP, no Authorization header), on loopback only."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from relayd.config import ConfigError, load_config
from relayd.plugins import Registry
from relayd.testing import BIN, free_port
from test_http_proxy import Upstream, basic, request

JSON = {"Content-Type": "application/json"}


def config(port: int, mgmt_bind: str, token: str = "none") -> str:
    return f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [listeners.mgmt]
        bind = "{mgmt_bind}"
        [auth.users]
        method = "basic"
        [components.web]
        kind = "http_proxy"
        auth = "users"
        extra_listeners = ["web"]
        management = {{ listener = "mgmt", token = "{token}" }}
    """


def ya_flow(mgmt: int, port: int, upstream: str) -> dict:
    """What the runtime does: create the service, create a user, use it, read the user's stats."""
    service = {"name": "ya-svc", "description": "ACME service v1.42", "serverName": ["127.0.0.1"],
               "bindHttp": f"127.0.0.1:{port}", "from": "/ya", "to": upstream + "/base"}
    status, headers, body = request(mgmt, "POST", "/services", JSON, json.dumps(service))
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["name"] == "ya-svc"
    status, _, body = request(mgmt, "GET", "/services/ya-svc")
    assert status == 200 and json.loads(body)["from"] == "/ya"
    status, _, body = request(mgmt, "POST", "/services/ya-svc/users", JSON,
                              json.dumps({"username": "requestor-1", "password": "pw"}))
    assert status == 200, body
    assert json.loads(body)["username"] == "requestor-1"
    for path in ("/ya/a", "/ya/a", "/ya/b"):
        status, _, body = request(port, "GET", path, basic("requestor-1", "pw"))
        assert status == 200 and json.loads(body)["path"] == "/base" + path.removeprefix("/ya")
    assert request(port, "GET", "/ya/a", basic("requestor-1", "wrong"))[0] == 401
    status, _, body = request(mgmt, "GET", "/services/ya-svc/users/requestor-1/stats")
    assert status == 200, body
    stats = json.loads(body)
    status, _, body = request(mgmt, "GET", "/services/ya-svc/users/requestor-1/endpoints/stats")
    assert status == 200
    assert json.loads(body) == {"/ya/a": 2, "/ya/b": 1}
    status, _, body = request(mgmt, "GET", "/services/ya-svc/users")
    assert status == 200 and [u["username"] for u in json.loads(body)] == ["requestor-1"]
    return stats


def test_ya_style_flow_without_a_token_on_loopback(relayd, port):
    mgmt = free_port()
    with Upstream() as up:
        daemon = relayd(config(port, f"127.0.0.1:{mgmt}"))
        stats = ya_flow(mgmt, port, up.url)
    assert stats["requests"] == 3
    # Any Authorization header is simply not looked at.
    assert request(mgmt, "GET", "/services", {"Authorization": "Bearer whatever"})[0] == 200

    # relayctl status warns, like AUTH DISABLED; the effective configuration shows the opt-out.
    status = daemon.ctl("status")
    assert status.returncode == 0
    warnings = [line for line in status.stdout.splitlines() if "MANAGEMENT TOKEN DISABLED" in line]
    assert len(warnings) == 1 and "'mgmt'" in warnings[0] and f"127.0.0.1:{mgmt}" in warnings[0], status.stdout
    entry = json.loads(daemon.ctl("status", "--json").stdout)["components"]["web"]
    assert any("MANAGEMENT TOKEN DISABLED" in w for w in entry["warnings"])
    effective = json.loads(daemon.ctl("config", "--json").stdout)["config"]
    assert effective["components"]["web"]["management"]["token"] == "none"


def test_a_token_is_still_required_unless_none(relayd, port):
    mgmt = free_port()
    daemon = relayd(config(port, f"127.0.0.1:{mgmt}", token="s3cret"))
    assert request(mgmt, "GET", "/services")[0] == 401
    assert request(mgmt, "GET", "/services", {"Authorization": "Bearer s3cret"})[0] == 200
    status = json.loads(daemon.ctl("status", "--json").stdout)["components"]["web"]
    assert "warnings" not in status
    effective = json.loads(daemon.ctl("config", "--json").stdout)["config"]
    assert effective["components"]["web"]["management"]["token"] == "**********"


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    directory = tmp_path / f"etc-{len(list(tmp_path.glob('etc-*')))}"
    directory.mkdir()
    (directory / "relayd.toml").write_text(textwrap.dedent(text))
    return subprocess.run([str(BIN / "relayd"), "--check", "--config", str(directory)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("bind", ["0.0.0.0:{p}", "192.0.2.10:{p}", "{p}", "[::]:{p}", "example.org:{p}"])
def test_tokenless_on_a_non_loopback_bind_is_refused(tmp_path, bind):
    # Only checked, never started: no traffic goes to these addresses.
    mgmt_bind = bind.format(p=free_port())
    result = check(tmp_path, config(18080, mgmt_bind))
    assert result.returncode == 1, result.stdout
    assert "components.web.management.listener" in result.stderr
    assert 'token = "none"' in result.stderr and "loopback" in result.stderr and mgmt_bind in result.stderr
    # The same config on loopback (IPv4, IPv6, unix) is valid.
    for ok in ("127.0.0.1:18081", "127.1.2.3:18081", "[::1]:18081", "localhost:18081", f"unix:{tmp_path}/m.sock"):
        result = check(tmp_path, config(18080, ok))
        assert result.returncode == 0, (ok, result.stderr)


def test_a_token_on_a_non_loopback_bind_is_refused_at_check_too(tmp_path):
    # Starting always refused it; now `relayd --check` says so before.
    result = check(tmp_path, config(18080, "0.0.0.0:18081", token="s3cret"))
    assert result.returncode == 1
    assert "components.web.management.listener" in result.stderr and "loopback" in result.stderr


def test_reload_to_a_tokenless_public_listener_is_rejected(relayd, port):
    mgmt = free_port()
    daemon = relayd(config(port, f"127.0.0.1:{mgmt}", token="s3cret"))
    (daemon.config_dir / "conf.d").mkdir(exist_ok=True)
    (daemon.config_dir / "conf.d" / "50-open.toml").write_text(
        '[listeners.public]\nbind = "0.0.0.0:1"\n'
        '[components.web.management]\nlistener = "public"\ntoken = "none"\n')
    result = daemon.ctl("reload")
    assert result.returncode == 1 and "loopback" in result.stderr, result.stderr
    assert "50-open.toml" in result.stderr
    # Still the old generation: the token is still required.
    assert request(mgmt, "GET", "/services")[0] == 401
    assert json.loads(daemon.ctl("status", "--json").stdout)["generation"] == 1


def test_the_opt_out_is_the_literal_word_only(tmp_path):
    registry = Registry.discover()
    secret = tmp_path / "token"
    secret.write_text("none\n")
    directory = tmp_path / "etc"
    directory.mkdir()
    (directory / "relayd.toml").write_text(textwrap.dedent(config(18080, "127.0.0.1:18081", token=f"file:{secret}")))
    loaded = load_config(directory, registry=registry, environ={})
    management = loaded.settings.components["web"].management
    assert not management.tokenless and management.token.get_secret_value() == "none"
    # YAML null (or an empty value) is not "none": refused, not an open API.
    (directory / "relayd.toml").unlink()
    (directory / "relayd.yaml").write_text(textwrap.dedent("""
        listeners:
          mgmt: {bind: "127.0.0.1:18081"}
        auth:
          users: {method: basic}
        components:
          web:
            kind: http_proxy
            auth: users
            management: {listener: mgmt, token: null}
    """))
    with pytest.raises(ConfigError) as caught:
        load_config(directory, registry=registry, environ={})
    assert 'token = "none"' in str(caught.value) and "components.web.management.token" in str(caught.value)
