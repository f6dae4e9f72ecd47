"""conf.d overrides: `relayd --check` and `relayctl config` warn when a later file overrides a
value an earlier conf.d file set; `relayctl import proxystore-relay -o` renames or refuses
rather than write a fragment the shipped 60-relay.toml would silently override."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

from relayd.testing import BIN, free_port, start_relayd

SHIPPED = Path(__file__).resolve().parent.parent / "etc" / "relayd"


def check(etc: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "relayd"), "--check", "--config", str(etc)], capture_output=True,
                          text=True, timeout=60, check=False)


def run_import(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "relayctl"), "--socket", "/nonexistent/control.sock", "import",
                           "proxystore-relay", *args], capture_output=True, text=True, timeout=60, check=False)


def shipped_etc(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True)
    shutil.copy(SHIPPED / "relayd.toml", etc / "relayd.toml")
    shutil.copy(SHIPPED / "conf.d" / "60-relay.toml", etc / "conf.d" / "60-relay.toml")
    return etc


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(text))


IMPORTED = """
[listeners.relay]
bind = "0.0.0.0:8800"
[auth.relay_open]
method = "none"
[components.relay]
kind = "relay"
listener = "relay"
auth = "relay_open"
"""


def test_check_warns_when_a_later_conf_d_file_overrides_an_earlier_one(tmp_path):
    etc = shipped_etc(tmp_path)
    ours, shipped = etc / "conf.d" / "50-relay.toml", etc / "conf.d" / "60-relay.toml"
    ours.write_text(IMPORTED)  # what README's import command wrote before it checked for clashes
    result = check(etc)
    assert result.returncode == 0, result.stderr
    warnings = [l for l in result.stderr.splitlines() if l.startswith("relayd: warning: ")]
    assert f"relayd: warning: {shipped}:{line_of(shipped, 'bind = ')}: listeners.relay.bind overrides the value " \
           f"{ours}:{line_of(ours, 'bind = ')} set; the later file wins" in result.stderr, result.stderr
    assert any(f"components.relay.auth overrides the value {ours}:{line_of(ours, 'auth = ')} set" in w
               for w in warnings), warnings
    assert len(warnings) == 2, warnings  # kind and listener are the same values: no warning


def test_no_warning_for_conf_d_over_relayd_toml_or_for_equal_values(tmp_path):
    etc = shipped_etc(tmp_path)
    assert "[logging]" in (etc / "relayd.toml").read_text()  # conf.d overrides its level below
    (etc / "conf.d" / "90-debug.toml").write_text('[logging]\nlevel = "debug"\n')  # the purpose of conf.d
    (etc / "conf.d" / "95-same.toml").write_text('[logging]\nlevel = "debug"\n')  # same value again
    result = check(etc)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr


def test_relayctl_config_warns_too(tmp_path):
    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True)
    (etc / "relayd.toml").write_text('[auth.open]\nmethod = "none"\n')
    first, second = free_port(), free_port()
    (etc / "conf.d" / "50-a.toml").write_text(
        f'[listeners.web]\nbind = "127.0.0.1:{first}"\n[components.health]\nkind = "status"\nlistener = "web"\n')
    (etc / "conf.d" / "60-b.toml").write_text(f'[listeners.web]\nbind = "127.0.0.1:{second}"\n')
    daemon = start_relayd(tmp_path, etc)
    try:
        result = daemon.ctl("config")
        assert result.returncode == 0, result.stderr
        assert re.search(r"relayctl: warning: \S+/conf\.d/60-b\.toml:2: listeners\.web\.bind overrides the "
                         r"value \S+/conf\.d/50-a\.toml:2 set", result.stderr), result.stderr
        assert f'bind = "127.0.0.1:{second}"' in result.stdout
        assert re.search(r"WARNING relayd: configuration: \S+/conf\.d/60-b\.toml:2: listeners\.web\.bind "
                         r"overrides the value \S+/conf\.d/50-a\.toml:2 set", daemon.log), daemon.log
    finally:
        daemon.kill()


def test_import_next_to_the_shipped_fragment_renames_and_is_not_overridden(tmp_path):
    etc = shipped_etc(tmp_path)
    src = tmp_path / "relay.toml"
    src.write_text('host = "0.0.0.0"\nport = 8800\n')
    out = etc / "conf.d" / "50-relay.toml"
    result = run_import(str(src), "-o", str(out))  # exactly as README shows
    assert result.returncode == 0, result.stderr
    shipped = etc / "conf.d" / "60-relay.toml"
    assert f"{shipped} already defines [listeners.relay], [components.relay]: naming the imported relay " \
           "'proxystore-relay' instead of 'relay'" in result.stderr, result.stderr
    data = tomllib.loads(out.read_text())
    assert data["listeners"]["proxystore-relay"]["bind"] == "0.0.0.0:8800"
    assert data["components"]["proxystore-relay"]["listener"] == "proxystore-relay"
    checked = check(etc)
    assert checked.returncode == 0 and "warning" not in checked.stderr, checked.stderr


def test_import_with_a_clashing_name_is_refused_and_a_shared_bind_is_named(tmp_path):
    etc = shipped_etc(tmp_path)
    src = tmp_path / "relay.toml"
    src.write_text('host = "127.0.0.1"\nport = 8700\n')  # the shipped fragment's address too
    out = etc / "conf.d" / "50-relay.toml"
    refused = run_import(str(src), "--name", "relay", "-o", str(out))
    assert refused.returncode == 1 and not out.exists()
    assert "already defines [listeners.relay], [components.relay]" in refused.stderr
    assert "choose another --name" in refused.stderr
    result = run_import(str(src), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert f"warning: {etc / 'conf.d' / '60-relay.toml'} also binds 127.0.0.1:8700" in result.stderr
    # no clash with files elsewhere: the plain name
    other = tmp_path / "other"
    other.mkdir()
    plain = run_import(str(src), "-o", str(other / "50-relay.toml"))
    assert plain.returncode == 0 and "naming" not in plain.stderr
    assert "relay" in tomllib.loads((other / "50-relay.toml").read_text())["components"]
