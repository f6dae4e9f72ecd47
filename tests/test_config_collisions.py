"""Configurations that would silently collide at run time are refused by `relayd --check` and by
a reload, naming both parties: two components on one listener (or on one socket under two listener
names), a management API on a proxy listener, and two browser logins (globus_login) sharing paths
or cookies on one listener. Legitimate sharing (one http_proxy's services and extra_listeners on
the same listeners) still loads."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from relayd.testing import BIN, free_port
from test_http_proxy import Upstream, request

REPO = Path(__file__).resolve().parents[1]


def check(tmp_path: Path, text: str, name: str = "relayd.toml") -> subprocess.CompletedProcess:
    """`relayd --check` as a real process on a directory holding `text`."""
    directory = tmp_path / f"etc-{len(list(tmp_path.glob('etc-*')))}"
    directory.mkdir()
    (directory / name).write_text(textwrap.dedent(text).lstrip("\n"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
    return subprocess.run([str(BIN / "relayd"), "--check", "--config", str(directory)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


def refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in:\n{result.stderr}"
    return result.stderr


BASE = """
[listeners.web]
bind = "127.0.0.1:18080"
[listeners.other]
bind = "127.0.0.1:18081"
[auth.open]
method = "none"
"""


def proxy(name: str, listener: str = "web", prefix: str = "/acme", extra: str = "") -> str:
    return f"""
[components.{name}]
kind = "http_proxy"
auth = "open"
{extra}
[components.{name}.services.s-{name}]
listeners = ["{listener}"]
from = "{prefix}"
to = "http://127.0.0.1:1"
"""


# -- two components, one listener -----------------------------------------------------------------

def test_two_http_proxies_on_one_listener_are_refused_naming_both(tmp_path):
    text = BASE + proxy("first", prefix="/acme") + proxy("second", prefix="/other")
    err = refused(check(tmp_path, text), "components.first", "components.second", "'web'",
                  "two components cannot accept connections on one listener")
    # Where: the file and line of the second reference, and the key of the first.
    lines = textwrap.dedent(text).lstrip("\n").splitlines()
    header = next(n for n, l in enumerate(lines, 1) if l.startswith("[components.second.services"))
    line = next(n for n, l in enumerate(lines, 1) if n > header and l.startswith("listeners ="))
    assert f"relayd.toml:{line}: components.second.services.s-second.listeners" in err, err
    assert "components.first.services.s-first.listeners" in err
    assert "is invalid" in err


@pytest.mark.parametrize("other", [
    '[components.r]\nkind = "relay"\nlistener = "web"\nauth = "open"\n',
    '[components.r]\nkind = "status"\nlistener = "web"\n',
    ('[components.r]\nkind = "stream"\nlistener = "web"\nauth = "open"\ndata_bind = "127.0.0.1"\n'
     'ports = "21000-21003"\n'),
])
def test_any_two_kinds_on_one_listener_are_refused(tmp_path, other):
    refused(check(tmp_path, BASE + proxy("web") + other), "components.web", "components.r", "'web'")


def test_extra_listeners_and_management_listener_count_as_claims(tmp_path):
    status_on_other = '[components.health]\nkind = "status"\nlistener = "other"\n'
    refused(check(tmp_path, BASE + proxy("web", extra='extra_listeners = ["other"]') + status_on_other),
            "components.web.extra_listeners", "components.health")
    mgmt = BASE + proxy("web", extra='management = { listener = "other", token = "t" }') + status_on_other
    refused(check(tmp_path, mgmt), "components.web.management.listener", "components.health")


def test_two_listener_names_for_one_socket_are_refused(tmp_path):
    text = BASE + """
[listeners.alias]
bind = "127.0.0.1:18080"
[components.health]
kind = "status"
listener = "alias"
""" + proxy("web")
    refused(check(tmp_path, text), "'web'", "'alias'", "127.0.0.1:18080", "one socket",
            "components.web", "components.health")
    # Also within one component: two servers of the same proxy would accept on the socket.
    text = BASE + """
[listeners.alias]
fd_name = "www"
bind = "127.0.0.1:18090"
[listeners.www]
fd_name = "www"
bind = "127.0.0.1:18091"
""" + proxy("web", listener="alias") + """
[components.web.services.two]
listeners = ["www"]
from = "/two"
to = "http://127.0.0.1:1"
"""
    refused(check(tmp_path, text), "'alias'", "'www'", "fd_name", "both used by components.web")


def test_management_api_on_a_proxy_listener_is_refused(tmp_path):
    text = BASE + proxy("web", extra='management = { listener = "web", token = "t" }')
    refused(check(tmp_path, text), "components.web", "management.listener 'web' is also a proxy listener",
            "services.s-web.listeners")


def test_legitimate_sharing_still_loads(tmp_path):
    # One component: services and extra_listeners on the same listeners, the management API on its
    # own listener; the same listener used by several services of that component.
    text = BASE + """
[listeners.mgmt]
bind = "127.0.0.1:18082"
[components.health]
kind = "status"
listener = "mgmt2"
[listeners.mgmt2]
bind = "127.0.0.1:18083"
""" + proxy("web", extra='extra_listeners = ["web", "other"]\nmanagement = { listener = "mgmt", token = "t" }') + """
[components.web.services.b]
listeners = ["web", "other"]
from = "/b"
to = "http://127.0.0.1:1"
"""
    result = check(tmp_path, text)
    assert result.returncode == 0, result.stderr
    shipped = subprocess.run([str(BIN / "relayd"), "--check", "--config", str(REPO / "etc" / "relayd")],
                             capture_output=True, text=True, timeout=60, check=False,
                             env={k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")})
    assert shipped.returncode == 0, shipped.stderr


def test_reload_adding_a_second_proxy_on_the_listener_is_rejected(relayd, port):
    with Upstream() as up:
        daemon = relayd(f"""
            [listeners.web]
            bind = "127.0.0.1:{port}"
            [auth.open]
            method = "none"
            [components.first]
            kind = "http_proxy"
            auth = "open"
            [components.first.services.acme]
            listeners = ["web"]
            from = "/acme"
            to = "{up.url}"
        """)
        assert request(port, "GET", "/acme/x")[0] == 200
        (daemon.config_dir / "conf.d").mkdir(exist_ok=True)
        (daemon.config_dir / "conf.d" / "50-second.toml").write_text(textwrap.dedent(f"""
            [components.second]
            kind = "http_proxy"
            auth = "open"
            [components.second.services.other]
            listeners = ["web"]
            from = "/other"
            to = "{up.url}"
        """))
        result = daemon.ctl("reload")
        assert result.returncode == 1
        assert "components.first" in result.stderr and "components.second" in result.stderr, result.stderr
        assert "50-second.toml" in result.stderr
        # Still the old generation, whole: every request reaches the first component.
        for _ in range(20):
            status, _, body = request(port, "GET", "/acme/x")
            assert status == 200 and json.loads(body)["path"] == "/x"
        status = json.loads(daemon.ctl("status", "--json").stdout)
        assert status["generation"] == 1 and set(status["components"]) == {"first"}


# -- two browser logins on one listener ------------------------------------------------------------

def globus_login(name: str, extra: str = "") -> str:
    return f"""
[auth.{name}]
method = "globus_login"
client_id = "00000000-0000-0000-0000-000000000000"
client_secret = "s"
auth_base_url = "http://127.0.0.1:1"
{extra}
"""


def two_logins(a_extra: str = "", b_extra: str = "", b_listener: str = "web") -> str:
    return BASE + globus_login("alpha", a_extra) + globus_login("beta", b_extra) + """
[components.web]
kind = "http_proxy"
auth = "alpha"
[components.web.services.one]
listeners = ["web"]
from = "/one"
to = "http://127.0.0.1:1"
[components.web.services.two]
listeners = ["web"]
from = "/two"
to = "http://127.0.0.1:1"
[components.web.services.three]
""" + f"""listeners = ["{b_listener}"]
from = "/three"
to = "http://127.0.0.1:1"
auth = "beta"
"""


def test_two_globus_logins_with_default_paths_on_one_listener_are_refused(tmp_path):
    err = refused(check(tmp_path, two_logins()), "'alpha'", "'beta'", "listener 'web'", "'/.relayd/",
                  "components.web.services.three.auth")
    assert err.count("both log browsers in") == 1, err  # one problem per pair, not per path


def test_shared_logout_path_alone_is_refused(tmp_path):
    refused(check(tmp_path, two_logins(
        'login_path = "/a/login"\nlogout_path = "/logout"\ncookie_name = "a"',
        'login_path = "/b/login"\nlogout_path = "/logout"\ncookie_name = "b"')),
        "'alpha'", "'beta'", "'/logout'")


@pytest.mark.parametrize("a_cookie, b_cookie, shared", [
    ("same", "same", "'same'"),
    ("s", "s_login", "'s_login'"),  # beta's session cookie is alpha's login cookie
])
def test_shared_cookie_names_are_refused(tmp_path, a_cookie, b_cookie, shared):
    refused(check(tmp_path, two_logins(
        f'login_path = "/a/login"\nlogout_path = "/a/logout"\ncookie_name = "{a_cookie}"',
        f'login_path = "/b/login"\nlogout_path = "/b/logout"\ncookie_name = "{b_cookie}"')),
        "'alpha'", "'beta'", shared, "cookie")


def test_distinct_logins_or_other_listeners_load(tmp_path):
    distinct = two_logins('login_path = "/a/login"\nlogout_path = "/a/logout"\ncookie_name = "a"',
                          'login_path = "/b/login"\nlogout_path = "/b/logout"\ncookie_name = "b"')
    assert check(tmp_path, distinct).returncode == 0
    assert check(tmp_path, two_logins(b_listener="other")).returncode == 0


def test_login_and_logout_path_of_one_method_must_differ(tmp_path):
    text = BASE + globus_login("alpha", 'login_path = "/x"\nlogout_path = "/x"')
    refused(check(tmp_path, text), "auth.alpha", "login_path and logout_path must differ")


def test_runtime_service_with_a_clashing_login_is_refused(relayd, port):
    # Services created through the management API use the component's `auth` (alpha); the
    # configured service uses beta on the same listener: the runtime service would clash.
    mgmt = free_port()
    daemon = relayd(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [listeners.mgmt]
        bind = "127.0.0.1:{mgmt}"
    """ + textwrap.indent(globus_login("alpha") + globus_login("beta"), "        ") + """
        [components.web]
        kind = "http_proxy"
        auth = "alpha"
        management = { listener = "mgmt", token = "t" }
        [components.web.services.one]
        listeners = ["web"]
        from = "/one"
        to = "http://127.0.0.1:1"
        auth = "beta"
    """)
    headers = {"Authorization": "Bearer t", "Content-Type": "application/json"}
    body = {"name": "two", "bindHttp": f"127.0.0.1:{port}", "from": "/two", "to": "http://127.0.0.1:1"}
    status, _, reply = request(mgmt, "POST", "/services", headers, json.dumps(body))
    assert status == 400, reply
    message = json.loads(reply)["message"]
    assert "'alpha'" in message and "'beta'" in message and "/.relayd/" in message, message
    status, _, reply = request(mgmt, "GET", "/services", headers)
    assert status == 200 and [s["name"] for s in json.loads(reply)] == ["one"]
    assert daemon.process.poll() is None


# -- relayctl config --origins ------------------------------------------------------------------

def test_config_origins_print_from_with_its_file_and_line(relayd, port):
    daemon = relayd(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [auth.open]
        method = "none"
        [components.web]
        kind = "http_proxy"
        auth = "open"
        [components.web.services.acme]
        listeners = ["web"]
        from = "/acme"
        to = "http://127.0.0.1:1"
    """)
    result = daemon.ctl("config", "--origins")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if ".services.acme." in line]
    from_rows = [line for line in rows if line.startswith("components.web.services.acme.from ")]
    assert from_rows, result.stdout
    text = (daemon.config_dir / "relayd.toml").read_text().splitlines()
    line = next(n for n, l in enumerate(text, 1) if l.strip().startswith("from ="))
    assert from_rows[0].endswith(f"relayd.toml:{line}"), from_rows
    assert not any("from_" in row for row in rows), rows
    config = json.loads(daemon.ctl("config", "--json").stdout)["config"]
    service = config["components"]["web"]["services"]["acme"]
    assert service["from"] == "/acme" and "from_" not in service
    assert 'from = "/acme"' in daemon.ctl("config").stdout
