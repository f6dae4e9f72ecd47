"""Test helpers for relayd and its plugins: a fake service manager and a daemon runner.

Shipped in the package (as mitmproxy ships its addon test context) so that third-party
plugin authors can start a real relayd around their component in their own tests:

* :class:`FakeServiceManager`: the $NOTIFY_SOCKET end (path or ``@abstract``), reading
  sender pids from SCM_CREDENTIALS as systemd does;
* :func:`start_relayd`: a relayd subprocess on a config directory, ready when READY=1
  arrives; ``activate=`` passes sockets made by the test (:func:`listening_socket`) through
  :func:`activator_command`, ``systemd_activate=`` runs it under ``systemd-socket-activate``;
* :func:`write_config`, :func:`free_port`.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _unused(path: Path) -> Path:
    """`path`, or path-1, path-2... if taken: several daemons may run in one test directory."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def listening_socket(address: str | Path = "127.0.0.1:0", backlog: int = 128) -> socket.socket:
    """A listening socket for a test to pass by socket activation: "HOST:PORT" or a unix path."""
    if isinstance(address, Path) or address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(address))
    else:
        host, _, port = str(address).rpartition(":")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), int(port)))
    sock.listen(backlog)
    return sock


# Runs between fork and exec of relayd, like PID 1 does: the passed fds are moved to 3, 4, ...
# and LISTEN_PID is set to the pid that will exec relayd (os.execvp keeps the pid).
_ACTIVATOR_SHIM = r"""
import fcntl, os, sys
names, fds, command = sys.argv[1], [int(f) for f in sys.argv[2].split(",") if f], sys.argv[4:]
# Move the fds above the target range first, so that no dup2 onto 3.. clobbers one not yet moved.
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)  # inheritable
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names)
os.execvp(command[0], command)
"""


def activator_command(fds: Sequence[int], names: Sequence[str]) -> list[str]:
    """A command prefix that passes `fds` to the command after it as LISTEN_FDS, named `names`.

    The Python twin of ``systemd-socket-activate`` for sockets the test already made (so
    ephemeral ports work); run the result with ``subprocess.Popen(..., pass_fds=fds)``.
    """
    if len(fds) != len(names):
        raise ValueError("one name per fd")
    return [sys.executable, "-c", _ACTIVATOR_SHIM, ":".join(names), ",".join(map(str, fds)), "--"]


# Variables systemd-socket-activate must forward (it passes only a few by default).
_FORWARD = ("RELAYD_", "NOTIFY_SOCKET", "WATCHDOG_", "PYTHON", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")


def systemd_socket_activate_command(listen: Sequence[tuple[str, str]], env: dict[str, str]) -> list[str]:
    """``systemd-socket-activate`` prefix for (address, fd name) pairs, forwarding `env`."""
    command = ["systemd-socket-activate"]
    for address, name in listen:
        command += ["-l", address, f"--fdname={name}"]
    for key in sorted(env):
        if key.startswith(_FORWARD):
            command += ["-E", key]
    return command


def trigger_lazy_activation(address: str, deadline: float) -> None:
    """systemd-socket-activate execs its child on the first connection: make one."""
    while True:
        try:
            if address.startswith("/"):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(address)
            else:
                host, _, port = address.rpartition(":")
                socket.create_connection((host, int(port)), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            select.select([], [], [], 0.02)  # poll: the activator has not bound yet


@dataclass
class Notification:
    fields: dict[str, str]
    pid: int | None  # from SCM_CREDENTIALS, as systemd attributes messages


class FakeServiceManager:
    """The receiving end of $NOTIFY_SOCKET, checking senders like systemd does.

    ``address`` is what to export as NOTIFY_SOCKET: a path under `directory`, or with
    ``abstract=True`` an ``@name`` in the abstract namespace (as systemd itself uses).
    """

    def __init__(self, directory: Path, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            name = f"relayd-test-{os.getpid()}-{secrets.token_hex(6)}"
            self.sock.bind("\0" + name)
            self.path = "@" + name
        else:
            self.path = str(_unused(directory / "notify.sock"))
            self.sock.bind(self.path)
        self.received: list[Notification] = []

    @property
    def address(self) -> str:
        return self.path

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

    def drain(self) -> list[Notification]:
        """Read what has already arrived, so that the next wait_for sees only what follows."""
        notes = []
        while note := self.receive(0):
            notes.append(note)
        return notes

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
    activate: Mapping[str, Sequence[socket.socket]] | None = None,
    systemd_activate: Sequence[tuple[str, str]] = (),
    abstract_notify: bool = False,
    control_socket: str | None = None,
) -> RelaydProcess:
    """Start relayd with NOTIFY_SOCKET pointing at a fake manager; wait for READY=1.

    The control socket, state directory and log file live under tmp_path unless the
    config says otherwise. Socket activation, for listeners with ``fd_name``:

    * ``activate={"web": [sock], ...}`` passes sockets the test made (any port) through
      :func:`activator_command`;
    * ``systemd_activate=[("127.0.0.1:PORT", "web"), ...]`` runs relayd under the real
      ``systemd-socket-activate`` and makes the first connection that makes it exec relayd.

    Or pass any `wrapper` command prefix yourself.
    """
    manager = FakeServiceManager(tmp_path, abstract=abstract_notify)
    control = control_socket or str(_unused(tmp_path / "control.sock"))
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("RELAYD_", "LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    full_env.update({
        "NOTIFY_SOCKET": manager.address,
        "RELAYD_CONTROL__SOCKET": control,
        "RELAYD_STATE_DIR": str(tmp_path / "state"),
        "PYTHONUNBUFFERED": "1",
    })
    full_env.update(env or {})
    wrapper = list(wrapper)
    pass_fds = list(pass_fds)
    if activate:
        names = [name for name, socks in activate.items() for _ in socks]
        fds = [sock.fileno() for socks in activate.values() for sock in socks]
        wrapper = activator_command(fds, names) + wrapper
        pass_fds += fds
    if systemd_activate:
        wrapper = systemd_socket_activate_command(systemd_activate, full_env) + wrapper
    log_path = _unused(tmp_path / "relayd.log")
    command = [*wrapper, str(BIN / "relayd"), "--config", str(config_dir), *args]
    with open(log_path, "ab") as log_file:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
                                   pass_fds=tuple(pass_fds))
    daemon = RelaydProcess(config_dir, control, manager, process, log_path, full_env)
    if systemd_activate:
        trigger_lazy_activation(systemd_activate[0][0], time.monotonic() + ready_timeout)
    if wait_ready:
        deadline = time.monotonic() + ready_timeout
        # Short waits so that a relayd that exited (bad config) fails the test at once.
        while process.poll() is None and time.monotonic() < deadline:
            try:
                manager.wait_for("READY", "1", timeout=0.25)
                return daemon
            except TimeoutError:
                pass
        daemon.kill()
        raise AssertionError(f"relayd did not become ready (exit status {process.returncode}); "
                             f"log:\n{daemon.log}")
    return daemon


def get_text(url: str) -> tuple[int, str]:
    """(status, body) of a GET that must succeed."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - test helper, loopback URLs
        return response.status, response.read().decode()


def get_json(url: str, authorization: str | None = None) -> tuple[int, dict, Any]:
    """(status, headers, decoded JSON body) of a GET, error statuses included."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback URLs
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
