"""relayctl login / check-auth / logout against the fake Globus, and relayd serving Globus auth.

relayctl runs as a subprocess with globus-sdk pointed at the fake by its documented
GLOBUS_SDK_SERVICE_URL_AUTH; the browser step is an HTTP client following the authorize URL.
"""

from __future__ import annotations

import http.client
import json
import os
import stat
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pytest

from relayd.testing import BIN
from relayd.testing import get_json as get


def relay_scope(fake) -> str:
    return f"https://auth.globus.org/scopes/{fake.client_id}/relay"


@pytest.fixture
def client_env(tmp_path, fake_globus):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAYD_", "GLOBUS_", "XDG_"))}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "home-config"), GLOBUS_SDK_SERVICE_URL_AUTH=fake_globus.base_url,
               RELAYD_GLOBUS_CLIENT_ID=fake_globus.native_client_id)
    return env


def relayctl(env, *args, input=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "relayctl"), *args], capture_output=True, text=True, env=env,
                          input=input, timeout=60)


def login(env, *args) -> tuple[subprocess.CompletedProcess, dict[str, list[str]]]:
    """Run relayctl login, play the browser against the authorize URL, paste the code."""
    process = subprocess.Popen([str(BIN / "relayctl"), "login", "--no-browser", *args], env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = None
    for line in process.stdout:
        if line.startswith("http"):
            url = line.strip()
            break
    if url is None:  # the command failed before printing a URL
        out, err = process.communicate(timeout=60)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err), {}
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request("GET", f"{parts.path}?{parts.query}")
    response = connection.getresponse()
    assert response.status == 302, response.read()
    location = urllib.parse.urlsplit(response.getheader("Location"))
    assert location.path == "/v2/web/auth-code"  # globus-sdk's default native redirect
    code = urllib.parse.parse_qs(location.query)["code"][0]
    out, err = process.communicate(code + "\n", timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), query


def test_login_check_auth_logout_cycle(fake_globus, client_env, tmp_path):
    other_scope = "urn:globus:auth:scope:transfer.api.globus.org:all"
    result, query = login(client_env, "--scope", relay_scope(fake_globus), "--scope", other_scope)
    assert result.returncode == 0, result.stderr
    assert query["code_challenge_method"] == ["S256"] and query["access_type"] == ["offline"]
    assert set(query["scope"][0].split()) >= {relay_scope(fake_globus), other_scope}
    assert "logged in as alice@example.org" in result.stdout

    token_file = tmp_path / "home-config" / "relayd" / "tokens.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700

    checked = relayctl(client_env, "check-auth")
    assert checked.returncode == 0, checked.stderr
    assert "alice@example.org" in checked.stdout and "transfer.api.globus.org" in checked.stdout
    tokens = [t for t in fake_globus.tokens if t in checked.stdout]
    assert tokens == []  # the token itself only with --show-token

    shown = json.loads(relayctl(client_env, "check-auth", "--scope", relay_scope(fake_globus), "--json",
                                "--show-token").stdout)
    [row] = shown
    assert row["identity_id"] == fake_globus.login_identity["sub"]
    record = fake_globus.tokens[row["access_token"]]
    assert record["scope"] == relay_scope(fake_globus) and fake_globus.client_id in record["aud"]

    out = relayctl(client_env, "logout", "--scope", other_scope)
    assert out.returncode == 0, out.stderr
    assert relayctl(client_env, "check-auth", "--scope", relay_scope(fake_globus)).returncode == 0
    out = relayctl(client_env, "logout")
    assert out.returncode == 0, out.stderr
    assert fake_globus.tokens[row["access_token"]]["revoked"]
    assert all(r["revoked"] for r in fake_globus.refresh_tokens.values())
    gone = relayctl(client_env, "check-auth", "--scope", relay_scope(fake_globus))
    assert gone.returncode == 1
    assert f"run `relayctl login --scope {relay_scope(fake_globus)}`" in gone.stderr


def test_expired_access_tokens_are_refreshed(fake_globus, client_env):
    fake_globus.access_token_lifetime = 30  # inside relayctl's refresh margin: always stale
    result, _ = login(client_env, "--scope", relay_scope(fake_globus))
    assert result.returncode == 0, result.stderr
    first = json.loads(relayctl(client_env, "check-auth", "--scope", relay_scope(fake_globus), "--json",
                                "--show-token").stdout)[0]
    second = json.loads(relayctl(client_env, "check-auth", "--scope", relay_scope(fake_globus), "--json",
                                 "--show-token").stdout)[0]
    assert first["refreshed"] and second["refreshed"]
    assert first["access_token"] != second["access_token"]
    assert fake_globus.calls["token"] == 3  # one code exchange, two refreshes
    assert second["has_refresh_token"]

    # A revoked refresh token means logging in again, and the message says how.
    for refresh in fake_globus.refresh_tokens:
        fake_globus.revoke(refresh)
    stale = relayctl(client_env, "check-auth", "--scope", relay_scope(fake_globus))
    assert stale.returncode == 1 and "relayctl login --scope" in stale.stderr


def globus_relayd_config(fake, port: int, secret: str | None = None) -> str:
    return f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [logging]
        level = "debug"
        [auth.globus]
        method = "globus"
        client_id = "{fake.client_id}"
        client_secret = "{secret or fake.client_secret}"
        auth_base_url = "{fake.base_url}"
        required_scopes = ["{relay_scope(fake)}"]
        [components.health]
        kind = "status"
        listener = "web"
        auth = "globus"
    """


def test_login_by_server_uses_discovery_then_relayd_accepts_the_token(fake_globus, client_env, relayd, port):
    daemon = relayd(globus_relayd_config(fake_globus, port))
    server = f"http://127.0.0.1:{port}"
    status, _, doc = get(server + "/.well-known/relayd")
    assert status == 200
    assert doc["auth"] == [{"name": "globus", "method": "globus", "scope": relay_scope(fake_globus),
                            "audience": fake_globus.client_id, "auth_base_url": fake_globus.base_url.rstrip("/")}]

    result, query = login(client_env, "--server", server)
    assert result.returncode == 0, result.stderr
    assert relay_scope(fake_globus) in query["scope"][0].split()

    token = json.loads(relayctl(client_env, "check-auth", "--server", server, "--json",
                                "--show-token").stdout)[0]["access_token"]
    assert get(server + "/status", f"Bearer {token}")[0] == 200
    status, headers, body = get(server + "/status")
    assert status == 401 and f'scope="{relay_scope(fake_globus)}"' in headers["WWW-Authenticate"]
    fake_globus.down = True
    assert get(server + "/status", "Bearer AgNotCachedYet")[0] == 503
    fake_globus.down = False
    metrics = daemon.ctl("metrics").stdout
    assert 'relayd_auth_globus_unavailable_total{auth="globus"} 1.0' in metrics
    assert 'relayd_auth_globus_introspections_total{auth="globus"} 2.0' in metrics
    daemon.stop()


def test_scope_map_overrides_discovery_and_unmapped_servers_fail_clearly(fake_globus, client_env, tmp_path):
    config = tmp_path / "home-config" / "relayd" / "client.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[scope_maps.sites.servers]\n"S2CS.example.org:5000" = "'
                      f'{relay_scope(fake_globus)}"\n')
    result, query = login(client_env, "--server", "s2cs.example.org:5000")
    assert result.returncode == 0, result.stderr
    assert relay_scope(fake_globus) in query["scope"][0].split()

    # Unmapped and nothing answering discovery (a closed loopback port): a clear error, no flow.
    from relayd.testing import free_port

    address = f"127.0.0.1:{free_port()}"
    failed = relayctl(client_env, "login", "--no-browser", "--server", f"http://{address}")
    assert failed.returncode == 1
    assert f"no Globus scope is mapped for server '{address}'" in failed.stderr
    assert f'"{address}" = "<scope string>"' in failed.stderr and str(config) in failed.stderr


def test_token_helper_for_other_commands(fake_globus, client_env, monkeypatch, tmp_path):
    from relayd.auth import client

    for key, value in client_env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(client.NeedLogin, match=f"relayctl login --scope {relay_scope(fake_globus)}"):
        client.token_for_server("10.0.0.1:5000", scope=relay_scope(fake_globus))
    result, _ = login(client_env, "--scope", relay_scope(fake_globus))
    assert result.returncode == 0, result.stderr
    header = client.authorization_for_server("ignored:1", scope=relay_scope(fake_globus))
    assert header.startswith("Bearer ") and header[7:] in fake_globus.tokens


def test_login_without_a_client_id_says_how_to_set_one(client_env):
    env = {k: v for k, v in client_env.items() if k != "RELAYD_GLOBUS_CLIENT_ID"}
    failed = relayctl(env, "login", "--no-browser", "--scope", "openid")
    assert failed.returncode == 1 and "client_id" in failed.stderr and "RELAYD_GLOBUS_CLIENT_ID" in failed.stderr


def test_no_secret_or_token_in_relayd_log_or_relayctl_config(fake_globus, relayd, port, tmp_path):
    """Every secret and token this test uses is absent from the log and the config output."""
    daemon = relayd(globus_relayd_config(fake_globus, port), fragments={"50-users.toml": """
        [auth.users]
        method = "basic"
        [listeners.web2]
        bind = "127.0.0.1:0"
    """})
    server = f"http://127.0.0.1:{port}"
    good = fake_globus.issue_token(scopes=[relay_scope(fake_globus)])
    inactive = fake_globus.issue_token(scopes=[relay_scope(fake_globus)], active=False)
    wrong_scope = fake_globus.issue_token(scopes=["openid"])
    assert get(server + "/status", f"Bearer {good}")[0] == 200
    assert get(server + "/status", f"Bearer {inactive}")[0] == 401
    assert get(server + "/status", f"Bearer {wrong_scope}")[0] == 403
    fake_globus.down = True
    unavailable = fake_globus.issue_token(scopes=[relay_scope(fake_globus)])
    assert get(server + "/status", f"Bearer {unavailable}")[0] == 503
    fake_globus.down = False
    password = "users-password-8f3a"
    assert daemon.ctl("users", "add", "alice", input=password + "\n").returncode == 0

    # A reload with a wrong secret (relayd keeps going, denies with 503, logs the cause).
    wrong_secret = "wrong-secret-d41d8cd98f"
    (daemon.config_dir / "relayd.toml").write_text(
        globus_relayd_config(fake_globus, port, secret=wrong_secret).replace("        ", ""))
    assert daemon.ctl("reload").returncode == 0
    assert get(server + "/status", f"Bearer {good}x")[0] == 503

    outputs = [daemon.ctl("config").stdout, daemon.ctl("config", "--json").stdout,
               daemon.ctl("config", "--origins").stdout]
    assert "**" in outputs[0]  # the secret is there, redacted
    daemon.stop()
    log = daemon.log
    assert "refused" in log and "client credentials" in log  # the log does say what happened
    for secret in (fake_globus.client_secret, wrong_secret, good, inactive, wrong_scope, unavailable,
                   good + "x", password):
        assert secret not in log
        for output in outputs:
            assert secret not in output


def test_status_warns_loudly_about_auth_none_on_public_listeners(relayd, port):
    daemon = relayd(f"""
        [listeners.public]
        bind = "0.0.0.0:{port}"
        [listeners.local]
        bind = "127.0.0.1:0"
        [auth.open]
        method = "none"
        [components.exposed]
        kind = "status"
        listener = "public"
        auth = "open"
        [components.private]
        kind = "status"
        listener = "local"
        auth = "open"
    """)
    status = daemon.ctl("status")
    assert status.returncode == 0, status.stderr
    warnings = [line for line in status.stdout.splitlines() if "AUTH DISABLED" in line]
    assert len(warnings) == 1 and "'open'" in warnings[0] and "public" in warnings[0]
    body = json.loads(daemon.ctl("status", "--json").stdout)
    assert body["components"]["exposed"]["warnings"] and not body["components"]["private"].get("warnings")
