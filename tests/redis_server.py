"""A real redis-server (Debian's) for the cluster tests: a free port, a temp dir, no persistence.

The fixture can be stopped and started again mid-test on the same port, which is how the tests
make Redis "restart" (empty, as a Redis without persistence comes back) or "go down".
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.testing import free_port


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            pytest.skip("redis-server is not installed (scripts/install --test installs it)")
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no", "--protected-mode", "no"],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.process.returncode}: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer: {self.log.read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGKILL: Redis vanishes at once, as on a crash (no persistence: it comes back empty)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> str:
        """Run one command with redis-cli (for the tests' own looks at Redis)."""
        result = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                                text=True, timeout=30)
        return result.stdout.strip()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started redis-server on a free port; stop()/start()/restart() keep the port."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()
