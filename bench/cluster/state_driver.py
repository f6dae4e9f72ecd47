"""asyncpg vs psycopg 3 for relayd's state store: the three operations that matter.

    .venv/bin/python bench/cluster/state_driver.py [--url postgresql://...] [--runs 5]

Without --url it starts a throwaway PostgreSQL (tests/pg_server.py: Debian's postgresql, as the
``postgres`` account when run as root, fsync off) on 127.0.0.1. Each run measures, per driver:

  flush      one counter flush: ROWS upserts (INSERT ... ON CONFLICT DO UPDATE SET n = n + EXCLUDED.n)
             plus the per-node flush mark, in one transaction (what every node does every second)
  manage     one management change: an insert and a NOTIFY in one transaction
  lookup     one point lookup by primary key

and relayd's own flush (Store.add: upserts, per-service totals, flush seq) on SQLite vs PostgreSQL.

psycopg is used as relayd would use it (sync API, from one worker thread: ``executemany`` runs in
libpq pipeline mode); asyncpg on its own event loop (``executemany`` pipelines too). Prints
medians; `--json` for the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

COLS = ("requests", "bytes_in", "bytes_out", "s1xx", "s2xx", "s3xx", "s4xx", "s5xx", "no_response")
SCHEMA = f"""
DROP TABLE IF EXISTS bench_counters, bench_marks, bench_members;
CREATE TABLE bench_counters (service TEXT, username TEXT, gen INT, endpoint TEXT,
    {", ".join(c + " BIGINT NOT NULL DEFAULT 0" for c in COLS)}, PRIMARY KEY (service, username, gen, endpoint));
CREATE TABLE bench_marks (writer TEXT PRIMARY KEY, seq BIGINT NOT NULL);
CREATE TABLE bench_members (service TEXT, username TEXT, created_at DOUBLE PRECISION,
    PRIMARY KEY (service, username));
"""
UPSERT = (f"INSERT INTO bench_counters (service, username, gen, endpoint, {', '.join(COLS)}) VALUES "
          f"({', '.join(f'${i}' for i in range(1, 5 + len(COLS)))}) ON CONFLICT (service, username, gen, endpoint) "
          "DO UPDATE SET " + ", ".join(f"{c} = bench_counters.{c} + EXCLUDED.{c}" for c in COLS))
UNNEST = (f"INSERT INTO bench_counters (service, username, gen, endpoint, {', '.join(COLS)}) SELECT * FROM unnest("
          "%s::text[], %s::text[], %s::int[], %s::text[], " + ", ".join(["%s::bigint[]"] * len(COLS)) + ") "
          "ON CONFLICT (service, username, gen, endpoint) DO UPDATE SET "
          + ", ".join(f"{c} = bench_counters.{c} + EXCLUDED.{c}" for c in COLS))
MARK = "INSERT INTO bench_marks VALUES ($1, $2) ON CONFLICT (writer) DO UPDATE SET seq = EXCLUDED.seq"


def rows(n: int, seq: int) -> list[tuple]:
    # users x endpoints as a flush sees them: 1/10 of the rows are totals (endpoint '')
    return [("svc", f"user{i // 10}", 1, "" if i % 10 == 0 else f"/ep{i % 10}", 1, 100, 200, 0, 1, 0, 0, 0, 0)
            for i in range(n)]


def psyco(q: str) -> str:
    import re
    return re.sub(r"\$\d+", "%s", q)


def bench_psycopg(url: str, nrows: int, repeat: int) -> dict[str, float]:
    import psycopg

    out = {}
    with psycopg.connect(url, autocommit=False) as conn:
        conn.execute(SCHEMA)
        conn.commit()
        batch = rows(nrows, 0)
        times = []
        for seq in range(repeat):
            t = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(psyco(UPSERT), batch)
                cur.execute(psyco(MARK), ("node", seq))
            times.append(time.perf_counter() - t)
        out["flush_ms"] = statistics.median(times) * 1000
        times = []
        columns = [list(c) for c in zip(*batch)]
        for seq in range(repeat):
            t = time.perf_counter()
            with conn.transaction():
                conn.execute(UNNEST, columns)
                conn.execute(psyco(MARK), ("node", seq))
            times.append(time.perf_counter() - t)
        out["unnest_ms"] = statistics.median(times) * 1000
        times = []
        for i in range(repeat):
            t = time.perf_counter()
            with conn.transaction():
                conn.execute("INSERT INTO bench_members VALUES (%s, %s, %s)", ("svc", f"u{i}", time.time()))
                conn.execute("SELECT pg_notify('relayd_bench', %s)", (f"member svc u{i}",))
            times.append(time.perf_counter() - t)
        out["manage_ms"] = statistics.median(times) * 1000
        conn.autocommit = True
        times = []
        for i in range(repeat * 10):
            t = time.perf_counter()
            conn.execute("SELECT created_at FROM bench_members WHERE service = %s AND username = %s",
                         ("svc", f"u{i % repeat}")).fetchone()
            times.append(time.perf_counter() - t)
        out["lookup_ms"] = statistics.median(times) * 1000
    return out


async def bench_asyncpg(url: str, nrows: int, repeat: int) -> dict[str, float]:
    import asyncpg

    out = {}
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(SCHEMA)
        batch = rows(nrows, 0)
        times = []
        for seq in range(repeat):
            t = time.perf_counter()
            async with conn.transaction():
                await conn.executemany(UPSERT, batch)
                await conn.execute(MARK, "node", seq)
            times.append(time.perf_counter() - t)
        out["flush_ms"] = statistics.median(times) * 1000
        times = []
        for i in range(repeat):
            t = time.perf_counter()
            async with conn.transaction():
                await conn.execute("INSERT INTO bench_members VALUES ($1, $2, $3)", "svc", f"u{i}", time.time())
                await conn.execute("SELECT pg_notify('relayd_bench', $1)", f"member svc u{i}")
            times.append(time.perf_counter() - t)
        out["manage_ms"] = statistics.median(times) * 1000
        times = []
        for i in range(repeat * 10):
            t = time.perf_counter()
            await conn.fetchrow("SELECT created_at FROM bench_members WHERE service = $1 AND username = $2",
                                "svc", f"u{i % repeat}")
            times.append(time.perf_counter() - t)
        out["lookup_ms"] = statistics.median(times) * 1000
    finally:
        await conn.close()
    return out


def bench_store(kind: str, url: str, tmp: Path, nrows: int, repeat: int) -> dict[str, float]:
    """relayd's own flush path (Store.add with its flush seq) on SQLite or PostgreSQL."""
    import secrets

    from relayd.components.http_proxy.store import NCOL, Inc, Store

    unique = secrets.token_hex(4)  # a fresh database/schema each run (flush seqs start again)
    if kind == "sqlite":
        store = Store(tmp / f"bench-{unique}.sqlite3")
    else:
        from relayd.state.http_proxy_pg import PgStore

        store = PgStore(url, f"bench-{unique}", tmp)
    store.open()
    try:
        incs = [Inc("svc", f"user{i}", None, None) for i in range(max(1, nrows // 10))]
        batch = {}
        for i in range(nrows):
            batch[(incs[i // 10], "" if i % 10 == 0 else f"/ep{i % 10}")] = [1, 100, 200, 0, 1, 0, 0, 0, 0][:NCOL]
        store.add(batch, {})  # resolves the incarnations once
        times = []
        for seq in range(1, repeat + 1):
            t = time.perf_counter()
            store.add(batch, {}, flush=("bench", seq))
            times.append(time.perf_counter() - t)
        return {"flush_ms": statistics.median(times) * 1000}
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", default="100,1000", help="counter rows per flush (comma-separated)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server = None
    url = args.url
    if url is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "daemon"))
        from pg_server import PgServer

        server = PgServer()
        url = server.new_database()
    try:
        import uvloop

        results: dict[str, dict[str, list[float]]] = {}
        for nrows in (int(n) for n in args.rows.split(",")):
            for run in range(args.runs):  # interleaved, so drift of the shared box hits both
                for driver in ("psycopg", "asyncpg"):
                    if driver == "psycopg":
                        r = bench_psycopg(url, nrows, args.repeat)
                    else:
                        r = uvloop.run(bench_asyncpg(url, nrows, args.repeat))
                    for k, v in r.items():
                        results.setdefault(f"{driver} rows={nrows}", {}).setdefault(k, []).append(v)
        import tempfile

        stores: dict[str, list[float]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for nrows in (int(n) for n in args.rows.split(",")):
                for _run in range(args.runs):
                    for kind in ("sqlite", "postgresql"):
                        r = bench_store(kind, url, Path(tmp), nrows, args.repeat)
                        stores.setdefault(f"{kind} {nrows}", []).append(r["flush_ms"])
        if args.json:
            print(json.dumps({"drivers": results, "stores": stores}, indent=1))
        print("| driver | rows/flush | flush ms (executemany) | upserts/s | flush ms (one unnest statement) "
              "| manage change ms | point lookup ms |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for key, r in results.items():
            driver, nrows_s = key.split(" rows=")
            flush = statistics.median(r["flush_ms"])
            unnest = f"{statistics.median(r['unnest_ms']):.2f}" if "unnest_ms" in r else "-"
            print(f"| {driver} | {nrows_s} | {flush:.2f} | {int(nrows_s) / flush * 1000:,.0f} | {unnest} | "
                  f"{statistics.median(r['manage_ms']):.3f} | {statistics.median(r['lookup_ms']):.3f} |")
        print()
        print("| relayd Store.add (one flush) | rows/flush | flush ms | upserts/s |")
        print("| --- | --- | --- | --- |")
        for key, values in stores.items():
            kind, nrows_s = key.split()
            flush = statistics.median(values)
            print(f"| {kind} | {nrows_s} | {flush:.2f} | {int(nrows_s) / flush * 1000:,.0f} |")
    finally:
        if server is not None:
            server.destroy()


if __name__ == "__main__":
    main()
