"""The systemd units in systemd/: systemd-analyze accepts them silently, they are hardened,
and they agree with relayd's defaults and the example configuration."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
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
