#!/usr/bin/env python3
"""The proxy's user-space work per small request, without sockets: a quick, repeatable loop.

    PYTHONPATH=daemon .venv/bin/python bench/http_proxy/micro.py [--n 20000] [--profile]

Drives the real asyncio shell (``proxy.ClientConnection``, ``upstream.UpstreamConnection``,
the route's pool and the usage counters' ``record``) with in-memory transports: each round
feeds one keep-alive request with a cached Basic credential, the request goes to a pooled
upstream connection, and a 2-byte nginx-like response comes back. What it leaves out is
the event loop's dispatch and the kernel (the pooled connection's readability check included,
since these transports have no socket). Prints microseconds per request (best of 5), and with
``--profile`` the functions by own time (cProfile, which inflates calls) and the call count.
Use it to compare changes quickly; judge them with ``instructions.py`` (callgrind, the whole
daemon) and ``run.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import pstats
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from relayd.auth.base import AuthConfig, AuthMethod, Identity
from relayd.components.http_proxy.config import ServiceConfig
from relayd.components.http_proxy.counters import Counters
from relayd.components.http_proxy.proxy import ClientConnection
from relayd.components.http_proxy.routes import Core, Route, Router
from relayd.components.http_proxy.upstream import UpstreamConnection

AUTH = b"Basic " + base64.b64encode(b"bench:bench-password")
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:19113\r\nAuthorization: " + AUTH + b"\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 17:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


class Transport:
    """What the shell uses of an asyncio transport; keeps the bytes written."""

    def __init__(self, peer: Any) -> None:
        self.peer = peer
        self.written = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.written += len(part)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class Basic(AuthMethod):
    async def authenticate(self, authorization: str | None) -> Identity:  # pragma: no cover
        raise AssertionError("served from the credential cache")


def setup(loop: asyncio.AbstractEventLoop) -> tuple[ClientConnection, UpstreamConnection, Transport]:
    # Never started: no database, no journal file, no worker thread (record() reads only the
    # store's service_gens). A real constructor: Counters is compiled (a native class).
    store = SimpleNamespace(path=Path("/nonexistent/micro.db"), service_gens={})
    counters = Counters(store, 1000)  # type: ignore[arg-type]
    core = Core(loop, counters, keepalive_timeout=75, auth_cache_ttl=10, upstream_idle=64)
    core.protected_headers = frozenset({b"x-forwarded-user", b"x-forwarded-email"})
    method = Basic("users", AuthConfig.model_construct(method="basic"), None)  # type: ignore[arg-type]
    config = ServiceConfig.model_validate({"listeners": ["web"], "from": "/", "to": "http://127.0.0.1:19101"})
    route = Route("bench", config, method, core, ("X-Forwarded-User", "X-Forwarded-Email"), None)
    route.cache[AUTH] = (Identity(sub="bench", username="bench", method="users"), float("inf"))
    router = Router(core, "web", lambda methods: {})
    router.set_routes([route])
    upstream = UpstreamConnection()
    upstream.connection_made(Transport(("127.0.0.1", 19101)))  # type: ignore[arg-type]
    route.idle.append(upstream)
    client = ClientConnection(router, tls=False)
    transport = Transport(("127.0.0.1", 40000))
    client.connection_made(transport)  # type: ignore[arg-type]
    return client, upstream, transport


def rounds(client: ClientConnection, upstream: UpstreamConnection, n: int) -> None:
    for _ in range(n):
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--once", action="store_true", help="one pass, no timing (for callgrind: run twice, subtract)")
    p.add_argument("--no-record", action="store_true", help="usage counting replaced by nothing (its share)")
    args = p.parse_args()
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    client, upstream, transport = setup(loop)
    if args.no_record:
        try:
            client.core.counters.record = lambda *args: None  # type: ignore[method-assign]
        except AttributeError:  # a compiled (native) class: its methods cannot be replaced
            print("--no-record needs a pure Python counters.py (install with RELAYD_PURE_PYTHON=1); "
                  "compiled, read record's share from callgrind (inclusive cost of Counters.record)",
                  file=sys.stderr)
            return 2
    rounds(client, upstream, 100)
    if transport.written != 100 * (len(RESPONSE) - len(b"Connection: keep-alive\r\n")):  # hop-by-hop: dropped
        print(f"unexpected output: {transport.written} bytes for 100 requests", file=sys.stderr)
    if args.once:
        rounds(client, upstream, args.n)
        return 0
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        rounds(client, upstream, args.n)
        best = min(best, (time.perf_counter() - start) / args.n)
    print(f"{best * 1e6:.2f} us per request (best of 5 x {args.n})")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(rounds, client, upstream, args.n)
        stats = pstats.Stats(profiler)
        calls = sum(v[1] for v in stats.stats.values()) / args.n  # type: ignore[attr-defined]
        print(f"{calls:.1f} function calls per request (Python and C)")
        stats.sort_stats("tottime").print_stats(70)
    return 0


if __name__ == "__main__":
    sys.exit(main())
