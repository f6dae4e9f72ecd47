"""Where an idle relay connection's bytes go: tracemalloc, object sizes, kernel socket memory.

usage: .venv/bin/python bench/relay/memory.py [--clients 2000] [--json out.json]

Runs the relay's RelayServer (from whatever `relayd` this interpreter imports: put a worktree's
daemon/ first on PYTHONPATH to measure it) in this process on uvloop, with tracemalloc on, and
connects --clients registered idle clients from separate load processes (load.py idle). Then:

- tracemalloc: the heap growth per client, grouped by the allocating line (a C extension's
  allocation is charged to the Python line that called into it; uvloop's own callbacks have
  none, so its transports show as uvloop/__init__.py) and by package;
- objects: the objects reachable from one connection and from no other (from the Client, its
  transport and its protocol, minus everything reachable from a second connection), counted by
  type with sys.getsizeof;
- kernel: the per-socket memory of the relay's side of the connections (`ss -tm`: receive,
  send and forward-alloc bytes), which is not in the process's RSS.

RSS per client is measured without tracemalloc by bench_relay.py (--idle-only).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import re
import resource
import subprocess
import sys
import time
import tracemalloc
import types
from collections import Counter, defaultdict
from pathlib import Path

import uvloop

HERE = Path(__file__).resolve().parent
PACKAGES = ("relayd", "aiohttp", "websockets", "asyncio", "uvloop", "multidict", "yarl")


def phase(what: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)


def package_of(filename: str) -> str:
    for name in PACKAGES:
        if f"/{name}/" in filename:
            return name
    return "other"


SHARED_TYPES = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.CodeType,
                types.MethodDescriptorType, types.WrapperDescriptorType)


def reachable(roots: list, stop: set[int]) -> dict[int, object]:
    seen: dict[int, object] = {}
    todo = list(roots)
    while todo:
        obj = todo.pop()
        key = id(obj)
        if key in seen or key in stop or isinstance(obj, SHARED_TYPES):
            continue
        if isinstance(obj, (dict, list, set, tuple)) and len(obj) > 256:
            continue  # a registry of all connections (no single connection holds one)
        seen[key] = obj
        todo.extend(gc.get_referents(obj))
    return seen


def roots_of(client) -> list:
    conn = client.conn
    transport = getattr(conn, "transport", None)
    roots = [client, conn]
    if transport is not None:
        roots += [transport, transport.get_protocol()]
    return roots


def private_objects(server, a, b) -> Counter:
    """Objects of connection a that connection b cannot reach: by type, (count, bytes)."""
    # the walk stops at what every connection shares: the server, the registry, the loop, and
    # the containers of all connections (so it never walks the whole heap)
    core = server.core
    stop = {id(server), id(core), id(asyncio.get_running_loop()), id(core.connections), id(core.by_uuid)}
    stop |= {id(v) for v in vars(server).values()}
    stop |= {id(v) for v in vars(core).values()}
    stop |= {id(vars(m)) for m in list(sys.modules.values())}  # module globals (from frames)
    mine = reachable(roots_of(a), stop)
    theirs = reachable(roots_of(b), stop)
    sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, obj in mine.items():
        if key not in theirs:
            entry = sizes[type(obj).__qualname__]
            entry[0] += 1
            entry[1] += sys.getsizeof(obj)
    return Counter({k: tuple(v) for k, v in sizes.items()})


def kernel_socket_memory(port: int) -> dict:
    """skmem of the relay's end of every established connection on port (bytes, averaged)."""
    out = subprocess.run(["ss", "-tmnH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    mems = [dict(re.findall(r"([a-z]+)(\d+)", m)) for m in re.findall(r"skmem:\(([^)]*)\)", out)]
    if not mems:
        return {"sockets": 0}
    n = len(mems)
    avg = {k: sum(int(m.get(k, 0)) for m in mems) / n for k in ("r", "t", "f", "w", "o", "d")}
    return {"sockets": n, "rmem_alloc": avg["r"], "wmem_alloc": avg["t"], "fwd_alloc": avg["f"],
            "wmem_queued": avg["w"], "optmem": avg["o"], "rcvbuf_limit": int(mems[0].get("rb", 0)),
            "sndbuf_limit": int(mems[0].get("tb", 0))}


def sockstat_tcp_pages() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1])
    return 0


async def measure(count: int) -> dict:
    from relayd.auth.none import NoAuth, NoAuthConfig
    from relayd.components.relay.config import RelayConfig
    from relayd.components.relay.server import RelayServer
    from relayd.config.model import ListenerConfig
    from relayd.listeners import Listener, bind_socket

    sock = bind_socket("127.0.0.1:0", 4096)
    port = sock.getsockname()[1]
    listener = Listener("mem", ListenerConfig(bind=f"127.0.0.1:{port}", backlog=4096), [sock], None, False)
    # generous deadlines: under tracemalloc on a busy box a handshake may take seconds
    config = RelayConfig(kind="relay", listener="mem", auth="open", current_clients_interval=None,
                         open_timeout=300, register_timeout=None)
    auth = NoAuth("open", NoAuthConfig(method="none"), None)  # type: ignore[arg-type]
    server = RelayServer(config, auth, logging.getLogger("relayd.relay.memory"))
    await server.start(listener)
    loop = asyncio.get_running_loop()

    # warm-up: one client through every path, so first-use allocations are not counted
    warm = await asyncio.create_subprocess_exec(sys.executable, str(HERE / "load.py"), "idle", str(port), "2",
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    await warm.stdout.readline()
    warm.stdin.close()
    await warm.wait()
    while server.core.connections:
        await asyncio.sleep(0.05)

    phase("warm-up done")
    gc.collect()
    types0 = Counter(type(o).__qualname__ for o in gc.get_objects())
    snap0 = tracemalloc.take_snapshot()
    pages0 = sockstat_tcp_pages()
    procs = 4
    per = [count // procs + (1 if i < count % procs else 0) for i in range(procs)]
    loads = [await asyncio.create_subprocess_exec(sys.executable, str(HERE / "load.py"), "idle", str(port), str(n),
                                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE) for n in per]
    for proc in loads:
        line = (await proc.stdout.readline()).decode()
        if not line.startswith("ready"):
            raise RuntimeError(f"idle load failed: {line!r}")
    phase("clients ready")
    await asyncio.sleep(1.0)
    assert server.core.registered == count, (server.core.registered, count, server.core.closes)
    gc.collect()
    snap1 = tracemalloc.take_snapshot()
    types1 = Counter(type(o).__qualname__ for o in gc.get_objects())
    pages1 = sockstat_tcp_pages()
    kernel = kernel_socket_memory(port)

    phase("snapshots taken")
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    snap0, snap1 = snap0.filter_traces(filters), snap1.filter_traces(filters)
    by_site: Counter = Counter()
    by_package: Counter = Counter()
    # grouped by the allocating line (innermost frame): grouping by whole tracebacks is exact
    # too but takes many minutes on a heap this size
    for stat in snap1.compare_to(snap0, "lineno"):
        frame = stat.traceback[0]
        pkg = package_of(frame.filename)
        name = (f"{pkg}/{frame.filename.split(f'/{pkg}/', 1)[1]}" if pkg != "other"
                else Path(frame.filename).name)
        by_site[f"{name}:{frame.lineno}"] += stat.size_diff
        by_package[pkg] += stat.size_diff
    del snap0, snap1, stat
    tracemalloc.stop()  # the object walk below must not allocate under tracing
    gc.collect()
    phase("snapshots compared")
    total = sum(by_site.values())
    clients = sorted(server.core.by_uuid.values(), key=lambda c: c.uuid)
    private = private_objects(server, clients[len(clients) // 2], clients[len(clients) // 2 + 1])
    phase("objects walked")
    gc_types = {k: (types1[k] - types0.get(k, 0)) / count for k in types1 if types1[k] - types0.get(k, 0) >= count}

    for proc in loads:
        proc.stdin.close()
    await asyncio.gather(*(proc.wait() for proc in loads))
    await server.stop(1)
    sock.close()
    del loop
    return {
        "clients": count,
        "tracemalloc_bytes_per_client": total / count,
        "by_site": {k: v / count for k, v in by_site.most_common(25)},
        "by_package": {k: v / count for k, v in by_package.most_common()},
        "private_objects": {k: {"count": v[0], "bytes": v[1]} for k, v in
                            sorted(private.items(), key=lambda kv: -kv[1][1])},
        "private_bytes": sum(v[1] for v in private.values()),
        "gc_objects_per_client": dict(sorted(gc_types.items(), key=lambda kv: -kv[1])),
        "kernel": kernel,
        "kernel_tcp_pages_delta_per_client": (pages1 - pages0) / count,  # both ends of each connection
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tracemalloc.start(1)
    result = uvloop.run(measure(args.clients))
    import relayd

    result["relayd"] = str(Path(relayd.__file__).parent)
    c = result
    print(f"relayd from {c['relayd']}, {c['clients']} idle registered clients")
    print(f"tracemalloc: {c['tracemalloc_bytes_per_client']:.0f} B/client")
    print("  by package: " + ", ".join(f"{k} {v:.0f}" for k, v in c["by_package"].items()))
    for k, v in list(c["by_site"].items())[:15]:
        print(f"  {v:8.0f}  {k}")
    print(f"objects private to one connection: {c['private_bytes']} B (sys.getsizeof)")
    for k, v in list(c["private_objects"].items())[:15]:
        print(f"  {v['bytes']:6d} B  {v['count']:3d} x {k}")
    print(f"kernel (not in RSS): {c['kernel']}; TCP pages/client (both ends) {c['kernel_tcp_pages_delta_per_client']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
