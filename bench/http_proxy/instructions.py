#!/usr/bin/env python3
"""CPU instructions per proxied request, relayd against an earlier relayd, counted by callgrind.

    .venv/bin/python bench/http_proxy/instructions.py [--baseline a5676ee] [--rev HEAD] [--requests 2000]

Wall-clock benchmarks on a shared 2-core machine are noisy (bench/README.md); instruction
counts are not: callgrind counts the user-space instructions the daemon executes, the same
figure whatever else the machine runs. For each revision (from a temporary git worktree, run
by this venv's interpreter with the worktree's ``daemon/`` first on PYTHONPATH), relayd runs
under ``valgrind --tool=callgrind`` with one http_proxy service (auth ``none``) in front of a
tiny keep-alive upstream (uvloop, a fixed 2-byte answer); a client makes N sequential requests
on one connection. Two runs per revision (a few and many requests) cancel start-up and
shutdown: per request = (I(many) - I(few)) / (many - few). Kernel time (syscalls) is not
counted: the request path makes 2 reads and 2 writes either way, plus, since the engine
rewrite, one select() on reuse of a pooled upstream connection.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
UPSTREAM, PROXY = 19301, 19302
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
REQUEST = b"GET /acme/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: wrk\r\n\r\n" % PROXY


def upstream() -> None:
    import uvloop

    class Answer(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            self.transport, self.buffer = transport, b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while b"\r\n\r\n" in self.buffer:
                _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
                self.transport.write(RESPONSE)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", UPSTREAM)
        await server.serve_forever()

    uvloop.run(main())


def wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)  # polling a port that is not open yet, with a deadline
    raise SystemExit(f"nothing listens on {port}")


def requests(n: int) -> None:
    with socket.create_connection(("127.0.0.1", PROXY), timeout=300) as sock:
        for _ in range(n):
            sock.sendall(REQUEST)
            reply = b""
            while not reply.endswith(b"\r\n\r\nok"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise SystemExit("relayd closed the connection")
                reply += chunk
            if not reply.startswith(b"HTTP/1.1 200 "):
                raise SystemExit(f"unexpected answer: {reply[:200]!r}")


def instructions(daemon_dir: Path, work: Path, n: int) -> int:
    etc = work / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "relayd.toml").write_text(textwrap.dedent(f"""
        state_dir = "{work / 'state'}"
        [logging]
        level = "warning"
        [listeners.web]
        bind = "127.0.0.1:{PROXY}"
        [auth.open]
        method = "none"
        [components.web]
        kind = "http_proxy"
        auth = "open"
        [components.web.services.acme]
        listeners = ["web"]
        from = "/acme"
        to = "http://127.0.0.1:{UPSTREAM}"
    """))
    out = work / "callgrind.out"
    env = dict(os.environ, PYTHONPATH=str(daemon_dir))
    code = f"import sys; from relayd.cli.daemon import main; sys.argv=['relayd','--config','{etc}']; sys.exit(main())"
    daemon = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(PYTHON), "-c", code],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(PROXY, time.monotonic() + 300)
        requests(n)
    finally:
        daemon.terminate()
        daemon.wait(300)
    match = re.search(r"^summary: (\d+)", out.read_text(), re.M)
    if not match:
        raise SystemExit("no callgrind summary")
    return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="the relayd to measure (default HEAD)")
    parser.add_argument("--baseline", default="a5676ee", help="the relayd to compare with")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is needed (apt-get install valgrind)")
    server = subprocess.Popen([str(PYTHON), __file__, "--upstream"])
    results: dict[str, float] = {}
    try:
        wait_port(UPSTREAM, time.monotonic() + 30)
        with tempfile.TemporaryDirectory(prefix="relayd-instr-") as tmp:
            for rev in (args.rev, args.baseline):
                tree = Path(tmp) / rev
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), rev],
                               check=True)
                try:
                    work = Path(tmp) / f"work-{rev}"
                    work.mkdir()
                    few = instructions(tree / "daemon", work, args.warmup)
                    many = instructions(tree / "daemon", work, args.warmup + args.requests)
                    results[rev] = (many - few) / args.requests
                    print(f"{rev}: {results[rev]:,.0f} instructions per request")
                finally:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    finally:
        server.terminate()
        server.wait(10)
    print(f"{args.rev} / {args.baseline}: {results[args.rev] / results[args.baseline]:.2f}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--upstream"]:
        upstream()
    else:
        sys.exit(main())
