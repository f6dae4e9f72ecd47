#!/usr/bin/env python3
"""Where relayd's http_proxy spends its time on small requests: py-spy under wrk load.

    .venv/bin/python bench/http_proxy/pyspy.py [--rev HEAD] [--seconds 20] [--out profile]

Starts the same services as run.py (nginx backend, relayd with Basic auth and counting), loads
relayd with ``wrk -t1 -c64`` on ``/`` while ``py-spy record --native --idle`` samples it, and
writes ``OUT.speedscope.json`` (open in speedscope.app) and ``OUT.txt``: the top functions by
own samples and by cumulative samples (own = the function itself, not its callees).
``--rev .`` profiles the checkout's ``daemon/`` as it is. py-spy comes from PyPI
(``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the services and checks of the wall-clock bench)


def top(speedscope: Path, n: int = 25) -> str:
    """Own and cumulative sample shares per frame of the main thread."""
    data = json.loads(speedscope.read_text())
    frames = data["shared"]["frames"]
    own: collections.Counter[int] = collections.Counter()
    cumulative: collections.Counter[int] = collections.Counter()
    total = 0
    for profile in data["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"]):
            total += weight
            if stack:
                own[stack[-1]] += weight
            for frame in set(stack):
                cumulative[frame] += weight

    def name(i: int) -> str:
        f = frames[i]
        where = Path(f.get("file") or "?")
        return f"{f['name']} ({'/'.join(where.parts[-2:])}:{f.get('line', '?')})"

    lines = [f"{total} samples", "", "own %   function"]
    lines += [f"{100 * w / total:5.1f}   {name(i)}" for i, w in own.most_common(n)]
    lines += ["", "cumul % function"]
    lines += [f"{100 * w / total:5.1f}   {name(i)}" for i, w in cumulative.most_common(n)]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", default="HEAD")
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("profile"))
    args = p.parse_args()
    spy = shutil.which("py-spy") or str(run.VENV / "py-spy")
    auth = "Basic " + base64.b64encode(f"{run.USER}:{run.PASSWORD}".encode()).decode()
    work = Path(tempfile.mkdtemp(prefix="relayd-profile-http-"))
    work.chmod(0o755)
    tree = None
    if args.rev == ".":
        relayd = run.Relayd("relayd", run.RELAYD, run.ROOT / "daemon", "checkout")
    else:
        tree = work / "rev"
        run.git("worktree", "add", "--detach", str(tree), args.rev)
        relayd = run.Relayd("relayd", run.RELAYD, tree / "daemon", run.git("rev-parse", args.rev))
    services = run.Services(work, [relayd])
    try:
        services.start()
        run.check("relayd", run.RELAYD, auth, (work / "www" / "1m").read_bytes(), True)
        run.wrk(f"http://127.0.0.1:{run.RELAYD}/", 2, auth)  # warm-up
        speedscope = args.out.with_suffix(".speedscope.json")
        load = threading.Thread(target=run.wrk, args=(f"http://127.0.0.1:{run.RELAYD}/", args.seconds + 2, auth))
        load.start()
        subprocess.run([spy, "record", "--native", "--rate", "100",
                        "--duration", str(args.seconds), "--format", "speedscope", "--output", str(speedscope),
                        "--pid", str(services.procs["relayd"].pid)], check=True, stdout=subprocess.DEVNULL)
        load.join()
    finally:
        services.stop()
        if tree is not None:
            run.git("worktree", "remove", "--force", str(tree))
    report = top(speedscope)
    args.out.with_suffix(".txt").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
