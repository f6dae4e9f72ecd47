"""Several real relayd nodes sharing one real redis-server, optionally behind a real HAProxy."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

from polling import wait_until
from relayd.testing import RelaydProcess, free_port, start_relayd, write_config


def node_config(port: int, redis_url: str | None, node: str, extra: str = "", auth: str = "",
                status_port: int = 0) -> str:
    cluster = f'[cluster]\nredis = "{redis_url}"\nnode = "{node}"\n' if redis_url else ""
    auth_table = auth or '[auth.open]\nmethod = "none"'
    return f"""
{cluster}
{auth_table}
[listeners.relay]
bind = "127.0.0.1:{port}"
[components.relay]
kind = "relay"
listener = "relay"
auth = "{'globus' if auth else 'open'}"
{extra}
""" + (f"""
[listeners.web]
bind = "127.0.0.1:{status_port}"
[components.health]
kind = "status"
listener = "web"
""" if status_port else "")


@dataclass
class Node:
    name: str
    port: int
    config_dir: Path
    tmp: Path
    status_port: int = 0
    process: RelaydProcess | None = None

    def healthz(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/healthz", timeout=10) as reply:
            assert reply.status == 200
            return reply.read().decode()

    def metrics(self) -> str:
        assert self.process is not None
        return self.process.ctl("metrics").stdout

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = start_relayd(self.tmp, self.config_dir)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def status(self) -> dict:
        assert self.process is not None
        result = self.process.ctl("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def relay(self) -> dict:
        return self.status()["components"]["relay"]

    def clients(self) -> list[dict]:
        assert self.process is not None
        result = self.process.ctl("clients", "relay", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["clients"]


@dataclass
class Cluster:
    nodes: list[Node] = field(default_factory=list)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def cluster_up(self) -> bool:
        return all(n.relay().get("cluster", {}).get("up") for n in self.nodes if n.process
                   and n.process.process.poll() is None)


def start_cluster(tmp: Path, redis_url: str | None, count: int, extra: str = "", auth: str = "") -> Cluster:
    cluster = Cluster()
    for index in range(count):
        port, status_port = free_port(), free_port()
        name = f"node{index}"
        config_dir = write_config(tmp / f"etc-{name}", node_config(port, redis_url, name, extra, auth,
                                                                     status_port))
        node = Node(name, port, config_dir, tmp / name, status_port)
        node.tmp.mkdir(parents=True, exist_ok=True)
        cluster.nodes.append(node)
    for node in cluster.nodes:
        node.start()
    if redis_url:
        assert wait_until(cluster.cluster_up, 30), [n.relay() for n in cluster.nodes]
    return cluster


async def await_until(predicate, timeout: float = 20.0):
    return await asyncio.to_thread(wait_until, predicate, timeout)
