"""Where the relayd TLS chain's CPU goes: py-spy over both relayd processes under iperf3.

    .venv/bin/python bench/stream/profile.py [--seconds 15] [--parallel 1] [--event-loop]

Starts iperf3 -s and the same CONS -> PROD chain as run.py (``--event-loop``: ``splice = false``,
uvloop's SSL transport), runs iperf3 -c through it and samples both processes with
``py-spy record --nonblocking`` (threads while on a CPU, without pausing
them). Prints, per process, the share of samples by innermost Python frame: for a thread blocked
in a socket call or in OpenSSL (GIL released) that is the call, e.g. ``recv_into``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run  # bench/stream/run.py, next to this file


def leaf_shares(raw: Path) -> list[tuple[str, float]]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        func, _, where = stack.split(";")[-1].partition(" (")  # "recv_into (/path/tls.py:70)"
        counts[f"{func} ({where.rpartition('/')[2]}" if where else func] += int(n)
    total = sum(counts.values()) or 1
    return [(name, 100 * n / total) for name, n in counts.most_common(12)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--event-loop", action="store_true", help="splice = false: the event-loop pump")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="relayd-profile-stream-"))
    bench = run.Bench(tmp)
    client: subprocess.Popen | None = None
    try:
        bench.certs()
        iperf = bench.spawn("iperf3", "-s", "-B", "127.0.0.1", "-p", str(run.IPERF))
        bench.listening(iperf, run.IPERF)
        name = "relayd TLS chain"
        bench._relayd_tls(name, (19711, 19712), ("19730-19739", "19740-19749"),
                          "splice = false" if args.event_loop else "")
        port, pids, _ = bench.paths[name]
        client = subprocess.Popen(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(args.seconds + 4),
                                   "-P", str(args.parallel), "-J"], stdout=subprocess.PIPE, text=True)
        spies = {role: subprocess.Popen([str(run.BIN / "py-spy"), "record", "--nonblocking", "-r", "200", "-p",
                                         str(pid), "-d", str(args.seconds), "-f", "raw", "-o",
                                         str(tmp / f"{role}.txt")], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                 for role, pid in zip(("PROD", "CONS"), pids, strict=True)}
        for spy in spies.values():
            spy.wait()
        out, _ = client.communicate(timeout=args.seconds + 60)
        gbps = run.json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
        print(f"{'event loop' if args.event_loop else 'threads'}, P{args.parallel}: {gbps:.2f} Gbit/s")
        for role in spies:
            print(f"\n{role} (PROD: TLS -> plain, CONS: plain -> TLS), samples by innermost frame:")
            for leaf, share in leaf_shares(tmp / f"{role}.txt"):
                print(f"  {share:5.1f} %  {leaf}")
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        bench.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
