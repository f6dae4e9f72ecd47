"""Throughput of relayd's stream data plane (iperf3 over 127.0.0.1), same run as the references.

Paths (each a real process; iperf3 -s is the application, iperf3 -c the client):
  direct                     iperf3 -c -> iperf3 -s
  haproxy 1 thread           -> haproxy (mode tcp, nbthread 1, default 16 KiB buffers) ->
  haproxy 1t bufsize 256K    -> haproxy (tune.bufsize 262144) ->
  relayd plain               -> relayd stream session (PROD, security plain) ->
  stunnel TLS chain          -> stunnel client (plain->TLS) -> stunnel server (TLS->plain) ->
  relayd TLS chain           -> relayd CONS (plain->mutual TLS) -> relayd PROD (mutual TLS->plain) ->
  relayd rate R              relayd plain session with rate = R kB/s (accuracy of the limit)
Sessions are made with `relayctl stream` like a user would. Rounds are interleaved (every path
once per round); medians [min-max] are reported with the forwarder's CPU (whole process tree).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IPERF = 19700
CLK = os.sysconf("SC_CLK_TCK")
RATES = [50_000, 250_000]  # kB/s: 0.4 and 2 Gbit/s


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / CLK
        except (OSError, IndexError):
            pass
    return total


def steal() -> int:
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[8])


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.paths: dict[str, tuple[int, list[int], float | None]] = {}  # name -> (port, pids, rate B/s)

    def spawn(self, *cmd: str, **kw) -> subprocess.Popen:
        log = open(self.tmp / f"{Path(cmd[0]).name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

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

    def haproxy(self, name: str, port: int, extra_global: str = "") -> None:
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
""")
        proc = self.spawn("haproxy", "-db", "-f", str(cfg))
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
            pids.append(self.spawn("stunnel4", str(cfg)).pid)
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
{extra}
""")
        proc = self.spawn(str(BIN / "relayd"), "--config", str(conf))
        deadline = time.monotonic() + 30
        while subprocess.run([str(BIN / "relayctl"), "--socket", sock, "status"], capture_output=True).returncode:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"relayd {name} did not start: {(self.tmp / name).glob('*')}")
            time.sleep(0.2)
        return proc, sock

    def session(self, role: str, ctl: int, targets: str, rate: int = 0, uid: str | None = None) -> dict:
        if role == "PROD":
            host, _, ports = targets.rpartition(":")
            args = ["inbound-request", "--remote_ip", host, "--receiver_ports", ports]
        else:
            args = ["outbound-request", uid or "", targets]
        out = subprocess.run([str(BIN / "relayctl"), "stream", *args[:1], "--s2cs", f"127.0.0.1:{ctl}",
                              "--insecure", "--no-auth", "--num_conn", "1", "--rate", str(rate), "--json",
                              *args[1:]], capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(out.stderr)
        return json.loads(out.stdout)

    def start(self) -> None:
        self.certs()
        self.spawn("iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF))
        self.paths["direct"] = (IPERF, [], None)
        self.haproxy("haproxy 1 thread", 19701)
        self.haproxy("haproxy 1t bufsize 256K", 19702, "    tune.bufsize 262144")
        plain, _ = self.relayd("plain", 19710, "19720-19729")
        inbound = self.session("PROD", 19710, f"127.0.0.1:{IPERF}")
        self.paths["relayd plain"] = (int(inbound["listeners"][0].rsplit(":", 1)[1]), [plain.pid], None)
        for rate in RATES:
            limited = self.session("PROD", 19710, f"127.0.0.1:{IPERF}", rate=rate)
            self.paths[f"relayd rate {rate} kB/s"] = (
                int(limited["listeners"][0].rsplit(":", 1)[1]), [plain.pid], rate * 1000.0)
        self.stunnel()
        tls = {}
        for side, ctl, ports in (("prod", 19711, "19730-19739"), ("cons", 19712, "19740-19749")):
            extra = (f'security = "tls"\n[components.s2cs.tls]\ncert = "{self.tmp / f"{side}.pem"}"\n'
                     f'key = "{self.tmp / f"{side}.pem"}"\nca = "{self.tmp / f"{side}-peer-ca.pem"}"\n')
            tls[side], _ = self.relayd(f"tls-{side}", ctl, ports, extra)
        inbound = self.session("PROD", 19711, f"127.0.0.1:{IPERF}")
        outbound = self.session("CONS", 19712, inbound["listeners"][0], uid=inbound["uid"])
        self.paths["relayd TLS chain"] = (int(outbound["listeners"][0].rsplit(":", 1)[1]),
                                          [tls["prod"].pid, tls["cons"].pid], None)

    # -- measuring -------------------------------------------------------------------------

    def run_one(self, name: str, parallel: int, seconds: int) -> dict:
        port, pids, _ = self.paths[name]
        for _attempt in range(20):  # iperf3 -s serves one test at a time: wait for the last to end
            cpu0, st0, t0 = cpu_seconds(pids), steal(), time.monotonic()
            out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-O", "1",
                                  "-P", str(parallel), "-J"], capture_output=True, text=True, timeout=seconds + 60)
            wall = time.monotonic() - t0
            cpu = cpu_seconds(pids) - cpu0
            data = json.loads(out.stdout)
            if "busy" not in data.get("error", ""):
                break
            time.sleep(0.5)
        if "error" in data:
            raise SystemExit(f"{name}: {data['error']}")
        gbps = data["end"]["sum_received"]["bits_per_second"] / 1e9
        return {"path": name, "P": parallel, "gbps": gbps, "cpu": 100 * cpu / wall if pids else None,
                "steal_ticks": steal() - st0}


def fmt(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def table(results: list[dict], bench: Bench) -> str:
    rows = ["| path | P | Gbit/s | ÷ direct | ÷ haproxy 1t | forwarder CPU % | Gbit/s per forwarder core |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    med = {}
    for (name, p) in dict.fromkeys((r["path"], r["P"]) for r in results):
        runs = [r for r in results if r["path"] == name and r["P"] == p]
        med[(name, p)] = statistics.median(r["gbps"] for r in runs)
    for (name, p) in dict.fromkeys((r["path"], r["P"]) for r in results):
        runs = [r for r in results if r["path"] == name and r["P"] == p]
        g = [r["gbps"] for r in runs]
        cpu = [r["cpu"] for r in runs if r["cpu"] is not None]
        per_core = [r["gbps"] / (r["cpu"] / 100) for r in runs if r["cpu"]]
        rate = bench.paths[name][2]
        ratio_d = med[(name, p)] / med[("direct", p)]
        ratio_h = med[(name, p)] / med[("haproxy 1 thread", p)]
        extra = f" (limit {rate * 8 / 1e9:.2f}: {med[(name, p)] / (rate * 8 / 1e9):.3f}×)" if rate else ""
        rows.append(f"| {name}{extra} | {p} | {fmt(g)} | {ratio_d:.2f} | {ratio_h:.2f} | "
                    f"{fmt(cpu, 0) if cpu else '–'} | {fmt(per_core, 1) if per_core else 'n/a'} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="write raw results as JSON here")
    ap.add_argument("--only", nargs="*", help="paths to run (default: all)")
    args = ap.parse_args()
    for tool in ("haproxy", "stunnel4", "iperf3"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: run bench/stream/run.sh, which installs it")
    tmp = Path(tempfile.mkdtemp(prefix="relayd-bench-stream-"))
    bench = Bench(tmp)
    results: list[dict] = []
    try:
        bench.start()
        names = [n for n in bench.paths if not args.only or n in args.only or n in ("direct", "haproxy 1 thread")]
        for rnd in range(args.rounds):
            for name in names:
                for p in (1, 4):
                    r = bench.run_one(name, p, args.seconds)
                    r["round"] = rnd
                    results.append(r)
                    print(f"round {rnd} {name:28} P{p}: {r['gbps']:6.2f} Gbit/s"
                          + (f"  cpu {r['cpu']:.0f}%" if r["cpu"] is not None else ""), file=sys.stderr)
    finally:
        bench.stop()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(table(results, bench))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
