"""The SQLite store's migration from schema 1 (before incarnations) to 2, in one transaction.

Kept apart from store.py because only files written by relayd before incarnations need it;
PostgreSQL schemas start at version 2.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from .store_rows import COLUMNS, StoreError
from .store_schema import create_schema


def migrate_1_to_2(db: sqlite3.Connection, path: Path) -> None:
    """Version 1 kept one counter row per (service, user, endpoint), no history: its totals
    become each user's first incarnation, in its service's first incarnation."""
    now = time.time()
    note = "migrated from schema 1"
    for old in ("services", "members", "counters", "service_meta"):
        exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (old,)).fetchone()
        if exists:
            db.execute(f"ALTER TABLE {old} RENAME TO v1_{old}")
        elif old != "service_meta":
            raise StoreError(f"{path}: a schema-1 database without table {old!r}")
    has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'v1_service_meta'").fetchone()
    create_schema(db)
    db.execute("UPDATE schema_version SET note = ?", (note + f" ({path.name})",))
    db.execute("INSERT INTO services (name, definition, created_at) SELECT name, definition, created_at "
               "FROM v1_services")
    db.execute("INSERT INTO members SELECT service, username, created_at FROM v1_members")
    # Service incarnations: configured (service_meta), runtime (services), and names that
    # only have counters left (runtime services deleted before the upgrade).
    first: dict[str, tuple[str, float, float | None, str | None]] = {}
    if has_meta:
        for name, created in db.execute("SELECT name, created_at FROM v1_service_meta"):
            first[name] = ("config", created, None, note)
    for name, created in db.execute("SELECT name, created_at FROM v1_services"):
        first[name] = ("runtime", created, None, note)
    for (name,) in db.execute("SELECT DISTINCT service FROM v1_counters UNION SELECT service FROM v1_members"):
        if name not in first:
            first[name] = ("runtime", now, now, note + ": deleted before the upgrade; times unknown")
    db.executemany("INSERT INTO service_incarnations (service, sgen, origin, created_at, deleted_at, note) "
                   "VALUES (?, 1, ?, ?, ?, ?)", [(n, *v) for n, v in first.items()])
    members = {(s, u): c for s, u, c in db.execute("SELECT service, username, created_at FROM v1_members")}
    users = {(s, u) for s, u in db.execute("SELECT DISTINCT service, username FROM v1_counters")}
    rows = []
    for key in sorted(users | set(members)):
        service_created = first[key[0]][1]
        created = members.get(key, service_created)
        rows.append((*key, 1 if key in members else 0, created, note))
    db.executemany("INSERT INTO user_incarnations (service, username, gen, sgen, member, created_at, note) "
                   "VALUES (?, ?, 1, 1, ?, ?, ?)", rows)
    cols = ", ".join(COLUMNS)
    db.execute(f"INSERT INTO counters (service, username, gen, endpoint, {cols}) "
               f"SELECT service, username, 1, endpoint, {cols} FROM v1_counters")
    sums = ", ".join(f"sum({c})" for c in COLUMNS)
    db.execute(f"INSERT INTO service_totals (service, {cols}) SELECT service, {sums} FROM v1_counters "
               "WHERE endpoint = '' GROUP BY service")
    for old in ("services", "members", "counters", "service_meta"):
        db.execute(f"DROP TABLE IF EXISTS v1_{old}")
