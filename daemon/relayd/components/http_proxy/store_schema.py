"""The tables of the http_proxy state store on SQLite, schema version 2 (described in
``store``), and the two upserts every flush runs."""

from __future__ import annotations

import sqlite3
import time

from .store_rows import COLUMNS, NCOL

SCHEMA_VERSION = 2

_COLS = ", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in COLUMNS)
SCHEMA = f"""
CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL, note TEXT);
CREATE TABLE services (
    name TEXT PRIMARY KEY, definition TEXT NOT NULL, created_at REAL NOT NULL, request TEXT);
CREATE TABLE members (
    service TEXT NOT NULL, username TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (service, username));
CREATE TABLE service_incarnations (
    service TEXT NOT NULL, sgen INTEGER NOT NULL, origin TEXT NOT NULL,
    created_at REAL NOT NULL, deleted_at REAL, rejected INTEGER NOT NULL DEFAULT 0, note TEXT,
    PRIMARY KEY (service, sgen));
CREATE TABLE user_incarnations (
    service TEXT NOT NULL, username TEXT NOT NULL, gen INTEGER NOT NULL, sgen INTEGER NOT NULL,
    member INTEGER NOT NULL, created_at REAL NOT NULL, deleted_at REAL, note TEXT,
    PRIMARY KEY (service, username, gen));
CREATE INDEX user_incarnations_sgen ON user_incarnations (service, sgen, username, gen);
CREATE TABLE counters (
    service TEXT NOT NULL, username TEXT NOT NULL, gen INTEGER NOT NULL, endpoint TEXT NOT NULL,
    {_COLS},
    PRIMARY KEY (service, username, gen, endpoint));
CREATE TABLE service_totals (
    service TEXT PRIMARY KEY, {_COLS}, rejected INTEGER NOT NULL DEFAULT 0);
CREATE TABLE journal_applied (writer TEXT PRIMARY KEY, seq INTEGER NOT NULL, applied_at REAL NOT NULL);
"""

UPSERT = (
    f"INSERT INTO counters (service, username, gen, endpoint, {', '.join(COLUMNS)}) "
    f"VALUES (?, ?, ?, ?, {', '.join('?' * NCOL)}) ON CONFLICT (service, username, gen, endpoint) DO UPDATE SET "
    + ", ".join(f"{c} = counters.{c} + excluded.{c}" for c in COLUMNS)
)
TOTALS_UPSERT = (
    f"INSERT INTO service_totals (service, {', '.join(COLUMNS)}, rejected) "
    f"VALUES (?, {', '.join('?' * NCOL)}, ?) ON CONFLICT (service) DO UPDATE SET "
    + ", ".join(f"{c} = service_totals.{c} + excluded.{c}" for c in (*COLUMNS, "rejected"))
)


def create_schema(db: sqlite3.Connection) -> None:
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT INTO schema_version VALUES (?, ?, ?)", (SCHEMA_VERSION, time.time(), "created"))
