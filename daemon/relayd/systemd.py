"""systemd integration: sd_notify(3) and sd_listen_fds(3), written from the man pages.

We do not use the `sdnotify` package: it encodes messages as latin-1, silently drops any
message with a character outside latin-1 (a STATUS= line with a user name in it, say) and
swallows every exception with a bare ``except:``. `systemd-python` needs libsystemd headers
and a compiler. The protocol is one datagram on an AF_UNIX socket; this module is the whole
of it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("relayd.systemd")

SD_LISTEN_FDS_START = 3


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd expects in MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _notify_address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    raise ValueError(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor an @abstract name")


class Notifier:
    """Sends state changes to the service manager named by $NOTIFY_SOCKET.

    Without $NOTIFY_SOCKET every call is a no-op, as sd_notify(3) specifies. Send errors are
    logged, never raised: the service keeps running if the manager went away.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        value = environ.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = _notify_address(value) if value else None
        self._sock: socket.socket | None = None
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; ``notify(READY=1, STATUS="up")``."""
        if self._sock is None or self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = " ".join(str(value).split()) if key == "STATUS" else str(value)
            lines.append(f"{key}={text}")
        try:
            self._sock.sendto("\n".join(lines).encode("utf-8"), self.address)
            return True
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
            return False

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status)

    def reloading(self, status: str = "reloading configuration") -> None:
        # MONOTONIC_USEC in the same datagram: required by Type=notify-reload (systemd >= 253),
        # harmless before, so the unit can switch type without a code change.
        self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS=status)

    def stopping(self, status: str = "stopping") -> None:
        self.notify(STOPPING=1, STATUS=status)

    def status(self, status: str) -> None:
        self.notify(STATUS=status)

    def extend_timeout(self, seconds: float) -> None:
        self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def watchdog(self) -> None:
        self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if not asked for."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid and watchdog_pid != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
    return value / 2 / 1_000_000 if value > 0 else None


def parse_listen_env(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """(fd, name) pairs passed by socket activation, or [] when they are not for this pid."""
    if environ.get("LISTEN_PID") != str(pid):
        return []
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    result = []
    for index in range(count):
        name = names[index] if index < len(names) and names[index] else "unknown"
        result.append((SD_LISTEN_FDS_START + index, name))
    return result


def listen_fds(environ: MutableMapping[str, str] | None = None) -> dict[str, list[socket.socket]]:
    """Take the sockets passed by systemd, keyed by FileDescriptorName=.

    All fds of one socket unit share its name (IPv4 + IPv6 ListenStream= lines), hence lists.
    Exactly one socket object is made per fd: socket.socket(fileno=fd) owns the fd, and a
    second object for it would close it when collected. The LISTEN_* variables are removed
    so that children (upstream helpers, tests' subprocesses) do not inherit them.
    """
    environ = os.environ if environ is None else environ
    pairs = parse_listen_env(environ, os.getpid())
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(key, None)
    sockets: dict[str, list[socket.socket]] = {}
    for fd, name in pairs:
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ValueError(
                f"socket activation: LISTEN_FDS names fd {fd} ({name!r}), which is not an open socket: "
                f"{exc.strerror or exc}"
            ) from None
        # relayd serves stream sockets that listen (Accept=no); anything else is a unit mistake.
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()  # not ours to close
            raise ValueError(
                f"socket activation: fd {fd} ({name!r}) is not a listening stream socket "
                "(relayd needs ListenStream= with Accept=no)"
            )
        sockets.setdefault(name, []).append(sock)
    return sockets
