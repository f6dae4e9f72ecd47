"""relayd's relay vs proxystore-relay, same machine, same run, both at WARNING logging.

usage: .venv/bin/python bench/relay/bench_relay.py [--rounds 3] [--seconds 10] [--procs 3] [--pairs 2]
                                                  [--idle 10000 [19000 ...]] [--idle-only]
                                                  [--baseline REV] [--json results.json]

Per round and target (interleaved): forwarded msgs/s under load from --procs client processes
(each --pairs sender->receiver pairs of hand-rolled clients, see load.py), relay CPU time per
forwarded message (utime+stime of the relay process over the run, /proc/PID/stat), and the
median one-way latency of 2000 sequential messages on an otherwise idle relay. Then, for each
--idle count, that many registered idle clients (answering pings) on each relay, with its RSS
before and with them. --baseline REV adds relayd@REV: the same venv and interpreter running a
temporary `git worktree` of REV (its daemon/ first on PYTHONPATH), so only relayd's code differs.
All traffic is on 127.0.0.1. Prints medians of the rounds and the ratios relayd / proxystore.

One process holds at most RLIMIT_NOFILE's hard limit of descriptors (this script raises the soft
limit to it; on the project's machines the hard limit is 20,000 and cannot be raised without
CAP_SYS_RESOURCE), so an --idle count above about hard - 500 cannot be measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
BIN = Path(PY).parent
LOAD = str(HERE / "load.py")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Target:
    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.name, self.port = name, port
        self.imported_from = ""
        self.log = open(log or os.devnull, "wb")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_port(port)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def relay_config(port: int, *, max_connections: int | None = None, cluster: str = "") -> str:
    """relayd.toml for a relay-only node at WARNING on 127.0.0.1:port; cluster: a [cluster] block."""
    limit = f"max_connections = {max_connections}\n" if max_connections is not None else ""
    return f"""{cluster}
[logging]
level = "warning"
[listeners.relay]
bind = "127.0.0.1:{port}"
backlog = 4096
{limit}[auth.open]
method = "none"
[components.relay]
kind = "relay"
listener = "relay"
auth = "open"
send_buffer_bytes = 4194304
"""


def start_relayd(tmp: Path, name: str = "relayd", daemon_dir: Path | None = None, max_connections: int = 1024) -> Target:
    port = free_port()
    etc = tmp / f"etc-{name}"
    etc.mkdir(exist_ok=True)
    (etc / "relayd.toml").write_text(relay_config(port, max_connections=max_connections))
    env = {**os.environ, "RELAYD_CONTROL__SOCKET": str(tmp / f"control-{name}.sock"),
           "RELAYD_STATE_DIR": str(tmp / f"state-{name}")}
    env.pop("NOTIFY_SOCKET", None)
    if daemon_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(daemon_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    where = subprocess.run([PY, "-c", "import relayd; print(relayd.__file__)"], env=env, capture_output=True,
                           text=True, check=True).stdout.strip()
    target = Target(name, [str(BIN / "relayd"), "--config", str(etc)], port, env, tmp / f"{name}.log")
    target.imported_from = where
    return target


def start_proxystore(tmp: Path) -> Target:
    port = free_port()
    exe = shutil.which("proxystore-relay", path=str(BIN)) or "proxystore-relay"
    return Target("proxystore-relay", [exe, "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"],
                  port, None, tmp / "proxystore.log")


def flood(target: Target, procs: int, pairs: int, seconds: float) -> dict:
    cpu0, t0 = cpu_seconds(target.proc.pid), time.monotonic()
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    loads = [subprocess.Popen([PY, LOAD, "flood", str(target.port), str(pairs), str(seconds)],
                              stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    outs = [json.loads(p.communicate(timeout=seconds + 60)[0]) for p in loads]
    cpu = cpu_seconds(target.proc.pid) - cpu0
    wall = time.monotonic() - t0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_cpu = kids.ru_utime + kids.ru_stime - kids0.ru_utime - kids0.ru_stime
    delivered = sum(o["delivered"] for o in outs)
    seconds_run = max(o["seconds"] for o in outs)
    return {"msgs_per_s": delivered / seconds_run, "delivered": delivered,
            "cpu_us_per_msg": 1e6 * cpu / max(delivered, 1), "relay_cpu_pct": 100 * cpu / wall,
            "load_cpu_pct": 100 * load_cpu / wall, "loadavg_1min": os.getloadavg()[0]}


def settle(pid: int, timeout: float = 10.0) -> None:
    """Wait until the relay has worked off the flood's backlog (< 2% CPU over 200 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(0.2)
        if cpu_seconds(pid) - before < 0.004:
            return


def latency(target: Target, count: int = 2000) -> float:
    settle(target.proc.pid)
    out = subprocess.run([PY, LOAD, "latency", str(target.port), str(count)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return statistics.median(json.loads(out)["latency_us"])


@contextlib.contextmanager
def idle_clients(name: str, port: int, count: int, procs: int = 4) -> Iterator[None]:
    """count registered idle clients on the relay at port (procs load processes) while the block runs."""
    per = [count // procs + (1 if i < count % procs else 0) for i in range(procs)]
    loads = [subprocess.Popen([PY, LOAD, "idle", str(port), str(n)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for n in per]
    try:
        for p in loads:
            line = p.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"idle load failed on {name}: {line!r}")
        time.sleep(1)  # let the relay settle (this is a measurement, not synchronisation)
        yield
    finally:
        for p in loads:
            p.stdin.close()
            p.wait(60)


def idle(target: Target, count: int) -> dict:
    settle(target.proc.pid)
    base = rss_mib(target.proc.pid)
    with idle_clients(target.name, target.port, count):
        return {"clients": count, "rss_mib_before": base, "rss_mib": rss_mib(target.proc.pid),
                "kib_per_client": 1024 * (rss_mib(target.proc.pid) - base) / count}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--procs", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--idle", type=int, nargs="*", default=[10000])
    ap.add_argument("--idle-only", action="store_true", help="skip the forwarding rounds")
    ap.add_argument("--baseline", help="also run relayd at this git revision (relayd@REV)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by relays and load processes
    too_many = [n for n in args.idle if n > hard - 500]
    if too_many:
        print(f"skipping --idle {too_many}: a relay process may hold at most {hard} descriptors "
              "(RLIMIT_NOFILE hard limit)", flush=True)
        args.idle = [n for n in args.idle if n <= hard - 500]
    most = max(args.idle, default=0) + 1000

    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    worktree = None
    targets = [start_relayd(tmp, max_connections=most)]
    if args.baseline:
        worktree = tmp / "baseline"
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(worktree), args.baseline],
                       check=True, capture_output=True)
        targets.append(start_relayd(tmp, f"relayd@{args.baseline}", worktree / "daemon", most))
    targets.append(start_proxystore(tmp))
    for t in targets:
        print(f"{t.name}: {t.imported_from or 'proxystore-relay'}", flush=True)
    results: dict[str, list[dict]] = {t.name: [] for t in targets}
    idle_results: dict[str, dict] = {}
    first_rss: dict[str, float] = {}  # RSS before the first idle count (later counts reuse freed memory)
    try:
        for t in targets:  # warm-up, not recorded
            flood(t, args.procs, args.pairs, 1)
        for rnd in range(0 if args.idle_only else args.rounds):
            for t in targets:
                r = flood(t, args.procs, args.pairs, args.seconds)
                r["latency_median_us"] = latency(t)
                results[t.name].append(r)
                print(f"round {rnd + 1} {t.name:17} {r['msgs_per_s']:9.0f} msg/s  {r['cpu_us_per_msg']:7.1f} us CPU/msg"
                      f"  relay CPU {r['relay_cpu_pct']:3.0f}%  load CPU {r['load_cpu_pct']:3.0f}%  loadavg {r['loadavg_1min']:.1f}"
                      f"  latency p50 {r['latency_median_us']:6.0f} us",
                      flush=True)
        for count in args.idle:
            for t in targets:
                try:
                    r = idle(t, count)
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:  # reported, not fatal
                    idle_results.setdefault(t.name, {})[str(count)] = {"error": str(exc)}
                    print(f"idle {t.name:17} {count} clients: failed: {exc}", flush=True)
                    continue
                r["rss_mib_start"] = first_rss.setdefault(t.name, r["rss_mib_before"])
                r["kib_per_client_from_start"] = 1024 * (r["rss_mib"] - r["rss_mib_start"]) / count
                idle_results.setdefault(t.name, {})[str(count)] = r
                print(f"idle {t.name:17} {count} clients: RSS {r['rss_mib']:.0f} MiB (before {r['rss_mib_before']:.0f} MiB)"
                      f" = {r['kib_per_client']:.1f} KiB/client; {r['kib_per_client_from_start']:.1f} from the"
                      f" relay's RSS before the first count ({r['rss_mib_start']:.0f} MiB)", flush=True)
    finally:
        for t in targets:
            t.stop()
        if worktree is not None:
            subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    if args.idle_only:
        if args.json:
            args.json.write_text(json.dumps({"idle": idle_results, "args": vars(args) | {"json": str(args.json)},
                                             "imported_from": {t.name: t.imported_from for t in targets}}, indent=1))
        shutil.rmtree(tmp, ignore_errors=True)
        return 0

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    summary = {name: {k: med(name, k) for k in ("msgs_per_s", "cpu_us_per_msg", "latency_median_us")}
               for name in results}
    b = summary["proxystore-relay"]
    ratios = {name: {"throughput": a["msgs_per_s"] / b["msgs_per_s"],
                     "cpu_per_msg": a["cpu_us_per_msg"] / b["cpu_us_per_msg"],
                     "latency": a["latency_median_us"] / b["latency_median_us"]}
              for name, a in summary.items() if name != "proxystore-relay"}
    print(f"\nmedians of {args.rounds} rounds ({args.procs} load processes x {args.pairs} pairs, {args.seconds:g} s):")
    for name, s in summary.items():
        print(f"  {name:17} {s['msgs_per_s']:9.0f} msg/s  {s['cpu_us_per_msg']:7.1f} us CPU/msg  "
              f"latency p50 {s['latency_median_us']:6.0f} us")
    for name, r in ratios.items():
        print(f"  {name} / proxystore-relay: throughput x{r['throughput']:.1f}, CPU per message "
              f"x{r['cpu_per_msg']:.3f} (1/{1 / r['cpu_per_msg']:.1f}), latency x{r['latency']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": results, "summary": summary, "ratios": ratios,
                                         "idle": idle_results, "args": vars(args) | {"json": str(args.json)},
                                         "imported_from": {t.name: t.imported_from for t in targets}},
                                        indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
