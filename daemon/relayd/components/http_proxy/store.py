"""Persistent state of an http_proxy component: one SQLite file, used from one worker thread.

Tables: ``services`` (created through the management API), ``members`` (which users may use
a service), ``counters`` (per service, user and endpoint; endpoint '' holds the user's total).
Counters are only ever increased, by adding deltas (``INSERT ... ON CONFLICT DO UPDATE SET
n = n + excluded.n``), so several component objects (during a reload, the old one drains while
the new one serves) can flush into the same file without losing or double-counting anything.
WAL with synchronous=NORMAL: a committed flush survives the process being killed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

COLUMNS = ("requests", "bytes_in", "bytes_out", "s1xx", "s2xx", "s3xx", "s4xx", "s5xx", "no_response")
NCOL = len(COLUMNS)
OVERFLOW = "(other)"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY, definition TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    service TEXT NOT NULL, username TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (service, username));
CREATE TABLE IF NOT EXISTS counters (
    service TEXT NOT NULL, username TEXT NOT NULL, endpoint TEXT NOT NULL,
    {", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in COLUMNS)},
    PRIMARY KEY (service, username, endpoint));
CREATE TABLE IF NOT EXISTS service_meta (
    name TEXT PRIMARY KEY, created_at REAL NOT NULL);
"""

_UPSERT = (
    f"INSERT INTO counters (service, username, endpoint, {', '.join(COLUMNS)}) "
    f"VALUES (?, ?, ?, {', '.join('?' * NCOL)}) ON CONFLICT (service, username, endpoint) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in COLUMNS)
)


def row_dict(values: list[int] | tuple[int, ...]) -> dict[str, Any]:
    return {
        "requests": values[0], "bytesIn": values[1], "bytesOut": values[2],
        "statuses": {"1xx": values[3], "2xx": values[4], "3xx": values[5], "4xx": values[6],
                     "5xx": values[7], "none": values[8]},
    }


class Store:
    """Blocking methods; the component calls them in its single worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self.db = db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    # -- counters ---------------------------------------------------------------------------

    def add(self, batch: dict[tuple[str, str, str], list[int]]) -> dict[str, list[int]]:
        """Add counter deltas in one transaction; returns per-service totals afterwards."""
        db = self.db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_UPSERT, [(*key, *values) for key, values in batch.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return self.service_totals()

    def service_totals(self) -> dict[str, list[int]]:
        sums = ", ".join(f"sum({c})" for c in COLUMNS)
        rows = self.db.execute(f"SELECT service, {sums} FROM counters WHERE endpoint = '' GROUP BY service")  # type: ignore[union-attr]
        return {row[0]: list(row[1:]) for row in rows}

    def endpoint_keys(self) -> dict[tuple[str, str], set[str]]:
        keys: dict[tuple[str, str], set[str]] = {}
        for service, user, endpoint in self.db.execute(  # type: ignore[union-attr]
                "SELECT service, username, endpoint FROM counters WHERE endpoint != ''"):
            keys.setdefault((service, user), set()).add(endpoint)
        return keys

    def rows(self, service: str | None = None, user: str | None = None,
             endpoints: bool = False) -> list[tuple]:
        query = f"SELECT service, username, endpoint, {', '.join(COLUMNS)} FROM counters WHERE "
        query += "endpoint != ''" if endpoints else "endpoint = ''"
        args: list[str] = []
        if service is not None:
            query += " AND service = ?"
            args.append(service)
        if user is not None:
            query += " AND username = ?"
            args.append(user)
        return list(self.db.execute(query + " ORDER BY service, username, endpoint", args))  # type: ignore[union-attr]

    # -- runtime services and members -------------------------------------------------------

    def services(self) -> list[tuple[str, dict[str, Any], float]]:
        return [(n, json.loads(d), c) for n, d, c in
                self.db.execute("SELECT name, definition, created_at FROM services ORDER BY name")]  # type: ignore[union-attr]

    def add_service(self, name: str, definition: dict[str, Any]) -> float:
        now = time.time()
        self.db.execute("INSERT INTO services VALUES (?, ?, ?)", (name, json.dumps(definition), now))  # type: ignore[union-attr]
        return now

    def remove_service(self, name: str) -> None:
        self.db.execute("DELETE FROM services WHERE name = ?", (name,))  # type: ignore[union-attr]
        self.db.execute("DELETE FROM members WHERE service = ?", (name,))  # type: ignore[union-attr]

    def created_at(self, name: str) -> float:
        """When a configured service was first seen (kept across restarts)."""
        db = self.db
        db.execute("INSERT OR IGNORE INTO service_meta VALUES (?, ?)", (name, time.time()))  # type: ignore[union-attr]
        return db.execute("SELECT created_at FROM service_meta WHERE name = ?", (name,)).fetchone()[0]  # type: ignore[union-attr]

    def members(self) -> dict[tuple[str, str], float]:
        return {(s, u): c for s, u, c in self.db.execute("SELECT service, username, created_at FROM members")}  # type: ignore[union-attr]

    def add_member(self, service: str, username: str) -> float:
        now = time.time()
        self.db.execute("INSERT INTO members VALUES (?, ?, ?)", (service, username, now))  # type: ignore[union-attr]
        return now

    def remove_member(self, service: str, username: str) -> None:
        self.db.execute("DELETE FROM members WHERE service = ? AND username = ?", (service, username))  # type: ignore[union-attr]
