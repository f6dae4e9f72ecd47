"""Layered configuration: precedence, deep merge, origins, and one specific message per mistake."""

from __future__ import annotations

import hashlib
import json
import subprocess
import textwrap
import tomllib
import urllib.request
from pathlib import Path

import pytest

from relayd.config import ConfigError, load_config
from relayd.plugins import Registry
from relayd.testing import BIN, free_port, start_relayd, write_config

REPO = Path(__file__).resolve().parents[1]
REGISTRY = Registry.discover()


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = textwrap.dedent(text).lstrip("\n")
    path.write_text(text)
    return text


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def load(path: Path, environ: dict[str, str] | None = None, overrides: list[str] | None = None):
    return load_config(path, registry=REGISTRY, environ=environ or {}, overrides=overrides or [])


# -- precedence and deep merge ---------------------------------------------------------------

def layered_config(tmp_path: Path, port: int) -> tuple[Path, dict[str, str]]:
    """One key per layer boundary; returns the directory and each file's text."""
    d = tmp_path / "etc"
    texts = {
        "relayd.yaml": write(d / "relayd.yaml", """
            logging:
              level: debug          # relayd.toml overrides
              format: json          # only here
              loggers:
                y: debug            # only here
            components:
              health:
                kind: status
                listener: web
        """),
        "relayd.toml": write(d / "relayd.toml", f"""
            drain_timeout = 3       # conf.d/20 and --set override
            [logging]
            level = "warning"
            [logging.loggers]
            t = "warning"
            c = "warning"
            [listeners.web]
            bind = "127.0.0.1:{port}"
            backlog = 16
        """),
        "conf.d/10-first.toml": write(d / "conf.d/10-first.toml", """
            [logging.loggers]
            c = "info"
            d = "info"
        """),
        "conf.d/20-second.toml": write(d / "conf.d/20-second.toml", """
            drain_timeout = 2
            [logging.loggers]
            c = "error"
            e = "error"
        """),
    }
    # Not configuration: only *.toml in conf.d counts.
    write(d / "conf.d/README", "drain_timeout = 99\n")
    write(d / "conf.d/30-off.toml.disabled", "drain_timeout = 99\n")
    return d, texts


ENV = {
    "RELAYD_LISTENERS__WEB__BACKLOG": "32",
    "RELAYD_LOGGING__LOGGERS__E": "critical",
    "RELAYD_LOGGING__LOGGERS__S": "info",
    "UNRELATED": "x",
}
SETS = ["logging.loggers.s=debug", "drain_timeout=1.5"]


def expected_origins(d: Path, texts: dict[str, str]) -> dict[str, tuple[object, str]]:
    def at(file: str, needle: str) -> str:
        return f"{d / file}:{line_of(texts[file], needle)}"

    return {
        "logging.level": ("warning", at("relayd.toml", 'level = "warning"')),
        "logging.format": ("json", at("relayd.yaml", "format: json")),
        "logging.loggers.y": ("debug", at("relayd.yaml", "y: debug")),
        "logging.loggers.t": ("warning", at("relayd.toml", 't = "warning"')),
        "logging.loggers.c": ("error", at("conf.d/20-second.toml", 'c = "error"')),
        "logging.loggers.d": ("info", at("conf.d/10-first.toml", 'd = "info"')),
        "logging.loggers.e": ("critical", "env:RELAYD_LOGGING__LOGGERS__E"),
        "logging.loggers.s": ("debug", "--set logging.loggers.s"),
        "listeners.web.backlog": (32, "env:RELAYD_LISTENERS__WEB__BACKLOG"),
        "listeners.web.bind": (None, at("relayd.toml", "bind = ")),
        "components.health.kind": ("status", at("relayd.yaml", "kind: status")),
        "components.health.listener": ("web", at("relayd.yaml", "listener: web")),
        "drain_timeout": (1.5, "--set drain_timeout"),
        "control.mode": ("0660", "default"),
    }


def test_precedence_and_deep_merge_across_all_sources(tmp_path):
    d, texts = layered_config(tmp_path, 9100)
    loaded = load(d, ENV, SETS)
    rows = {key: (value, origin) for key, value, origin in loaded.with_origins()}
    for key, (value, origin) in expected_origins(d, texts).items():
        assert rows[key][1] == origin, key
        if value is not None:
            assert rows[key][0] == value, key
    assert loaded.files == [d / "relayd.yaml", d / "relayd.toml", d / "conf.d/10-first.toml",
                            d / "conf.d/20-second.toml"]


def test_conf_d_order_is_lexical_not_numeric(tmp_path):
    write(tmp_path / "relayd.toml", "drain_timeout = 1\n")
    write(tmp_path / "conf.d/9-late.toml", "drain_timeout = 9\n")
    write(tmp_path / "conf.d/10-early.toml", "drain_timeout = 10\n")
    assert load(tmp_path).settings.drain_timeout == 9  # "10-early" < "9-late"


def test_tables_merge_across_files(tmp_path):
    write(tmp_path / "relayd.toml", '[scope_maps.m.servers]\n"a:1" = "scope-a"\n')
    write(tmp_path / "conf.d/10.toml", '[scope_maps.m.servers]\n"b:2" = "scope-b"\n')
    assert load(tmp_path).settings.scope_maps["m"].servers == {"a:1": "scope-a", "b:2": "scope-b"}


def test_lists_are_replaced_not_appended():
    from relayd.config.sources import Layers

    layers = Layers()
    layers.merge({"a": {"l": [1, 2], "k": 1}}, lambda p: "first")
    layers.merge({"a": {"l": [3]}}, lambda p: "second")
    assert layers.data == {"a": {"l": [3], "k": 1}}
    assert layers.origins[("a", "l")] == "second" and layers.origins[("a", "k")] == "first"


def test_env_can_create_a_whole_component_with_json(tmp_path):
    write(tmp_path / "relayd.toml", '[listeners.web]\nbind = "127.0.0.1:1"\n')
    env = {"RELAYD_COMPONENTS__HEALTH": '{"kind": "status", "listener": "web"}'}
    loaded = load(tmp_path, env)
    assert loaded.settings.components["health"].kind == "status"
    assert loaded.origins[("components", "health", "kind")] == "env:RELAYD_COMPONENTS__HEALTH"


def test_config_file_versus_directory(tmp_path):
    d, _ = layered_config(tmp_path, 9100)
    only_file = load(d / "relayd.toml")  # a file means that file alone: no yaml, no conf.d
    assert only_file.files == [d / "relayd.toml"]
    assert only_file.settings.drain_timeout == 3
    assert only_file.settings.components == {}
    with pytest.raises(ConfigError) as info:  # the YAML file alone lacks relayd.toml's listener
        load(d / "relayd.yaml")
    assert [str(p) for p in info.value.problems] == [
        f"{d / 'relayd.yaml'}:9: components.health.listener: refers to listeners.web, which is not "
        "defined (listeners: none defined)"
    ]


def test_relayctl_config_shows_each_value_with_its_origin(tmp_path):
    port = free_port()
    d, texts = layered_config(tmp_path, port)
    daemon = start_relayd(tmp_path, d, env=ENV, args=[arg for s in SETS for arg in ("--set", s)])
    try:
        result = daemon.ctl("config", "--origins")
        assert result.returncode == 0, result.stderr
        rows = {}
        for line in result.stdout.splitlines():
            head, _, origin = line.rpartition("    # ")
            key, _, value = head.partition(" = ")
            rows[key.strip()] = (json.loads(value), origin)
        for key, (value, origin) in expected_origins(d, texts).items():
            assert rows[key][1] == origin, key
            if value is not None:
                assert rows[key][0] == value, key

        # Plain `relayctl config` is TOML that reads back as the effective configuration.
        as_toml = daemon.ctl("config")
        as_json = json.loads(daemon.ctl("config", "--json").stdout)["config"]
        assert tomllib.loads(as_toml.stdout) == drop_nulls(as_json)
    finally:
        daemon.kill()


def drop_nulls(value):
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value if v is not None]
    return value


# -- every kind of mistake: its own message, exit 1 ------------------------------------------

def check(path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`relayd --check` as a real process: its exit status is what packaging scripts see."""
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
    full_env.update(env or {})
    return subprocess.run([str(BIN / "relayd"), "--check", "--config", str(path), *args],
                          capture_output=True, text=True, env=full_env, timeout=60)


@pytest.fixture
def check_here(monkeypatch, capsys):
    """`relayd --check` in this process (same code as the command, without the start-up cost)."""
    from relayd.cli.daemon import main

    for name in [n for n in __import__("os").environ if n.startswith("RELAYD_")]:
        monkeypatch.delenv(name)

    def run(path: Path, *args: str) -> subprocess.CompletedProcess:
        code = main(["--check", "--config", str(path), *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["relayd"], code, out, err)

    return run


STATUS = """[listeners.web]
bind = "127.0.0.1:9100"
[components.health]
kind = "status"
listener = "web"
"""

BAD = {
    "toml-syntax": (
        "relayd.toml", "[listeners.web\nbind = 1\n",
        "relayd.toml:1: TOML syntax error: Expected ']' at the end of a table declaration (column 15)"),
    "toml-syntax-in-conf.d": (
        "conf.d/50-x.toml", "drain_timeout = = 3\n",
        "conf.d/50-x.toml:1: TOML syntax error: Invalid value (column 17)"),
    "yaml-syntax": (
        "relayd.yaml", "listeners:\n  web:\n    bind: x\n   bad: [\n",
        "relayd.yaml:4: YAML syntax error: expected <block end>, but found '<block mapping start>'"),
    "unknown-key": (
        "relayd.toml", STATUS.replace("bind =", "bnd ="),
        "relayd.toml:2: listeners.web.bnd: unknown key (did you mean 'bind'?)"),
    "unknown-key-in-component": (
        "relayd.toml", STATUS + 'listner = "web"\n',
        "relayd.toml:6: components.health.listner: unknown key (did you mean 'listener'?)"),
    "unknown-top-level-key": (
        "relayd.toml", "drain_timout = 3\n" + STATUS,
        "relayd.toml:1: drain_timout: unknown key (did you mean 'drain_timeout'?)"),
    "unknown-key-far-from-any": (
        "relayd.toml", "[logging]\nzzz = 1\n",
        "relayd.toml:2: logging.zzz: unknown key (expected one of: format, level, loggers)"),
    "wrong-type": (
        "relayd.toml", STATUS.replace('bind = "127.0.0.1:9100"', 'bind = "127.0.0.1:9100"\nbacklog = "many"'),
        "relayd.toml:3: listeners.web.backlog: Input should be a valid integer, unable to parse string "
        "as an integer (got 'many')"),
    "wrong-duration": (
        "relayd.toml", 'drain_timeout = "soon"\n',
        "relayd.toml:1: drain_timeout: expected seconds as a number, or a string like '500ms', '30s', "
        "'5m', '1h' (got 'soon')"),
    "wrong-choice": (
        "relayd.toml", '[logging]\nlevel = "verbose"\n',
        "relayd.toml:2: logging.level: Input should be 'debug', 'info', 'warning', 'error' or 'critical' "
        "(got 'verbose')"),
    "dangling-listener": (
        "relayd.toml", STATUS.replace('listener = "web"', 'listener = "api"'),
        "relayd.toml:5: components.health.listener: refers to listeners.api, which is not defined "
        "(listeners: web)"),
    "dangling-auth": (
        "relayd.toml", STATUS + 'auth = "globus"\n',
        "relayd.toml:6: components.health.auth: refers to auth.globus, which is not defined "
        "(auth: none defined)"),
    "unknown-kind": (
        "relayd.toml", STATUS.replace('kind = "status"', 'kind = "stauts"'),
        "relayd.toml:4: components.health.kind: no relayd.components plugin named 'stauts' is installed "
        "(installed: "),
    "unknown-auth-method": (
        "relayd.toml", '[auth.a]\nmethod = "kerberos"\n',
        "relayd.toml:2: auth.a.method: no relayd.auth plugin named 'kerberos' is installed (installed: "),
    "missing-kind": (
        "relayd.toml", STATUS.replace('kind = "status"\n', ""),
        "relayd.toml:3: components.health.kind: missing 'kind' (one of: "),
    "missing-required-key": (
        "relayd.toml", STATUS.replace('listener = "web"\n', ""),
        "relayd.toml:3: components.health.listener: missing required key"),
    "listener-without-bind-or-fd-name": (
        "relayd.toml", "[listeners.web]\nbacklog = 5\n",
        "relayd.toml:1: listeners.web: a listener needs 'bind' or 'fd_name' (or both)"),
    "bad-bind": (
        "relayd.toml", '[listeners.web]\nbind = "localhost"\n',
        "relayd.toml:2: listeners.web.bind: expected 'HOST:PORT', '[IPV6]:PORT', 'PORT' or 'unix:PATH' "
        "(got 'localhost')"),
    "upper-case-name": (
        "relayd.toml", STATUS.replace("components.health", "components.Health"),
        "relayd.toml:3: components.Health: invalid name 'Health': names are lower-case letters, digits, "
        "'_' and '-', starting with a letter"),
    "not-a-config-file": (
        "relayd.conf", "x = 1\n", None),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_its_specific_message_and_exit_1(tmp_path, case, check_here):
    name, text, expected = BAD[case]
    target = tmp_path / "etc"
    write(target / name, text)
    config = target / name if case == "not-a-config-file" else target
    # Real processes for a few cases, the rest in-process to keep the suite quick.
    result = check(config) if case in ("toml-syntax", "unknown-kind", "yaml-syntax") else check_here(config)
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1] == f"relayd: configuration {config} is invalid"
    if expected is None:
        assert lines[0] == f"relayd: {config}: expected a .toml, .yaml or .yml file"
    else:
        assert lines[0].startswith(f"relayd: {target}/{expected}"), lines[0]


def test_missing_config_path(tmp_path):
    result = check(tmp_path / "nowhere")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"relayd: {tmp_path / 'nowhere'}: configuration path does not exist"


def test_every_problem_is_reported_at_once(tmp_path):
    write(tmp_path / "relayd.toml", STATUS.replace("bind =", "bnd =") + 'auth = "x"\n')
    write(tmp_path / "conf.d/10.toml", "[logging]\nlevle = 'info'\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert [str(p) for p in info.value.problems] == [
        f"{tmp_path / 'relayd.toml'}:2: listeners.web.bnd: unknown key (did you mean 'bind'?)",
        f"{tmp_path / 'conf.d/10.toml'}:2: logging.levle: unknown key (did you mean 'level'?)",
    ]


def test_bad_environment_variable_is_named(tmp_path):
    write(tmp_path / "relayd.toml", STATUS)
    result = check(tmp_path, env={"RELAYD_LISTENERS__WEB__BACKLOG": "lots"})
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        "relayd: env:RELAYD_LISTENERS__WEB__BACKLOG: listeners.web.backlog: Input should be a valid "
        "integer, unable to parse string as an integer (got 'lots')")


def test_bad_set_is_named(tmp_path):
    write(tmp_path / "relayd.toml", STATUS)
    result = check(tmp_path, "--set", "listeners.web.backlog=-1")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        "relayd: --set listeners.web.backlog: listeners.web.backlog: Input should be greater than or "
        "equal to 1 (got -1)")
    result = check(tmp_path, "--set", "drain_timeout")
    assert result.stderr.splitlines()[0] == "relayd: --set drain_timeout: expected KEY.PATH=VALUE"


def test_check_accepts_the_shipped_example():
    result = check(REPO / "etc" / "relayd")
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout


def test_check_accepts_valid_layers(tmp_path):
    d, _ = layered_config(tmp_path, 9100)
    result = check(d, *[arg for s in SETS for arg in ("--set", s)], env=ENV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"relayd: configuration {d} is valid: 4 file(s), 1 listener(s), 0 auth method(s), 1 component(s)")


# -- secrets ---------------------------------------------------------------------------------

SECRETS = ["cred-token-SECRET", "inline-api-key-SECRET", "set-token-SECRET", "env-token-SECRET"]


def test_secrets_come_from_credentials_and_are_never_shown(relayd, plugin_site, tmp_path, port):
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "relayd-token").write_text("cred-token-SECRET\n")  # systemd keeps the newline
    daemon = relayd(f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [auth.tokens]
        method = "token"
        token = "credential:relayd-token"
        [auth.fromset]
        method = "token"
        [auth.fromenv]
        method = "token"
        [components.greeter]
        kind = "echo"
        listener = "web"
        api_key = "inline-api-key-SECRET"
        auth = "tokens"
    """, env={"PYTHONPATH": str(plugin_site), "CREDENTIALS_DIRECTORY": str(creds),
              "RELAYD_AUTH__FROMENV__TOKEN": "env-token-SECRET"},
        args=["--set", "auth.fromset.token=set-token-SECRET"])
    request = urllib.request.Request(f"http://127.0.0.1:{port}/secret",
                                     headers={"Authorization": "Bearer cred-token-SECRET"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.read().decode() == hashlib.sha256(b"inline-api-key-SECRET").hexdigest()

    outputs = {
        args: daemon.ctl(*args)
        for args in [("config",), ("config", "--origins"), ("config", "--json"), ("status", "--json"),
                     ("config", "--origins", "--json")]
    }
    for args, result in outputs.items():
        assert result.returncode == 0, (args, result.stderr)
        for secret in SECRETS:
            assert secret not in result.stdout, (args, secret)
    assert 'token = "**********"' in outputs[("config",)].stdout
    origins = outputs[("config", "--origins")].stdout
    assert any(line.startswith("auth.fromset.token") and line.endswith("# --set auth.fromset.token")
               for line in origins.splitlines())
    assert any(line.startswith("auth.fromenv.token") and line.endswith("# env:RELAYD_AUTH__FROMENV__TOKEN")
               for line in origins.splitlines())
    daemon.process.send_signal(1)  # a reload must not print them either
    daemon.manager.wait_for("READY", "1")
    daemon.stop()
    for secret in SECRETS:
        assert secret not in daemon.log


def test_missing_credential_is_a_clear_error(tmp_path, plugin_site):
    config = write_config(tmp_path / "etc", """
        [auth.tokens]
        method = "token"
        token = "credential:relayd-token"
    """)
    import os

    env = {"PYTHONPATH": str(plugin_site)}
    result = check(config, env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        f"relayd: {config / 'relayd.toml'}:4: auth.tokens.token: 'credential:relayd-token' needs "
        "$CREDENTIALS_DIRECTORY (set by systemd's LoadCredential=)")
    env["CREDENTIALS_DIRECTORY"] = str(tmp_path)
    result = check(config, env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        f"relayd: {config / 'relayd.toml'}:4: auth.tokens.token: cannot read secret file "
        f"{tmp_path / 'relayd-token'}: No such file or directory")
    assert os.path.exists(config)


def test_wrong_typed_secret_does_not_echo_the_value(tmp_path, plugin_site):
    config = write_config(tmp_path / "etc", """
        [auth.tokens]
        method = "token"
        token = 123456789
    """)
    result = check(config, env={"PYTHONPATH": str(plugin_site)})
    assert result.returncode == 1
    assert "auth.tokens.token" in result.stderr
    assert "123456789" not in result.stderr


def test_wrong_typed_secret_is_hidden_whatever_its_name(tmp_path, plugin_site):
    """Not just names with 'secret', 'token'...: any field typed Secret (here 'passphrase')."""
    config = write_config(tmp_path / "etc", f"""
        [listeners.web]
        bind = "127.0.0.1:{free_port()}"
        [components.echo]
        kind = "echo"
        listener = "web"
        passphrase = 987654321
    """)
    result = check(config, env={"PYTHONPATH": str(plugin_site)})
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        f"relayd: {config / 'relayd.toml'}:7: components.echo.passphrase: Input should be a valid string")
    assert "987654321" not in result.stderr


def test_check_loads_tls_certificates(tmp_path, check_here):
    write(tmp_path / "relayd.toml", f"""
        [listeners.web]
        bind = "127.0.0.1:9100"
        [listeners.web.tls]
        cert = "{tmp_path / 'nope.pem'}"
        key = "{tmp_path / 'nope.pem'}"
    """)
    result = check_here(tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        f"relayd: {tmp_path / 'relayd.toml'}:3: listeners.web.tls: cannot load TLS certificate/key: "
        "[Errno 2] No such file or directory")


def test_a_directory_without_configuration_is_an_error(tmp_path, check_here):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "README").write_text("not configuration\n")
    result = check_here(tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        f"relayd: {tmp_path}: no relayd.toml, relayd.yaml or conf.d/*.toml here")
    (tmp_path / "conf.d" / "10-only.toml").write_text("drain_timeout = 1\n")
    assert check_here(tmp_path).returncode == 0  # conf.d alone is a configuration


def test_port_out_of_range(tmp_path, check_here):
    write(tmp_path / "relayd.toml", '[listeners.web]\nbind = "127.0.0.1:70000"\n')
    result = check_here(tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == (
        f"relayd: {tmp_path / 'relayd.toml'}:2: listeners.web.bind: the port must be between 0 and 65535 "
        "(got '127.0.0.1:70000')")


def test_origins_quote_keys_with_dots(tmp_path):
    text = write(tmp_path / "relayd.toml", '[logging.loggers]\n"relayd.relay" = "debug"\n')
    rows = {key: origin for key, _, origin in load(tmp_path).with_origins()}
    assert rows['logging.loggers."relayd.relay"'] == f"{tmp_path / 'relayd.toml'}:{line_of(text, 'relayd.relay')}"


def test_relayctl_config_toml_round_trips_the_shipped_example():
    """Every component's config shape (lists, inline tables...) prints as TOML that reads back."""
    from relayd.cli.ctl import _to_toml

    effective = load(REPO / "etc" / "relayd").effective()
    assert tomllib.loads(_to_toml(effective)) == drop_nulls(effective)


def test_relayctl_config_toml_escapes_what_json_would_get_wrong():
    from relayd.cli.ctl import _to_toml

    data = {
        "text": 'quote " backslash \\ newline \n tab \t bell \x07 é 😀',
        "huge": float("inf"),
        "items": [1, "two", {"k": "v", "gone": None}],
        "empty": {},
        "nested": {"deeper": {}, "x": 1},
        "dotted.key": {"ünïcode": True},
        "nothing": None,
    }
    assert tomllib.loads(_to_toml(data)) == drop_nulls(data)


def test_relayctl_with_an_unreadable_config_is_a_clear_error(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
    result = subprocess.run([str(BIN / "relayctl"), "--config", str(tmp_path / "nowhere"), "status"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr == (f"relayctl: cannot find the control socket from --config:\n"
                             f"  {tmp_path / 'nowhere'}: configuration path does not exist\n")
