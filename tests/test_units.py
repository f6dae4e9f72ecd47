"""The systemd units in systemd/: systemd-analyze accepts them silently, they are hardened,
and they agree with relayd's defaults and the example configuration."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

import pytest

from relayd.cli.ctl import DEFAULT_SOCKET
from relayd.config.model import ControlConfig, CoreSettings

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
UNIT_FILES = ["relayd.service", "relayd.socket", "relayd-control.socket"]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def settings(unit: str) -> dict[str, list[str]]:
    """Every Key=value of a unit file (keys may repeat), ignoring sections and comments."""
    values: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


@pytest.fixture
def stubbed_units(tmp_path: Path) -> Path:
    """The units copied to tmp_path with ExecStart=/ExecReload= pointing at stub executables
    (verify fails when the binaries don't exist; --root= would need a whole OS tree)."""
    for name in ("relayd", "relayctl"):
        stub = tmp_path / "bin" / name
        stub.parent.mkdir(exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    for unit in UNIT_FILES:
        text = (UNITS / unit).read_text()
        text = re.sub(r"/usr/bin/(relayd|relayctl)\b", lambda m: f"{tmp_path}/bin/{m[1]}", text)
        (tmp_path / unit).write_text(text)
    return tmp_path


@needs_analyze
def test_verify_prints_nothing(stubbed_units: Path) -> None:
    # verify exits 0 on unknown keys and unparsable values, only warning on stderr: so the
    # test insists on empty output, not just the exit status.
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", *UNIT_FILES],
        cwd=stubbed_units, capture_output=True, text=True, timeout=60,
    )
    assert result.stderr == "", result.stderr
    assert result.returncode == 0, result.stdout


@needs_analyze
def test_verify_would_catch_a_typo(stubbed_units: Path) -> None:
    # Guards the test above: a misspelt key must produce output that it would reject.
    service = stubbed_units / "relayd.service"
    service.write_text(service.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", "relayd.service"],
        cwd=stubbed_units, capture_output=True, text=True, timeout=60,
    )
    assert "NoNewPrivilege" in result.stderr


@needs_analyze
def test_security_exposure_at_most_2(stubbed_units: Path) -> None:
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--threshold=20", "--no-pager", "relayd.service"],
        cwd=stubbed_units, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for relayd\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    assert float(match[1]) <= 2.0, result.stdout


def test_service_shape() -> None:
    service = settings("relayd.service")
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == ["/usr/bin/relayd"]
    # "+": relayctl must reach the root-owned 0660 control socket, which the dynamic user can't.
    assert service["ExecReload"] == ["+/usr/bin/relayctl reload"]
    assert service["DynamicUser"] == ["yes"]
    assert service["CapabilityBoundingSet"] == [""]
    assert service["ConfigurationDirectory"] == ["relayd"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["PrivateMounts"] == ["yes"]
    for key in ("StateDirectory", "LogsDirectory", "RuntimeDirectory", "WatchdogSec",
                "SystemCallFilter", "RestrictAddressFamilies"):
        assert key in service, key
    # LoadCredential= is an example only (a missing credential file would fail the start),
    # commented out on its own line: a trailing comment would become part of the value.
    assert "LoadCredential" not in service
    assert re.search(r"^#LoadCredential=\w+:/etc/relayd/", (UNITS / "relayd.service").read_text(), re.M)


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_stop_timeout_outlasts_drain() -> None:
    service = settings("relayd.service")
    drain = CoreSettings.model_fields["drain_timeout"].default
    assert _seconds(service["TimeoutStopSec"][0]) > drain + 5


def test_file_limit_leaves_every_listener_of_the_example_room() -> None:
    from relayd.accept_gate import plan_limits

    (nofile,) = settings("relayd.service")["LimitNOFILE"]
    assert re.fullmatch(r"\d+", nofile), "one number: soft and hard limit alike"
    config = tomllib.loads((ROOT / "etc/relayd/relayd.toml").read_text())
    plan = plan_limits({name: l.get("max_connections") for name, l in config["listeners"].items()}, int(nofile))
    assert plan.warning() is None
    assert min(plan.limits.values()) >= 4096, plan.limits


def test_control_socket_agrees_with_defaults() -> None:
    control = settings("relayd-control.socket")
    assert control["ListenStream"] == [DEFAULT_SOCKET]
    assert ControlConfig().socket == DEFAULT_SOCKET
    assert control["FileDescriptorName"] == [ControlConfig().fd_name]
    assert control["SocketMode"] == ["0660"]
    # Outside RuntimeDirectory=, which systemd removes (with the socket node) on every stop.
    runtime = PurePosixPath("/run") / settings("relayd.service")["RuntimeDirectory"][0]
    assert not PurePosixPath(DEFAULT_SOCKET).is_relative_to(runtime)
    assert "relayd-control.socket" in settings("relayd.service")["Requires"][0].split()


def test_listener_socket_names_match_example_config() -> None:
    names = set(settings("relayd.socket")["FileDescriptorName"])
    config = tomllib.loads((ROOT / "etc/relayd/relayd.toml").read_text())
    fd_names = {listener.get("fd_name") for listener in config["listeners"].values()}
    assert names and names <= fd_names, (names, fd_names)
    # The bind fallback (relayd run by hand) is the address the socket unit listens on.
    binds = {listener["fd_name"]: listener.get("bind") for listener in config["listeners"].values()
             if listener.get("fd_name")}
    socket = settings("relayd.socket")
    assert list(zip(socket["FileDescriptorName"], socket["ListenStream"])) == [
        (name, binds[name]) for name in socket["FileDescriptorName"]]


# -- MemoryDenyWriteExecute=yes ------------------------------------------------------------
# systemd implements it with a seccomp filter; Linux >= 6.3 offers the same rule as
# prctl(PR_SET_MDWE), inherited across fork and execve. Running relayd under it shows that
# nothing it loads (uvloop, aiohttp, argon2-cffi, pydantic-core...) needs writable+executable
# memory, so the unit's MemoryDenyWriteExecute=yes cannot break it.

_MDWE_WRAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(f"prctl(PR_SET_MDWE): {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def _mdwe_supported() -> bool:
    probe = subprocess.run([sys.executable, "-c", _MDWE_WRAPPER, sys.executable, "-c", """
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    raise SystemExit(0)
raise SystemExit(1)
"""], capture_output=True, timeout=30)
    return probe.returncode == 0


def test_relayd_serves_under_memory_deny_write_execute(tmp_path: Path, relayd) -> None:
    if not _mdwe_supported():
        pytest.skip("this kernel has no prctl(PR_SET_MDWE) (Linux < 6.3)")
    from relayd.auth.users import UserStore
    from relayd.testing import free_port

    users_db = tmp_path / "users.sqlite3"
    UserStore(users_db).add("alice", "correct horse")
    port = free_port()
    daemon = relayd(
        f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [auth.users]
        method = "basic"
        users_db = "{users_db}"
        [components.health]
        kind = "status"
        listener = "web"
        auth = "users"
        """,
        wrapper=[sys.executable, "-c", _MDWE_WRAPPER],
    )

    def get(password: str) -> int:
        token = base64.b64encode(f"alice:{password}".encode()).decode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                         headers={"Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert get("correct horse") == 200  # argon2 verification inside relayd
    assert get("wrong") == 401
    assert daemon.ctl("reload").returncode == 0
    assert daemon.stop() == 0
