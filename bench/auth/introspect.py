#!/usr/bin/env python3
"""Globus token checks per second: warm cache vs. every check introspecting (against the fake).

    .venv/bin/python bench/auth/introspect.py [--seconds 2] [--runs 5] [--concurrency 1,16] [--tokens 100]

"cold" sets cache_size = 0, so every check is one introspection round trip over loopback HTTP
to tests/fake_globus.py (aiohttp in its own thread); "warm" pre-checks the tokens once, then
every check is a cache hit. Prints the median of --runs runs per case, as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import uvloop  # noqa: E402
from fake_globus import FakeGlobus  # noqa: E402

from relayd.auth.globus import GlobusAuth, GlobusAuthConfig  # noqa: E402
from relayd.component import Context  # noqa: E402


async def one_run(fake: FakeGlobus, tokens: list[str], scope: str, *, cached: bool, concurrency: int,
                  seconds: float) -> float:
    config = GlobusAuthConfig(method="globus", client_id=fake.client_id, client_secret=fake.client_secret,
                              auth_base_url=fake.base_url, required_scopes=[scope],
                              cache_size=10000 if cached else 0)
    method = GlobusAuth("bench", config, Context({}, {}, {}, Path(tempfile.gettempdir())))
    await method.start()
    headers = [f"Bearer {t}" for t in tokens]
    if cached:
        for header in headers:
            await method.authenticate(header)
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() < deadline:
            await method.authenticate(headers[i % len(headers)])
            i += concurrency
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    await method.close()
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--tokens", type=int, default=100, help="distinct tokens cycled through")
    args = parser.parse_args()
    fake = FakeGlobus()
    scope = f"https://auth.globus.org/scopes/{fake.client_id}/relay"
    tokens = [fake.issue_token(scopes=[scope]) for _ in range(args.tokens)]
    print("| case | concurrency | checks/s (median) | runs |")
    print("| --- | --- | --- | --- |")
    try:
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            for cached in (False, True):
                rates = [uvloop.run(one_run(fake, tokens, scope, cached=cached, concurrency=concurrency,
                                            seconds=args.seconds)) for _ in range(args.runs)]
                label = "warm cache" if cached else "no cache (introspect each)"
                print(f"| {label} | {concurrency} | {statistics.median(rates):,.0f} | "
                      f"{', '.join(f'{r:,.0f}' for r in rates)} |", flush=True)
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
