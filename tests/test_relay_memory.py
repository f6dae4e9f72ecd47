"""An idle registered relay client stays light: 2,000 of them grow a real relayd's RSS by less
than a per-client bound (not timed). The clients are bench/relay/load.py's hand-rolled ones
(registered like RelayClient, answering keepalive pings) in two separate processes, so only
the relay's side of each connection is in the relayd process measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from relayd.testing import free_port

LOAD = Path(__file__).resolve().parent.parent / "bench" / "relay" / "load.py"
CLIENTS = 2000
# Measured (bench/README.md, relay section): about 4 KiB per idle client on this layer, 15-17 KiB
# on the aiohttp one it replaced. The bound leaves room for allocator noise and other Python
# builds while still failing on a return to a task (and its frames) per idle connection.
BOUND_KIB = 9.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def connect_idle(port: int, count: int, procs: int) -> list[subprocess.Popen]:
    loads = [subprocess.Popen([sys.executable, str(LOAD), "idle", str(port), str(count // procs)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    for load in loads:
        line = load.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("ready"), line
    return loads


def release(loads: list[subprocess.Popen]) -> None:
    for load in loads:
        load.stdin.close()  # type: ignore[union-attr]
        load.wait(60)


def test_idle_registered_clients_stay_under_the_per_client_bound(relayd):
    port = free_port()
    daemon = relayd(f"""
        [logging]
        level = "warning"
        [listeners.relay]
        bind = "127.0.0.1:{port}"
        backlog = 1024
        [auth.open]
        method = "none"
        [components.relay]
        kind = "relay"
        listener = "relay"
        auth = "open"
    """)
    pid = daemon.process.pid
    # first use of every path (imports, caches, the allocator's arenas) is not per client
    release(connect_idle(port, 200, 1))
    before = rss_kib(pid)
    loads = connect_idle(port, CLIENTS, 2)
    try:
        status = json.loads(daemon.ctl("status", "--json").stdout)["components"]["relay"]
        assert status["clients"] == CLIENTS and status["connections"] == CLIENTS
        per_client = (rss_kib(pid) - before) / CLIENTS
    finally:
        release(loads)
    assert per_client < BOUND_KIB, f"{per_client:.1f} KiB of relayd RSS per idle registered client"
