"""The relay across nodes: forwarded msgs/s and relay CPU per message for 1, 2 and 3 relayd nodes
sharing one redis-server, same-node vs cross-node pairs, and the p50 latency a cross-node hop adds.

usage: .venv/bin/python bench/cluster/relay.py [--rounds 3] [--seconds 5] [--procs 2] [--pairs 3]
                                               [--idle 5000] [--json results.json]

Scenarios (interleaved per round): "1 node" is a node without [cluster]; "1 node + Redis" a
clustered node whose pairs are all local; "N nodes same" spreads the pairs over N clustered nodes
with both ends on one node; "N nodes cross" puts each sender on node i and its receiver on node
i+1, so every message goes through Redis. CPU per message is the summed utime+stime of every
relayd process over the run divided by the messages delivered; Redis's CPU is shown apart. Then
the median one-way latency of 2000 sequential messages same-node vs cross-node, and --idle idle
registered clients on one clustered node: its RSS per client and Redis's memory per registration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "relay"))
from bench_relay import LOAD, Target, cpu_seconds, free_port, idle_clients, relay_config, rss_mib, settle  # noqa: E402

PY = sys.executable
BIN = Path(PY).parent


def start_redis(tmp: Path) -> Target:
    port = free_port()
    return Target("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", str(tmp)], port, None, tmp / "redis.log")


def redis_cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          timeout=30).stdout


def start_node(tmp: Path, name: str, redis_port: int | None) -> Target:
    port = free_port()
    home = tmp / name
    (home / "etc").mkdir(parents=True)
    cluster = f'[cluster]\nredis = "redis://127.0.0.1:{redis_port}/0"\nnode = "{name}"\n' if redis_port else ""
    (home / "etc" / "relayd.toml").write_text(relay_config(port, cluster=cluster))
    env = {**os.environ, "RELAYD_CONTROL__SOCKET": str(home / "control.sock"), "RELAYD_STATE_DIR": str(home / "state")}
    env.pop("NOTIFY_SOCKET", None)
    node = Target(name, [str(BIN / "relayd"), "--config", str(home / "etc")], port, env, home / "relayd.log")
    node.home = home  # type: ignore[attr-defined]
    if redis_port:  # wait until it has subscribed
        deadline = time.monotonic() + 30
        while "1" not in redis_cli(redis_port, "pubsub", "numsub", f"relayd:relay:node:{name}").split()[1:]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not subscribe")
            time.sleep(0.05)
    return node


def flood(nodes: list[Target], redis: Target | None, pairs: list[tuple[int, int]], procs: int,
          seconds: float) -> dict:
    share = [pairs[i::procs] for i in range(procs)]
    cpu0 = sum(cpu_seconds(n.proc.pid) for n in nodes)
    rcpu0 = cpu_seconds(redis.proc.pid) if redis else 0.0
    t0 = time.monotonic()
    loads = [subprocess.Popen([PY, LOAD, "flood-across", str(seconds), *(f"{s}:{r}" for s, r in mine)],
                              stdout=subprocess.PIPE, text=True) for mine in share if mine]
    outs = [json.loads(p.communicate(timeout=seconds + 60)[0]) for p in loads]
    wall = time.monotonic() - t0
    cpu = sum(cpu_seconds(n.proc.pid) for n in nodes) - cpu0
    rcpu = (cpu_seconds(redis.proc.pid) - rcpu0) if redis else 0.0
    delivered = sum(o["delivered"] for o in outs)
    return {"msgs_per_s": delivered / max(o["seconds"] for o in outs), "delivered": delivered,
            "cpu_us_per_msg": 1e6 * cpu / max(delivered, 1), "redis_cpu_us_per_msg": 1e6 * rcpu / max(delivered, 1),
            "relay_cpu_pct": 100 * cpu / wall, "redis_cpu_pct": 100 * rcpu / wall,
            "loadavg_1min": os.getloadavg()[0]}


def latency(sender: Target, receiver: Target, everyone: list[Target], count: int = 2000) -> float:
    for node in everyone:
        settle(node.proc.pid)
    out = subprocess.run([PY, LOAD, "latency", str(sender.port), str(count), str(receiver.port)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return statistics.median(json.loads(out)["latency_us"])


def idle(node: Target, redis: Target, count: int, procs: int = 4) -> dict:
    def used_memory() -> int:
        for line in redis_cli(redis.port, "info", "memory").splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
        return 0

    base, rbase = rss_mib(node.proc.pid), used_memory()
    with idle_clients(node.name, node.port, count, procs):
        return {"clients": count, "rss_mib_before": base, "rss_mib": rss_mib(node.proc.pid),
                "kib_per_client": 1024 * (rss_mib(node.proc.pid) - base) / count,
                "redis_bytes_per_registration": (used_memory() - rbase) / count}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3, help="pairs per load process (total divisible by 2 and 3)")
    ap.add_argument("--idle", type=int, default=5000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.idle + 1024)), hard))

    tmp = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    started: list[Target] = []
    try:
        redis = start_redis(tmp)
        started.append(redis)
        alone = start_node(tmp, "alone", None)
        started.append(alone)
        nodes = [start_node(tmp, f"node{i}", redis.port) for i in range(3)]
        started += nodes
        total = args.procs * args.pairs

        def pairs(n: int, cross: bool) -> list[tuple[int, int]]:
            used = nodes[:n]
            return [(used[i % n].port, used[(i + cross) % n].port) for i in range(total)]

        scenarios = {
            "1 node": ([alone], None, [(alone.port, alone.port)] * total),
            "1 node + Redis": (nodes[:1], redis, pairs(1, False)),
            "2 nodes same": (nodes[:2], redis, pairs(2, False)),
            "2 nodes cross": (nodes[:2], redis, pairs(2, True)),
            "3 nodes same": (nodes, redis, pairs(3, False)),
            "3 nodes cross": (nodes, redis, pairs(3, True)),
        }
        results: dict[str, list[dict]] = {name: [] for name in scenarios}
        for used, r, ps in scenarios.values():  # warm-up, not recorded
            flood(used, r, ps, args.procs, 1)
        lat: dict[str, list[float]] = {"same node": [], "cross node": [], "1 node (no Redis)": []}
        for rnd in range(args.rounds):
            for name, (used, r, ps) in scenarios.items():
                for node in used:
                    settle(node.proc.pid)
                res = flood(used, r, ps, args.procs, args.seconds)
                results[name].append(res)
                print(f"round {rnd + 1} {name:15} {res['msgs_per_s']:8.0f} msg/s  relay {res['cpu_us_per_msg']:5.1f} us CPU/msg"
                      f"  redis {res['redis_cpu_us_per_msg']:4.1f} us/msg  relay CPU {res['relay_cpu_pct']:3.0f}%"
                      f"  redis CPU {res['redis_cpu_pct']:3.0f}%  loadavg {res['loadavg_1min']:.1f}", flush=True)
            lat["same node"].append(latency(nodes[0], nodes[0], nodes))
            lat["cross node"].append(latency(nodes[0], nodes[1], nodes))
            lat["1 node (no Redis)"].append(latency(alone, alone, [alone]))
            print(f"round {rnd + 1} latency p50: " + ", ".join(f"{k} {v[-1]:.0f} us" for k, v in lat.items()), flush=True)
        idle_result = idle(nodes[0], redis, args.idle) if args.idle else {}
        if idle_result:
            print(f"idle: {args.idle} clients on a clustered node: {idle_result['kib_per_client']:.1f} KiB RSS each, "
                  f"Redis {idle_result['redis_bytes_per_registration']:.0f} bytes per registration", flush=True)
        downs = {n.name: (n.home / "relayd.log").read_text().count("is down") for n in nodes}  # type: ignore[attr-defined]
    finally:
        for target in reversed(started):
            target.stop()

    summary = {name: {k: statistics.median(r[k] for r in rs) for k in
                      ("msgs_per_s", "cpu_us_per_msg", "redis_cpu_us_per_msg")} for name, rs in results.items()}
    latency_p50 = {k: statistics.median(v) for k, v in lat.items()}
    print(f"\nmedians of {args.rounds} rounds ({args.procs} load processes x {args.pairs} pairs, {args.seconds:g} s):")
    print("| scenario | forwarded msgs/s | relay CPU per message | Redis CPU per message |")
    print("| --- | --- | --- | --- |")
    for name, s in summary.items():
        print(f"| {name} | {s['msgs_per_s']:,.0f} | {s['cpu_us_per_msg']:.1f} µs | {s['redis_cpu_us_per_msg']:.1f} µs |")
    print("latency p50: " + ", ".join(f"{k} {v:.0f} µs" for k, v in latency_p50.items())
          + f"; a cross-node hop adds {latency_p50['cross node'] - latency_p50['same node']:.0f} µs")
    print(f"cluster-down transitions during the run (should be 0): {downs}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": results, "summary": summary, "latency_p50_us": latency_p50,
                                         "latency_rounds": lat, "idle": idle_result, "downs": downs,
                                         "args": vars(args) | {"json": str(args.json)}}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
