"""A real HAProxy (Debian's) in TCP mode in front of several relayd nodes on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from relayd.testing import free_port


class HAProxyFront:
    """`haproxy -db` balancing TCP connections round-robin over `backends` (ports).

    Backends are health-checked every 200 ms and a failed connect is redispatched to another
    node, so a killed node stops receiving clients quickly, as an operator's front would do.
    """

    def __init__(self, workdir: Path, backends: list[int], *, balance: str = "roundrobin") -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            pytest.skip("haproxy is not installed (scripts/install --test installs it)")
        self.port = free_port()
        self.config = workdir / f"haproxy-{self.port}.cfg"
        servers = "\n".join(
            f"    server node{i} 127.0.0.1:{port} check inter 200ms fall 1 rise 1"
            for i, port in enumerate(backends))
        self.config.write_text(f"""\
global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    retries 3
    option redispatch
frontend front
    bind 127.0.0.1:{self.port}
    default_backend nodes
backend nodes
    balance {balance}
{servers}
""")
        self.log = workdir / f"haproxy-{self.port}.log"
        self.process = subprocess.Popen([binary, "-db", "-f", str(self.config)],
                                        stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited {self.process.returncode}: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"haproxy did not listen: {self.log.read_text()}") from None
                time.sleep(0.02)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def haproxy_front(tmp_path: Path):
    """Factory: haproxy_front([port, ...]) -> HAProxyFront, stopped at the end of the test."""
    fronts: list[HAProxyFront] = []

    def start(backends: list[int], **kwargs) -> HAProxyFront:
        front = HAProxyFront(tmp_path, backends, **kwargs)
        fronts.append(front)
        return front

    yield start
    for front in fronts:
        front.stop()
