#!/usr/bin/env python3
"""CPU instructions per proxied request, relayd against an earlier relayd, counted by callgrind.

    .venv/bin/python bench/http_proxy/instructions.py [--baseline a5676ee] [--rev HEAD] [--requests 2000]
                                                      [--auth basic|none]

Wall-clock benchmarks on a shared 2-core machine are noisy (bench/README.md); instruction
counts are not: callgrind counts the user-space instructions the daemon executes, the same
figure whatever else the machine runs. For each revision (from a temporary git worktree, run
by this venv's interpreter with the worktree's ``daemon/`` first on PYTHONPATH), relayd runs
under ``valgrind --tool=callgrind`` with one http_proxy service in front of a
tiny keep-alive upstream (uvloop, a fixed 2-byte answer); a client makes N sequential requests
on one connection. Two runs per revision (a few and many requests) cancel start-up and
shutdown: per request = (I(many) - I(few)) / (many - few). ``--auth basic`` (the default, as
in run.py: an argon2id user, every request with its Authorization header, so all but the
first are served from the credential cache) or ``none``; usage counting is on either way.
``--rev .`` (or ``--baseline .``) measures the checkout's ``daemon/`` as it is, uncommitted
edits included; ``--baseline ''`` measures ``--rev`` alone. Kernel time (syscalls) is not
counted: the request path makes 2 reads and 2 writes either way, plus, since the engine
rewrite, one select() on reuse of a pooled upstream connection.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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
# The checkout's venv; from a git worktree without one, the interpreter running this.
PYTHON = ROOT / ".venv" / "bin" / "python" if (ROOT / ".venv").is_dir() else Path(sys.executable)
UPSTREAM, PROXY = 19301, 19302
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
USER, PASSWORD = "bench", "bench-password"
REQUEST = b"GET /acme/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: wrk\r\n\r\n" % PROXY
BASIC = b"Authorization: Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())
REQUEST_BASIC = REQUEST[:-2] + BASIC + b"\r\n\r\n"


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


def requests(n: int, request: bytes) -> None:
    with socket.create_connection(("127.0.0.1", PROXY), timeout=300) as sock:
        for _ in range(n):
            sock.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n\r\nok"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise SystemExit("relayd closed the connection")
                reply += chunk
            if not reply.startswith(b"HTTP/1.1 200 "):
                raise SystemExit(f"unexpected answer: {reply[:200]!r}")


def instructions(daemon_dir: Path, work: Path, n: int, auth: str) -> int:
    etc = work / "etc"
    etc.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(daemon_dir))
    if auth == "basic":
        add_user = ("from relayd.auth.users import UserExists, UserStore\n"
                    f"try: UserStore({str(work / 'state' / 'users-users.sqlite3')!r}).add({USER!r}, {PASSWORD!r})\n"
                    "except UserExists: pass")
        subprocess.run([str(PYTHON), "-c", add_user], env=env, check=True)
    (etc / "relayd.toml").write_text(textwrap.dedent(f"""
        state_dir = "{work / 'state'}"
        [logging]
        level = "warning"
        [listeners.web]
        bind = "127.0.0.1:{PROXY}"
        [auth.users]
        method = "{auth}"
        [components.web]
        kind = "http_proxy"
        auth = "users"
        auth_cache_ttl = 3600  # one password check per run, not one per 10 s of a slow valgrind
        [components.web.services.acme]
        listeners = ["web"]
        from = "/acme"
        to = "http://127.0.0.1:{UPSTREAM}"
    """))
    out = work / "callgrind.out"
    code = f"import sys; from relayd.cli.daemon import main; sys.argv=['relayd','--config','{etc}']; sys.exit(main())"
    log = work / "relayd.log"
    with log.open("wb") as log_file:
        daemon = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(PYTHON), "-c", code],
                                  env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        try:
            wait_port(PROXY, time.monotonic() + 300)
        except SystemExit:
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)  # why it did not start
            raise
        requests(n, REQUEST_BASIC if auth == "basic" else REQUEST)
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
    parser.add_argument("--auth", choices=("basic", "none"), default="basic")
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is needed (apt-get install valgrind)")
    server = subprocess.Popen([str(PYTHON), __file__, "--upstream"])
    results: dict[str, float] = {}
    try:
        wait_port(UPSTREAM, time.monotonic() + 30)
        with tempfile.TemporaryDirectory(prefix="relayd-instr-") as tmp:
            for n, rev in enumerate(r for r in (args.rev, args.baseline) if r):
                tree = ROOT if rev == "." else Path(tmp) / f"tree-{n}"
                if rev != ".":
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), rev],
                                   check=True)
                try:
                    work = Path(tmp) / f"work-{n}"
                    work.mkdir()
                    few = instructions(tree / "daemon", work, args.warmup, args.auth)
                    many = instructions(tree / "daemon", work, args.warmup + args.requests, args.auth)
                    results[rev] = (many - few) / args.requests
                    print(f"{rev}: {results[rev]:,.0f} instructions per request (auth {args.auth})", flush=True)
                finally:
                    if rev != ".":
                        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                                       check=True)
    finally:
        server.terminate()
        server.wait(10)
    if args.baseline:
        print(f"{args.rev} / {args.baseline}: {results[args.rev] / results[args.baseline]:.3f}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--upstream"]:
        upstream()
    else:
        sys.exit(main())
