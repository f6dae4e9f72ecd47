#!/usr/bin/env python3
"""relayd http_proxy vs nginx and Caddy as reverse proxies to the same nginx backend.

    sudo .venv/bin/python bench/http_proxy/run.py [--install] [--rounds 3] [--duration 10] [--out FILE]
                                                  [--rev REV] [--baseline REV]

Targets (all on 127.0.0.1, all proxying to one nginx backend: 'ok' on /, 1 MiB on /1m):
  nginx   1 worker, keepalive upstream pool (the perf-anchors configuration)
  caddy   reverse_proxy with a keep-alive pool, no TLS, no admin API
  relayd  http_proxy with HTTP Basic auth (argon2id users) and per-user/endpoint counting on;
          the checkout's daemon/ as it is, or (--rev REV) a worktree of REV, for a run that
          uncommitted edits in the checkout cannot change
  relayd@REV  (--baseline REV) the same relayd configuration from a git worktree of REV, run by
          the same venv interpreter with the worktree's daemon/ first on PYTHONPATH, so only
          relayd's own code differs; the worktree is removed at the end

Load: wrk -t1 -c64 --latency (every target gets the same Authorization header; nginx and Caddy
ignore it). Rounds are interleaved so drift spreads over all targets; the table shows medians
and [min-max]. CPU us/req is the proxy's utime+stime (whole process tree) over the run.
Every target is checked for correct answers (200 'ok', the 1 MiB body byte for byte, relayd's
401 without credentials) before and after the rounds; wrk's non-2xx and socket errors are
recorded, and any for a relayd target stop the run. Each measurement also records the host's
busy cores (/proc/stat) and the load average, to tell disturbed rounds.
--install apt-installs nginx-light, caddy and wrk (benchmark-only tools, never in CI).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The checkout's venv; from a git worktree without one, the venv of the interpreter running this.
VENV = ROOT / ".venv" / "bin" if (ROOT / ".venv").is_dir() else Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")
BACKEND, NGINX, CADDY, RELAYD, RELAYD_BASELINE = 19101, 19111, 19112, 19113, 19114
USER, PASSWORD = "bench", "bench-password"


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def install() -> None:
    missing = [p for p, tool in (("nginx-light", "nginx"), ("caddy", "caddy"), ("wrk", "wrk")) if not shutil.which(tool)]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sh("apt-get", "update", "-qq", env=env)
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, env=env)


def wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def host_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole host since boot, all cores."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq + steal) / TICK, sum(f) / TICK


def cpu(pids: list[int]) -> float:
    return sum(cpu_split(pids)) / TICK


def cpu_split(pids: list[int]) -> tuple[int, int]:
    """(user, system) clock ticks of the processes."""
    user = system = 0
    for p in pids:
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(f[11])
        system += int(f[12])
    return user, system


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


class Relayd:
    """One relayd target: its name, port and the daemon/ directory its code is imported from."""

    def __init__(self, name: str, port: int, daemon_dir: Path, commit: str) -> None:
        self.name, self.port, self.daemon_dir, self.commit = name, port, daemon_dir, commit

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RELAYD_", "NOTIFY_", "LISTEN_")) and k != "PYTHONPATH"}
        if self.daemon_dir != ROOT / "daemon":  # the checkout's own daemon/ comes from the editable install
            env["PYTHONPATH"] = str(self.daemon_dir)
        return env

    def prepare(self, state: Path) -> str:
        """Add the bench user with this target's own relayd, and check where relayd is imported from."""
        code = textwrap.dedent(f"""
            import sys, relayd
            from relayd.auth.users import UserExists, UserStore
            try:
                UserStore({str(state / "users-users.sqlite3")!r}).add({USER!r}, {PASSWORD!r})
            except UserExists:
                pass
            print(relayd.__file__)
        """)
        out = subprocess.run([str(VENV / "python"), "-c", code], env=self.env(), check=True,
                             capture_output=True, text=True).stdout.strip()
        origin = Path(out).resolve()
        if not origin.is_relative_to(self.daemon_dir.resolve()):
            raise SystemExit(f"{self.name}: relayd imported from {origin}, not from {self.daemon_dir}")
        print(f"{self.name}: relayd imported from {origin}", flush=True)
        return str(origin)


def loaded(pid: int, needle: str) -> bool:
    """Whether a shared object whose path contains needle is mapped in the process."""
    return needle in Path(f"/proc/{pid}/maps").read_text()


class Services:
    def __init__(self, work: Path, relayds: list[Relayd]) -> None:
        self.work = work
        self.relayds = relayds
        self.procs: dict[str, subprocess.Popen] = {}
        self.origins: dict[str, str] = {}

    def start(self) -> None:
        w = self.work
        (w / "www").mkdir(parents=True, exist_ok=True)
        (w / "www" / "1m").write_bytes(os.urandom(1 << 20))
        (w / "backend.conf").write_text(textwrap.dedent(f"""
            worker_processes 1; daemon off; pid {w}/backend.pid; error_log {w}/backend.err warn;
            events {{ worker_connections 4096; }}
            http {{ access_log off; sendfile on; tcp_nopush on; tcp_nodelay on;
              keepalive_requests 1000000; keepalive_timeout 120s;
              server {{ listen 127.0.0.1:{BACKEND} backlog=4096;
                location = / {{ default_type text/plain; return 200 'ok'; }}
                location = /1m {{ root {w}/www; default_type application/octet-stream; }} }} }}
        """))
        (w / "proxy.conf").write_text(textwrap.dedent(f"""
            worker_processes 1; daemon off; pid {w}/proxy.pid; error_log {w}/proxy.err warn;
            events {{ worker_connections 4096; }}
            http {{ access_log off; tcp_nodelay on; keepalive_requests 1000000; keepalive_timeout 120s;
              upstream be {{ server 127.0.0.1:{BACKEND}; keepalive 128; keepalive_requests 1000000; }}
              proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host;
              proxy_buffers 16 64k; proxy_buffer_size 64k; proxy_busy_buffers_size 128k;
              proxy_max_temp_file_size 0;
              server {{ listen 127.0.0.1:{NGINX} backlog=4096; location / {{ proxy_pass http://be; }} }} }}
        """))
        (w / "Caddyfile").write_text(textwrap.dedent(f"""
            {{
                admin off
                auto_https off
            }}
            http://127.0.0.1:{CADDY} {{
                reverse_proxy 127.0.0.1:{BACKEND} {{
                    transport http {{
                        keepalive 120s
                        keepalive_idle_conns_per_host 128
                    }}
                }}
            }}
        """))
        for r in self.relayds:
            self.write_relayd(r)
        self.procs["backend"] = subprocess.Popen(["nginx", "-c", str(w / "backend.conf")])
        self.procs["nginx"] = subprocess.Popen(["nginx", "-c", str(w / "proxy.conf")])
        self.procs["caddy"] = subprocess.Popen(["caddy", "run", "--config", str(w / "Caddyfile"),
                                                "--adapter", "caddyfile"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for r in self.relayds:
            self.procs[r.name] = subprocess.Popen([str(VENV / "relayd"), "--config", str(self.dir(r))],
                                                  env=r.env())
        for port in (BACKEND, NGINX, CADDY, *(r.port for r in self.relayds)):
            wait_port(port)
        # The new engine parses with httptools; the previous one never imported it.
        self.httptools = {r.name: loaded(self.procs[r.name].pid, "httptools") for r in self.relayds}
        for r in self.relayds:
            print(f"{r.name}: pid {self.procs[r.name].pid}, httptools loaded: {self.httptools[r.name]}",
                  flush=True)

    def dir(self, r: Relayd) -> Path:
        return self.work / r.name.replace("@", "-")

    def write_relayd(self, r: Relayd) -> None:
        d = self.dir(r)
        d.mkdir(exist_ok=True)
        (d / "relayd.toml").write_text(textwrap.dedent(f"""
            state_dir = "{d}/state"
            [control]
            socket = "{d}/control.sock"
            [logging]
            level = "warning"
            [listeners.web]
            bind = "127.0.0.1:{r.port}"
            backlog = 4096
            [auth.users]
            method = "basic"
            [components.proxy]
            kind = "http_proxy"
            auth = "users"
            [components.proxy.services.bench]
            listeners = ["web"]
            from = "/"
            to = "http://127.0.0.1:{BACKEND}"
        """))
        (d / "state").mkdir(exist_ok=True)
        self.origins[r.name] = r.prepare(d / "state")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if match is None:
        raise SystemExit(f"cannot parse wrk latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(url: str, duration: int, auth: str) -> tuple[dict[str, float], str]:
    out = subprocess.run(["wrk", "-t1", "-c64", f"-d{duration}s", "--latency", "--timeout", "5s",
                          "-H", f"Authorization: {auth}", url], capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])}  # type: ignore[index]
    result["requests"] = float(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    result["p50_ms"] = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M)[1])  # type: ignore[index]
    result["p99_ms"] = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M)[1])  # type: ignore[index]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    scale = {"B": 1 / (1 << 20), "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}[transfer[2]]  # type: ignore[index]
    result["mib_s"] = float(transfer[1]) * scale  # type: ignore[index]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    result["non2xx"] = float(non2xx[1]) if non2xx else 0.0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["socket_errors"] = float(sum(int(x) for x in errors.groups())) if errors else 0.0
    return result, out


def check(name: str, port: int, auth: str, body_1m: bytes, relayd: bool) -> None:
    """One request per path with http.client: the right status and the exact bodies."""
    def get(path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    status, body = get("/", {"Authorization": auth})
    if (status, body) != (200, b"ok"):
        raise SystemExit(f"{name}: GET / answered {status} {body[:200]!r}")
    status, body = get("/1m", {"Authorization": auth})
    if status != 200 or body != body_1m:
        raise SystemExit(f"{name}: GET /1m answered {status}, {len(body)} bytes, sha256 "
                         f"{hashlib.sha256(body).hexdigest()[:16]} (want {hashlib.sha256(body_1m).hexdigest()[:16]})")
    if relayd:
        status, _ = get("/", {})
        if status != 401:
            raise SystemExit(f"{name}: GET / without credentials answered {status}, not 401")


def measure(services: Services, name: str, port: int, path: str, duration: int, auth: str,
            relayd: bool) -> dict[str, float]:
    pids = tree(services.procs[name].pid)
    backend = tree(services.procs["backend"].pid)
    before, backend_before = cpu(pids), cpu(backend)
    user_before, system_before = cpu_split(pids)
    busy_before, total_before = host_busy()
    kids_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r, out = wrk(f"http://127.0.0.1:{port}{path}", duration, auth)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, total = host_busy()
    r["cpu_us_per_req"] = (cpu(pids) - before) / r["requests"] * 1e6
    user, system = cpu_split(pids)  # the kernel's share: syscalls, and loopback TCP delivery
    r["user_us_per_req"] = (user - user_before) / TICK / r["requests"] * 1e6
    r["system_us_per_req"] = (system - system_before) / TICK / r["requests"] * 1e6
    r["proxy_cores"] = (cpu(pids) - before) / duration
    r["backend_cores"] = (cpu(backend) - backend_before) / duration
    r["wrk_cores"] = (kids.ru_utime + kids.ru_stime - kids_before.ru_utime - kids_before.ru_stime) / duration
    r["host_busy_cores"] = (busy - busy_before) / (total - total_before) * (os.cpu_count() or 1)
    r["loadavg_1m"] = os.getloadavg()[0]
    if r["non2xx"] or r["socket_errors"]:
        print(f"{name} {path}: {r['non2xx']:.0f} non-2xx responses, {r['socket_errors']:.0f} socket errors:\n{out}",
              flush=True)
        if relayd:
            raise SystemExit(f"{name} {path}: wrk saw errors (above); stopping")
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--install", action="store_true", help="apt-get install nginx-light caddy wrk if missing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--out", type=Path, help="write raw results as JSON")
    p.add_argument("--small-only", action="store_true", help="measure the small response only (no 1 MiB rows)")
    p.add_argument("--rev", metavar="REV",
                   help="run the relayd target from a temporary worktree of REV instead of the checkout")
    p.add_argument("--baseline", metavar="REV",
                   help="also run relayd at git revision REV (from a temporary worktree) as target relayd@REV")
    args = p.parse_args()
    if args.install:
        install()
    for tool in ("nginx", "caddy", "wrk"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run with --install (as root)")
    auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    work = Path(tempfile.mkdtemp(prefix="relayd-bench-http-"))
    work.chmod(0o755)  # nginx workers (user nobody) read the 1 MiB file
    worktrees: list[Path] = []

    def checkout(rev: str, name: str) -> tuple[Path, str]:
        commit = git("rev-parse", "--verify", rev + "^{commit}")
        worktrees.append(work / name)
        git("worktree", "add", "--detach", str(worktrees[-1]), commit)
        return worktrees[-1] / "daemon", commit

    if args.rev:
        relayds = [Relayd("relayd", RELAYD, *checkout(args.rev, "rev"))]
    else:
        dirty = git("status", "--porcelain", "--", "daemon")
        if dirty:
            print(f"warning: daemon/ has uncommitted changes, which relayd runs (--rev pins a commit):\n{dirty}",
                  flush=True)
        relayds = [Relayd("relayd", RELAYD, ROOT / "daemon", git("rev-parse", "HEAD") + ("+dirty" if dirty else ""))]
    if args.baseline:
        daemon_dir, commit = checkout(args.baseline, "baseline")
        relayds.append(Relayd(f"relayd@{commit[:7]}", RELAYD_BASELINE, daemon_dir, commit))
    services = Services(work, relayds)
    results: dict[str, list[dict[str, float]]] = {}
    meta: dict[str, object] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds, "duration_s": args.duration, "cpus": os.cpu_count(),
        "python": platform.python_version(), "kernel": platform.release(),
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False).stderr.strip(),
        "caddy": subprocess.run(["caddy", "version"], capture_output=True, text=True, check=False).stdout.strip(),
        "wrk": "wrk -t1 -c64 --latency --timeout 5s",
        "relayd": {r.name: {"commit": r.commit} for r in relayds},
    }
    try:
        services.start()
        for r in relayds:
            meta["relayd"][r.name].update(imported_from=services.origins[r.name],  # type: ignore[index]
                                          httptools_loaded=services.httptools[r.name])
        targets = {"nginx": NGINX, "caddy": CADDY, **{r.name: r.port for r in relayds}}
        body_1m = (work / "www" / "1m").read_bytes()
        for name, port in targets.items():  # warm-up, also checks auth and bodies end to end
            check(name, port, auth, body_1m, name.startswith("relayd"))
            for path in ("/", "/1m")[:1 if args.small_only else 2]:
                measure(services, name, port, path, 2, auth, name.startswith("relayd"))
        for round_ in range(args.rounds):
            for name, port in targets.items():
                for label, path in (("small", "/"), ("1MiB", "/1m"))[:1 if args.small_only else 2]:
                    r = measure(services, name, port, path, args.duration, auth, name.startswith("relayd"))
                    results.setdefault(f"{name} {label}", []).append(r)
                    print(f"round {round_ + 1} {name:15} {label:5} {r['rps']:9.0f} req/s {r['mib_s']:8.1f} MiB/s "
                          f"p50 {r['p50_ms']:6.2f} ms p99 {r['p99_ms']:6.2f} ms "
                          f"{r['cpu_us_per_req']:6.0f} us/req (user {r['user_us_per_req']:.0f}, "
                          f"sys {r['system_us_per_req']:.0f})  proxy {r['proxy_cores']:.2f} "
                          f"host busy {r['host_busy_cores']:.2f} cores, load {r['loadavg_1m']:.1f}", flush=True)
        for name, port in targets.items():  # still answering correctly after the load
            check(name, port, auth, body_1m, name.startswith("relayd"))
        meta["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    finally:
        services.stop()
        for path in worktrees:
            git("worktree", "remove", "--force", str(path))
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(table(results, list(targets)))
    return 0


def table(results: dict[str, list[dict[str, float]]], targets: list[str]) -> str:
    def med(key: str, metric: str) -> float:
        return statistics.median(r[metric] for r in results[key])

    def cell(key: str, metric: str, fmt: str) -> str:
        if key not in results:
            return "-"
        values = [r[metric] for r in results[key]]
        return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    lines = ["| target | small req/s | p50 ms | p99 ms | CPU us/req | 1 MiB MiB/s | 1 MiB CPU us/req |",
             "|---|---|---|---|---|---|---|"]
    for name in targets:
        lines.append(f"| {name} | {cell(name + ' small', 'rps', '.0f')} | {cell(name + ' small', 'p50_ms', '.2f')} | "
                     f"{cell(name + ' small', 'p99_ms', '.2f')} | {cell(name + ' small', 'cpu_us_per_req', '.0f')} | "
                     f"{cell(name + ' 1MiB', 'mib_s', '.0f')} | {cell(name + ' 1MiB', 'cpu_us_per_req', '.0f')} |")
    lines += ["", "ratios of medians: small req/s, small CPU us/req, 1 MiB MiB/s, 1 MiB CPU us/req"]
    relayds = [t for t in targets if t.startswith("relayd")]
    pairs = [(r, o) for r in relayds for o in ("nginx", "caddy")]
    pairs += [(relayds[0], o) for o in relayds[1:]]
    for a, b in pairs:
        ratios = [med(f"{a} {label}", metric) / med(f"{b} {label}", metric)
                  for label, metric in (("small", "rps"), ("small", "cpu_us_per_req"),
                                        ("1MiB", "mib_s"), ("1MiB", "cpu_us_per_req"))
                  if f"{a} {label}" in results]
        lines.append(f"{a} / {b}: " + ", ".join(f"{x:.2f}" for x in ratios))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
