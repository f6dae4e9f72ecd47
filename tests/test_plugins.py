"""Plugins come from entry points: a third-party package, installed for real, used from config."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from importlib.metadata import EntryPoint

from relayd.plugins import Registry
from relayd.testing import BIN, free_port, write_config

DUPE = "relayd.components plugin 'dupe' is registered by more than one package: "
BROKEN = ("relayd.components plugin 'broken' from relayd-tinyplugin failed to load: "
          "ModuleNotFoundError: No module named 'relayd_no_such_dependency'")


def env_with(site) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}, "PYTHONPATH": str(site)}


def run(tool: str, *args: str, site) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, env=env_with(site),
                          timeout=60)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_relayctl_plugins_lists_the_third_party_plugin(relayd, plugin_site, port):
    daemon = relayd(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [components.health]
        kind = "status"
        listener = "web"
    """, env={"PYTHONPATH": str(plugin_site)})
    result = daemon.ctl("plugins", "--json")
    rows = {(r["group"], r["name"], r["distribution"]): r for r in json.loads(result.stdout)}
    assert rows[("relayd.components", "echo", "relayd-tinyplugin 0.1.0")]["error"] is None
    assert rows[("relayd.components", "echo", "relayd-tinyplugin 0.1.0")]["target"] == "tinyplugin:EchoComponent"
    assert rows[("relayd.auth", "token", "relayd-tinyplugin 0.1.0")]["error"] is None
    # Built-ins come through the very same entry points.
    assert rows[("relayd.components", "status", "relayd 0.1.0")]["error"] is None
    # Both claimants of "dupe" are shown, each with the conflict; the broken one with its error.
    assert rows[("relayd.components", "dupe", "relayd-tinyplugin 0.1.0")]["error"].startswith(DUPE)
    assert rows[("relayd.components", "dupe", "relayd-tinyplugin-rival 2.0.0")]["error"].startswith(DUPE)
    assert rows[("relayd.components", "broken", "relayd-tinyplugin 0.1.0")]["error"] == (
        "ModuleNotFoundError: No module named 'relayd_no_such_dependency'"
    )

    text = daemon.ctl("plugins")
    assert text.returncode == 1  # something is broken
    echo_line = next(line for line in text.stdout.splitlines() if " echo " in line)
    assert "relayd-tinyplugin 0.1.0" in echo_line and echo_line.endswith("ok")


def test_relayctl_plugins_local_reports_duplicate_and_broken_by_name(plugin_site, tmp_path):
    result = run("relayctl", "--socket", str(tmp_path / "none.sock"), "plugins", "--local", site=plugin_site)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    dupes = [line for line in lines if " dupe " in line]
    assert len(dupes) == 2
    for line in dupes:
        assert "BROKEN: " + DUPE in line
        assert "relayd-tinyplugin (tinyplugin:DupeComponent)" in line
        assert "relayd-tinyplugin-rival (tinyrival:DupeComponent)" in line
    broken = [line for line in lines if " broken " in line]
    assert len(broken) == 1 and "No module named 'relayd_no_such_dependency'" in broken[0]


def test_third_party_component_and_auth_method_serve_from_config(relayd, plugin_site, port):
    daemon = relayd(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [auth.tokens]
        method = "token"
        token = "s3cret-token"
        [components.greeter]
        kind = "echo"
        listener = "web"
        greeting = "bonjour"
        auth = "tokens"
    """, env={"PYTHONPATH": str(plugin_site)})
    assert get(f"http://127.0.0.1:{port}/") == (401, "no credentials")
    assert get(f"http://127.0.0.1:{port}/", {"Authorization": "Bearer wrong"}) == (401, "wrong token")
    assert get(f"http://127.0.0.1:{port}/", {"Authorization": "Bearer s3cret-token"}) == (
        200, "bonjour from greeter\n")
    status = json.loads(daemon.ctl("status", "--json").stdout)
    assert status["components"]["greeter"]["kind"] == "echo"
    assert status["components"]["greeter"]["state"] == "serving"


def test_check_names_a_duplicate_kind_used_by_the_config(plugin_site, tmp_path):
    config = write_config(tmp_path / "etc", """
        [components.twice]
        kind = "dupe"
    """)
    result = run("relayd", "--check", "--config", str(config), site=plugin_site)
    assert result.returncode == 1
    line = next(line for line in result.stderr.splitlines() if "components.twice" in line)
    assert line.startswith(f"relayd: {config / 'relayd.toml'}:3: components.twice.kind: {DUPE}")
    assert "relayd-tinyplugin (tinyplugin:DupeComponent)" in line
    assert "relayd-tinyplugin-rival (tinyrival:DupeComponent)" in line
    assert "Traceback" not in result.stderr


def test_check_names_a_plugin_that_fails_to_import(plugin_site, tmp_path):
    config = write_config(tmp_path / "etc", f"""
        [listeners.web]
        bind = "127.0.0.1:{free_port()}"
        [components.bad]
        kind = "broken"
        listener = "web"
    """)
    result = run("relayd", "--check", "--config", str(config), site=plugin_site)
    assert result.returncode == 1
    assert f"relayd: {config / 'relayd.toml'}:5: components.bad.kind: {BROKEN}" in result.stderr.splitlines()
    assert "Traceback" not in result.stderr


def test_broken_plugins_are_fatal_only_when_used(plugin_site, tmp_path):
    config = write_config(tmp_path / "etc", f"""
        [listeners.web]
        bind = "127.0.0.1:{free_port()}"
        [components.greeter]
        kind = "echo"
        listener = "web"
    """)
    result = run("relayd", "--check", "--config", str(config), site=plugin_site)
    assert result.returncode == 0, result.stderr


def test_relayd_refuses_to_start_on_a_broken_plugin(relayd, plugin_site, port):
    daemon = relayd(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [components.bad]
        kind = "broken"
        listener = "web"
    """, env={"PYTHONPATH": str(plugin_site)}, wait_ready=False)
    assert daemon.process.wait(30) == 1
    assert f"components.bad.kind: {BROKEN}" in daemon.log
    assert "Traceback" not in daemon.log


# -- the registry itself, on entry points made in the test ------------------------------------

def entry(name: str, value: str, group: str = "relayd.components") -> EntryPoint:
    return EntryPoint(name, value, group)


def test_registry_rejects_a_class_whose_kind_does_not_match_its_entry_point():
    registry = Registry()
    registry._add("components", entry("other", "relayd.components.status:StatusComponent"))
    assert registry.usable("components") == {}
    assert "StatusComponent.Config must declare kind: Literal['other']" in registry.problem("components", "other")


def test_registry_reports_an_unknown_plugin_with_what_is_installed():
    registry = Registry()
    registry._add("components", entry("status", "relayd.components.status:StatusComponent"))
    assert registry.problem("components", "nope") == (
        "no relayd.components plugin named 'nope' is installed (installed: status)"
    )
    assert registry.problem("components", "status") is None


def test_registry_tolerates_the_same_distribution_seen_twice():
    registry = Registry()
    registry._add("components", entry("status", "relayd.components.status:StatusComponent"))
    registry._add("components", entry("status", "relayd.components.status:StatusComponent"))
    assert registry.problem("components", "status") is None
    assert registry.conflicts["components"] == {}


def test_a_plugin_adds_relayctl_commands(relayd, plugin_site, port, tmp_path):
    """relayd.cli entry points: a third-party package's relayctl commands appear in --help and
    run, next to the built-in ones, which come in through the very same group."""
    from importlib.metadata import entry_points

    from relayd.cli.ctl import COMMAND_MODULES

    builtin = {ep.module for ep in entry_points(group="relayd.cli") if ep.dist and ep.dist.name == "relayd"}
    assert builtin == set(COMMAND_MODULES)  # every built-in group is an entry point

    shown = run("relayctl", "--help", site=plugin_site)
    assert shown.returncode == 0 and "unavailable" not in shown.stderr, shown.stderr
    assert "tiny-hello" in shown.stdout and "tiny-plugins" in shown.stdout
    assert "users" in shown.stdout  # a built-in group, loaded beside it
    hello = run("relayctl", "--socket", str(tmp_path / "none.sock"), "tiny-hello", "ada", site=plugin_site)
    assert (hello.returncode, hello.stdout, hello.stderr) == (0, "hello, ada, from tinyplugin\n", "")

    daemon = relayd(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [components.health]
        kind = "status"
        listener = "web"
    """, env={"PYTHONPATH": str(plugin_site)})
    counted = daemon.ctl("tiny-plugins")
    assert counted.returncode == 0 and counted.stdout.endswith(" plugins\n"), counted.stderr

    without = run("relayctl", "--help", site=tmp_path)  # the plugin not installed: no such command
    assert "tiny-hello" not in without.stdout
