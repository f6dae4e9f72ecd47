#!/usr/bin/env python3
"""relayd http_proxy vs nginx and Caddy as reverse proxies to the same nginx backend.

    sudo .venv/bin/python bench/http_proxy/run.py [--install] [--rounds 3] [--duration 10] [--out FILE]

Targets (all on 127.0.0.1, all proxying to one nginx backend: 'ok' on /, 1 MiB on /1m):
  nginx   1 worker, keepalive upstream pool (the perf-anchors configuration)
  caddy   reverse_proxy with a keep-alive pool, no TLS, no admin API
  relayd  http_proxy with HTTP Basic auth (argon2id users) and per-user/endpoint counting on

Load: wrk -t1 -c64 --latency (every target gets the same Authorization header; nginx and Caddy
ignore it). Rounds are interleaved so drift spreads over all targets; the table shows medians
and [min-max]. CPU us/req is the proxy's utime+stime (whole process tree) over the run.
--install apt-installs nginx-light, caddy and wrk (benchmark-only tools, never in CI).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
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
VENV = ROOT / ".venv" / "bin"
TICK = os.sysconf("SC_CLK_TCK")
BACKEND, NGINX, CADDY, RELAYD = 19101, 19111, 19112, 19113
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


def cpu(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])
    return total / TICK


class Services:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: dict[str, subprocess.Popen] = {}

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
        (w / "relayd").mkdir(exist_ok=True)
        (w / "relayd" / "relayd.toml").write_text(textwrap.dedent(f"""
            state_dir = "{w}/state"
            [control]
            socket = "{w}/control.sock"
            [logging]
            level = "warning"
            [listeners.web]
            bind = "127.0.0.1:{RELAYD}"
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
        sys.path.insert(0, str(ROOT / "daemon"))
        from relayd.auth.users import UserExists, UserStore

        try:
            UserStore(w / "state" / "users-users.sqlite3").add(USER, PASSWORD)
        except UserExists:
            pass
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAYD_", "NOTIFY_", "LISTEN_"))}
        self.procs["backend"] = subprocess.Popen(["nginx", "-c", str(w / "backend.conf")])
        self.procs["nginx"] = subprocess.Popen(["nginx", "-c", str(w / "proxy.conf")])
        self.procs["caddy"] = subprocess.Popen(["caddy", "run", "--config", str(w / "Caddyfile"),
                                                "--adapter", "caddyfile"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs["relayd"] = subprocess.Popen([str(VENV / "relayd"), "--config", str(w / "relayd")], env=env)
        for port in (BACKEND, NGINX, CADDY, RELAYD):
            wait_port(port)

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


def wrk(url: str, duration: int, auth: str) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t1", "-c64", f"-d{duration}s", "--latency", "--timeout", "5s",
                          "-H", f"Authorization: {auth}", url], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"{url}: non-2xx responses:\n{out}")
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])}  # type: ignore[index]
    result["p50_ms"] = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M)[1])  # type: ignore[index]
    result["p99_ms"] = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M)[1])  # type: ignore[index]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    scale = {"B": 1 / (1 << 20), "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}[transfer[2]]  # type: ignore[index]
    result["mib_s"] = float(transfer[1]) * scale  # type: ignore[index]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--install", action="store_true", help="apt-get install nginx-light caddy wrk if missing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--out", type=Path, help="write raw results as JSON")
    args = p.parse_args()
    if args.install:
        install()
    for tool in ("nginx", "caddy", "wrk"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run with --install (as root)")
    auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    work = Path(tempfile.mkdtemp(prefix="relayd-bench-http-"))
    work.chmod(0o755)  # nginx workers (user nobody) read the 1 MiB file
    services = Services(work)
    results: dict[str, list[dict[str, float]]] = {}
    try:
        services.start()
        targets = {"nginx": NGINX, "caddy": CADDY, "relayd": RELAYD}
        for name, port in targets.items():  # warm-up, also checks auth works end to end
            for path in ("/", "/1m"):
                wrk(f"http://127.0.0.1:{port}{path}", 2, auth)
        for round_ in range(args.rounds):
            for name, port in targets.items():
                for label, path in (("small", "/"), ("1MiB", "/1m")):
                    pids = tree(services.procs[name].pid)
                    before = cpu(pids)
                    r = wrk(f"http://127.0.0.1:{port}{path}", args.duration, auth)
                    r["cpu_us_per_req"] = (cpu(pids) - before) / (r["rps"] * args.duration) * 1e6
                    results.setdefault(f"{name} {label}", []).append(r)
                    print(f"round {round_ + 1} {name:7} {label:5} {r['rps']:9.0f} req/s {r['mib_s']:8.1f} MiB/s "
                          f"p50 {r['p50_ms']:6.2f} ms p99 {r['p99_ms']:6.2f} ms "
                          f"{r['cpu_us_per_req']:6.0f} us/req", flush=True)
    finally:
        services.stop()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


def table(results: dict[str, list[dict[str, float]]]) -> str:
    def med(key: str, metric: str) -> float:
        return statistics.median(r[metric] for r in results[key])

    def cell(key: str, metric: str, fmt: str) -> str:
        values = [r[metric] for r in results[key]]
        return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    lines = ["| target | small req/s | p50 ms | p99 ms | CPU us/req | 1 MiB MiB/s | 1 MiB CPU us/req |",
             "|---|---|---|---|---|---|---|"]
    for name in ("nginx", "caddy", "relayd"):
        lines.append(f"| {name} | {cell(name + ' small', 'rps', '.0f')} | {cell(name + ' small', 'p50_ms', '.2f')} | "
                     f"{cell(name + ' small', 'p99_ms', '.2f')} | {cell(name + ' small', 'cpu_us_per_req', '.0f')} | "
                     f"{cell(name + ' 1MiB', 'mib_s', '.0f')} | {cell(name + ' 1MiB', 'cpu_us_per_req', '.0f')} |")
    rs, rb = med("relayd small", "rps"), med("relayd 1MiB", "mib_s")
    lines.append("")
    lines.append(f"relayd / nginx: {rs / med('nginx small', 'rps'):.2f} (req/s), {rb / med('nginx 1MiB', 'mib_s'):.2f} (MiB/s)")
    lines.append(f"relayd / Caddy: {rs / med('caddy small', 'rps'):.2f} (req/s), {rb / med('caddy 1MiB', 'mib_s'):.2f} (MiB/s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
