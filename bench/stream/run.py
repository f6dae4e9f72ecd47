"""Throughput of relayd's stream data plane (iperf3 over 127.0.0.1), same run as the references.

Paths (each a real process; iperf3 -s is the application, iperf3 -c the client):
  direct                       iperf3 -c -> iperf3 -s
  haproxy 1 thread             -> haproxy (mode tcp, nbthread 1, default 16 KiB buffers) ->
  haproxy 1t bufsize 256K      -> haproxy (tune.bufsize 262144) ->
  haproxy 1t 256K splice-auto  -> haproxy (tune.bufsize 262144, option splice-auto) ->
  relayd plain                 -> relayd stream session (PROD, security plain: splice pump) ->
  relayd plain, event loop     -> the same with splice = false (asyncio BufferedProtocol pump)
  relayd rate R kB/s           relayd plain session with rate = R kB/s (accuracy of the limit)
  stunnel TLS chain            -> stunnel client (plain->TLS) -> stunnel server (TLS->plain) ->
  relayd TLS chain             -> relayd CONS (plain->mutual TLS) -> relayd PROD (mutual TLS->plain) ->
                               (the threaded TLS pump, relayd.pump.tls)
  relayd TLS chain, event loop the same with splice = false (uvloop's SSL transport, ProtocolPump)
Sessions are made with `relayctl stream` like a user would. Rounds are interleaved (every path
once per round); medians [min-max] are reported with the forwarders' CPU (utime+stime of every
thread of the forwarder processes), CPU per Gbit, the host's steal and load average.

Never fails half-way: a peer that cannot start is reported (with its log) and its paths skipped;
a run that fails three times is reported and the bench goes on. Before each run it waits until
iperf3 -s has finished the previous test: a client that reaches a busy iperf3 through stunnel is
told "control socket has closed unexpectedly" (iperf3 refuses with one byte then closes without
reading, the kernel answers the unread bytes with a reset, and stunnel drops the byte when it sees
the reset) instead of "busy", which is why this bench used to stop at the stunnel chain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

BIN = Path(sys.executable).parent
IPERF = 19700
CLK = os.sysconf("SC_CLK_TCK")
RATES = [50_000, 250_000]  # kB/s: 0.4 and 2 Gbit/s
BEST_HAPROXY = "haproxy 1t 256K splice-auto"
BUSY_STATES = {"01", "08"}  # ESTABLISHED, CLOSE_WAIT: iperf3 -s still holds a test's socket


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / CLK
        except (OSError, IndexError):
            pass
    return total


def cpu_ticks() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def tcp_sockets(port: int) -> list[str]:
    """States (hex, as in /proc/net/tcp) of the sockets whose local port is `port`."""
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                states.append(fields[3])
    return states


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class PeerFailed(Exception):
    pass


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.paths: dict[str, tuple[int, list[int], float | None]] = {}  # name -> (port, pids, rate B/s)
        self.skipped: dict[str, str] = {}  # path -> why

    def spawn(self, *cmd: str) -> subprocess.Popen:
        with open(self.tmp / f"{Path(cmd[0]).name}-{len(self.procs)}.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log = log.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def listening(self, proc: subprocess.Popen, *ports: int) -> None:
        if not wait_until(lambda: proc.poll() is not None or all("0A" in tcp_sockets(p) for p in ports), 30) \
                or proc.poll() is not None:
            tail = Path(proc.log).read_text(errors="replace")[-1500:]  # type: ignore[attr-defined]
            raise PeerFailed(f"{proc.args[0]} not listening on {ports} (exit {proc.poll()}): {tail}")

    def peer(self, names: list[str], start) -> None:  # start: a callable adding paths
        try:
            start()
        except (PeerFailed, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            for name in names:
                self.skipped[name] = str(exc).strip()[-2000:]
                self.paths.pop(name, None)
            print(f"skipped {', '.join(names)}: {exc}", file=sys.stderr)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    # -- services ------------------------------------------------------------------------------

    def certs(self) -> None:
        self.ca = {"prod": trustme.CA(), "cons": trustme.CA()}
        for side, other in (("prod", "cons"), ("cons", "prod")):
            self.ca[side].issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
                str(self.tmp / f"{side}.pem"))
            self.ca[other].cert_pem.write_to_path(str(self.tmp / f"{side}-peer-ca.pem"))

    def haproxy(self, name: str, port: int, extra_global: str = "", extra_proxy: str = "") -> None:
        cfg = self.tmp / f"haproxy-{port}.cfg"
        cfg.write_text(f"""global
    nbthread 1
    maxconn 4000
{extra_global}
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen fwd
    bind 127.0.0.1:{port}
    server s1 127.0.0.1:{IPERF}
{extra_proxy}
""")
        proc = self.spawn("haproxy", "-db", "-f", str(cfg))
        self.listening(proc, port)
        self.paths[name] = (port, [proc.pid], None)

    def stunnel(self) -> None:
        pids = []
        for side, accept, connect, client in (("prod", 19751, IPERF, "no"), ("cons", 19750, 19751, "yes")):
            cfg = self.tmp / f"stunnel-{side}.conf"
            cfg.write_text(f"""foreground = yes
pid =
syslog = no
debug = 3
[{side}]
client = {client}
accept = 127.0.0.1:{accept}
connect = 127.0.0.1:{connect}
cert = {self.tmp / f"{side}.pem"}
CAfile = {self.tmp / f"{side}-peer-ca.pem"}
verifyChain = yes
""")
            proc = self.spawn("stunnel4", str(cfg))
            self.listening(proc, accept)
            pids.append(proc.pid)
        self.paths["stunnel TLS chain"] = (19750, pids, None)

    def relayd(self, name: str, ctl: int, ports: str, extra: str = "") -> tuple[subprocess.Popen, str]:
        conf = self.tmp / name
        conf.mkdir()
        sock = str(self.tmp / f"{name}.sock")
        (conf / "relayd.toml").write_text(f"""state_dir = "{self.tmp / name / 'state'}"
[control]
socket = "{sock}"
[logging]
level = "warning"
[listeners.ctl]
bind = "127.0.0.1:{ctl}"
[auth.open]
method = "none"
[components.s2cs]
kind = "stream"
listener = "ctl"
auth = "open"
data_bind = "127.0.0.1"
ports = "{ports}"
allowed_targets = ["127.0.0.0/8"]
rate_unit = "kB/s"
{extra}
""")
        proc = self.spawn(str(BIN / "relayd"), "--config", str(conf))
        ok = wait_until(lambda: proc.poll() is not None or not subprocess.run(
            [str(BIN / "relayctl"), "--socket", sock, "status"], capture_output=True, check=False).returncode, 30)
        if not ok or proc.poll() is not None:
            raise PeerFailed(f"relayd {name} did not start: {Path(proc.log).read_text()[-1500:]}")  # type: ignore[attr-defined]
        return proc, sock

    def session(self, role: str, ctl: int, targets: str, rate: int = 0, uid: str | None = None) -> tuple[int, str]:
        if role == "PROD":
            host, _, ports = targets.rpartition(":")
            args = ["inbound-request", "--remote_ip", host, "--receiver_ports", ports]
        else:
            args = ["outbound-request", uid or "", targets]
        out = subprocess.run([str(BIN / "relayctl"), "stream", *args[:1], "--s2cs", f"127.0.0.1:{ctl}",
                              "--insecure", "--no-auth", "--num_conn", "1", "--rate", str(rate), "--json",
                              *args[1:]], capture_output=True, text=True, check=False)
        if out.returncode:
            raise PeerFailed(f"relayctl stream {args[0]}: {out.stderr}")
        data = json.loads(out.stdout)
        return int(data["listeners"][0].rsplit(":", 1)[1]), data

    def start(self) -> None:
        self.certs()
        iperf = self.spawn("iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF))
        self.listening(iperf, IPERF)  # without the application nothing can be measured: fatal
        self.paths["direct"] = (IPERF, [], None)
        self.peer(["haproxy 1 thread"], lambda: self.haproxy("haproxy 1 thread", 19701))
        self.peer(["haproxy 1t bufsize 256K"],
                  lambda: self.haproxy("haproxy 1t bufsize 256K", 19702, "    tune.bufsize 262144"))
        self.peer([BEST_HAPROXY], lambda: self.haproxy(BEST_HAPROXY, 19703, "    tune.bufsize 262144",
                                                       "    option splice-auto"))
        rated = [f"relayd rate {rate} kB/s" for rate in RATES]
        self.peer(["relayd plain", *rated], self._relayd_plain)
        self.peer(["relayd plain, event loop"], self._relayd_event_loop)
        self.peer(["stunnel TLS chain"], self.stunnel)
        self.peer(["relayd TLS chain"], lambda: self._relayd_tls(
            "relayd TLS chain", (19711, 19712), ("19730-19739", "19740-19749")))
        self.peer(["relayd TLS chain, event loop"], lambda: self._relayd_tls(
            "relayd TLS chain, event loop", (19714, 19715), ("19770-19779", "19780-19789"), "splice = false"))

    def _relayd_plain(self) -> None:
        plain, _ = self.relayd("plain", 19710, "19720-19729")
        port, _ = self.session("PROD", 19710, f"127.0.0.1:{IPERF}")
        self.paths["relayd plain"] = (port, [plain.pid], None)
        for rate in RATES:
            port, _ = self.session("PROD", 19710, f"127.0.0.1:{IPERF}", rate=rate)
            self.paths[f"relayd rate {rate} kB/s"] = (port, [plain.pid], rate * 1000.0)

    def _relayd_event_loop(self) -> None:
        loop, _ = self.relayd("event-loop", 19713, "19760-19769", "splice = false")
        port, _ = self.session("PROD", 19713, f"127.0.0.1:{IPERF}")
        self.paths["relayd plain, event loop"] = (port, [loop.pid], None)

    def _relayd_tls(self, name: str, ctls: tuple[int, int], ports: tuple[str, str], extra: str = "") -> None:
        tls = {}
        for side, ctl, side_ports in (("prod", ctls[0], ports[0]), ("cons", ctls[1], ports[1])):
            conf = (f'{extra}\nsecurity = "tls"\n[components.s2cs.tls]\ncert = "{self.tmp / f"{side}.pem"}"\n'
                    f'key = "{self.tmp / f"{side}.pem"}"\nca = "{self.tmp / f"{side}-peer-ca.pem"}"\n')
            tls[side], _ = self.relayd(f"{name}-{side}", ctl, side_ports, conf)
        port, inbound = self.session("PROD", ctls[0], f"127.0.0.1:{IPERF}")
        port, _ = self.session("CONS", ctls[1], inbound["listeners"][0], uid=inbound["uid"])
        self.paths[name] = (port, [tls["prod"].pid, tls["cons"].pid], None)

    # -- measuring -------------------------------------------------------------------------

    def run_one(self, name: str, parallel: int, seconds: int) -> dict:
        port, pids, _ = self.paths[name]
        error = ""
        for _attempt in range(3):
            # iperf3 -s serves one test at a time: wait until it let go of the last one
            if not wait_until(lambda: not BUSY_STATES & set(tcp_sockets(IPERF)), 60):
                print(f"{name}: iperf3 -s still busy after 60 s, trying anyway", file=sys.stderr)
            cpu0, ticks0, t0 = cpu_seconds(pids), cpu_ticks(), time.monotonic()
            load = float(Path("/proc/loadavg").read_text().split()[0])
            out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-O", "1",
                                  "-P", str(parallel), "-J"], capture_output=True, text=True,
                                 timeout=seconds + 60, check=False)
            wall = time.monotonic() - t0
            cpu = cpu_seconds(pids) - cpu0
            ticks = [b - a for a, b in zip(ticks0, cpu_ticks(), strict=False)]
            try:
                data = json.loads(out.stdout)
            except json.JSONDecodeError:
                data = {"error": f"iperf3 exit {out.returncode}: {out.stderr.strip()[-300:]}"}
            if "error" not in data:
                gbps = data["end"]["sum_received"]["bits_per_second"] / 1e9
                return {"path": name, "P": parallel, "gbps": gbps, "cpu": 100 * cpu / wall if pids else None,
                        "steal": 100 * ticks[7] / max(1, sum(ticks)), "load": load}
            error = data["error"]
            print(f"{name} P{parallel}: {error} (attempt {_attempt + 1})", file=sys.stderr)
        return {"path": name, "P": parallel, "error": error}


def fmt(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def table(results: list[dict], bench: Bench) -> str:
    ok = [r for r in results if "gbps" in r]
    keys = list(dict.fromkeys((r["path"], r["P"]) for r in results))
    med = {k: statistics.median(r["gbps"] for r in ok if (r["path"], r["P"]) == k)
           for k in keys if any((r["path"], r["P"]) == k for r in ok)}
    rows = [("| path | P | Gbit/s | ÷ direct | ÷ HAProxy 1t 256K splice-auto | ÷ stunnel | forwarder CPU % "
             "| CPU ms per Gbit | steal % | load |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ratio(key: tuple[str, int], ref: str) -> str:
        base = med.get((ref, key[1]))
        return f"{med[key] / base:.2f}" if base else "–"

    for key in keys:
        runs = [r for r in ok if (r["path"], r["P"]) == key]
        failed = len([r for r in results if (r["path"], r["P"]) == key and "error" in r])
        name, p = key
        if not runs:
            rows.append(f"| {name} | {p} | failed ({failed} runs) | | | | | | | |")
            continue
        cpu = [r["cpu"] for r in runs if r["cpu"] is not None]
        per_gbit = [10 * r["cpu"] / r["gbps"] for r in runs if r["cpu"]]  # (cpu% / 100) s per Gbit, in ms
        rate = bench.paths.get(name, (0, [], None))[2]
        label = name + (f" (limit {rate * 8 / 1e9:.2f}: {med[key] / (rate * 8 / 1e9):.3f}×)" if rate else "")
        label += f" ({failed} failed)" if failed else ""
        tls = "TLS" in name
        rows.append(f"| {label} | {p} | {fmt([r['gbps'] for r in runs])} | {ratio(key, 'direct')} | "
                    f"{ratio(key, BEST_HAPROXY) if not tls else '–'} | "
                    f"{ratio(key, 'stunnel TLS chain') if tls else '–'} | "
                    f"{fmt(cpu, 0) if cpu else '–'} | {fmt(per_gbit, 0) if per_gbit else '–'} | "
                    f"{fmt([r['steal'] for r in runs], 1)} | {fmt([r['load'] for r in runs], 1)} |")
    for name, why in bench.skipped.items():
        rows.append(f"\nskipped {name}: {why.splitlines()[0] if why else '?'}")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="write raw results as JSON here")
    ap.add_argument("--only", nargs="*", help="paths to run (default: all; direct and the best HAProxy always)")
    args = ap.parse_args()
    if not shutil.which("iperf3"):
        raise SystemExit("iperf3 is missing: run bench/stream/run.sh, which installs it")
    tmp = Path(tempfile.mkdtemp(prefix="relayd-bench-stream-"))
    bench = Bench(tmp)
    results: list[dict] = []
    env = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": Path("/proc/loadavg").read_text().strip()}
    print(f"environment: {env}", file=sys.stderr)
    try:
        bench.start()
        names = [n for n in bench.paths if not args.only or n in args.only or n in ("direct", BEST_HAPROXY)]
        for rnd in range(args.rounds):
            for name in names:
                for p in (1, 4):
                    r = bench.run_one(name, p, args.seconds)
                    r["round"] = rnd
                    results.append(r)
                    if "gbps" in r:
                        print(f"round {rnd} {name:28} P{p}: {r['gbps']:6.2f} Gbit/s"
                              + (f"  cpu {r['cpu']:.0f}%" if r["cpu"] is not None else "")
                              + f"  steal {r['steal']:.1f}%  load {r['load']:.1f}", file=sys.stderr)
    finally:
        bench.stop()
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "skipped": bench.skipped, "results": results}, indent=1))
    print(table(results, bench))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
