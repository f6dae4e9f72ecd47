"""Test helpers for relayd and its plugins: a fake service manager and a daemon runner.

Shipped in the package (as mitmproxy ships its addon test context) so that third-party
plugin authors can start a real relayd around their component in their own tests.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Notification:
    fields: dict[str, str]
    pid: int | None  # from SCM_CREDENTIALS, as systemd attributes messages


class FakeServiceManager:
    """The receiving end of $NOTIFY_SOCKET, checking senders like systemd does."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.received: list[Notification] = []

    def receive(self, timeout: float) -> Notification | None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
        fields = dict(line.split("=", 1) for line in data.decode("utf-8").splitlines() if "=" in line)
        note = Notification(fields, pid)
        self.received.append(note)
        return note

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20.0) -> Notification:
        """Next notification carrying KEY (=VALUE); earlier ones are kept in `received`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            note = self.receive(left)
            if note and key in note.fields and (value is None or note.fields[key] == value):
                return note
        raise TimeoutError(f"no {key}{'=' + value if value else ''} notification within {timeout}s")

    def close(self) -> None:
        self.sock.close()


@dataclass
class RelaydProcess:
    """A relayd subprocess on a config directory, with a fake service manager."""

    config_dir: Path
    control_socket: str
    manager: FakeServiceManager
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ctl(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "relayctl"), "--socket", self.control_socket, *args],
            capture_output=True, text=True, input=input, timeout=timeout, env=self.env,
        )

    def reload_signal(self) -> None:
        self.process.send_signal(1)  # SIGHUP

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        finally:
            self.manager.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.manager.close()


def write_config(directory: Path, main: str, fragments: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "relayd.toml").write_text(textwrap.dedent(main))
    if fragments:
        (directory / "conf.d").mkdir(exist_ok=True)
        for name, text in fragments.items():
            (directory / "conf.d" / name).write_text(textwrap.dedent(text))
    return directory


def start_relayd(
    tmp_path: Path,
    config_dir: Path,
    *,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    wrapper: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
    ready_timeout: float = 30.0,
    wait_ready: bool = True,
) -> RelaydProcess:
    """Start relayd with NOTIFY_SOCKET pointing at a fake manager; wait for READY=1.

    The control socket, state directory and log file live under tmp_path unless the
    config says otherwise; pass `wrapper` (e.g. systemd-socket-activate ...) to run
    relayd under an activator.
    """
    manager = FakeServiceManager(tmp_path)
    control = str(tmp_path / "control.sock")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAYD_", "LISTEN_", "NOTIFY_"))}
    full_env.update({
        "NOTIFY_SOCKET": manager.path,
        "RELAYD_CONTROL__SOCKET": control,
        "RELAYD_STATE_DIR": str(tmp_path / "state"),
        "PYTHONUNBUFFERED": "1",
    })
    full_env.update(env or {})
    log_path = tmp_path / "relayd.log"
    log_file = open(log_path, "ab")
    command = [*wrapper, str(BIN / "relayd"), "--config", str(config_dir), *args]
    process = subprocess.Popen(command, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                               pass_fds=tuple(pass_fds))
    log_file.close()
    daemon = RelaydProcess(config_dir, control, manager, process, log_path, full_env)
    if wait_ready:
        try:
            manager.wait_for("READY", "1", timeout=ready_timeout)
        except TimeoutError:
            daemon.kill()
            raise AssertionError(f"relayd did not become ready; log:\n{daemon.log}") from None
    return daemon


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
