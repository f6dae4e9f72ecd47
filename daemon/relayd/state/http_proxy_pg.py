"""The http_proxy's state (runtime services, members, incarnations, counters) in PostgreSQL.

The same class as the SQLite store (components/http_proxy/store.py), the same SQL, in the
schema ``http_proxy:NAME`` of the ``[state] url`` database, shared by every node. What differs:

* types: counters are BIGINT (bytes overflow 32 bits), times DOUBLE PRECISION;
* writers are several processes on several hosts: a change of a service's incarnations takes a
  transaction-level advisory lock on the service name (SQLite's BEGIN IMMEDIATE serialises
  every writer of the file instead); counter rows are only ever added to with atomic upserts,
  so nodes flushing at once never lose or double an increment;
* every management change NOTIFYs the schema's channel in its transaction;
* the ``path`` is only where this node keeps its held-counts journal (``state_dir``): the
  journal stays per node, and replays into PostgreSQL exactly once (journal_applied).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from relayd.components.http_proxy.store import COLUMNS, SCHEMA_VERSION, Store, StoreError
from relayd.state.pg import Db, schema_name

_COLS = ", ".join(f"{c} BIGINT NOT NULL DEFAULT 0" for c in COLUMNS)
PG_SCHEMA = f"""
CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL, note TEXT);
CREATE TABLE services (
    name TEXT PRIMARY KEY, definition TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, request TEXT);
CREATE TABLE members (
    service TEXT NOT NULL, username TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (service, username));
CREATE TABLE service_incarnations (
    service TEXT NOT NULL, sgen INTEGER NOT NULL, origin TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, deleted_at DOUBLE PRECISION, rejected BIGINT NOT NULL DEFAULT 0,
    note TEXT, PRIMARY KEY (service, sgen));
CREATE TABLE user_incarnations (
    service TEXT NOT NULL, username TEXT NOT NULL, gen INTEGER NOT NULL, sgen INTEGER NOT NULL,
    member INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL, deleted_at DOUBLE PRECISION, note TEXT,
    PRIMARY KEY (service, username, gen));
CREATE INDEX user_incarnations_sgen ON user_incarnations (service, sgen, username, gen);
CREATE TABLE counters (
    service TEXT NOT NULL, username TEXT NOT NULL, gen INTEGER NOT NULL, endpoint TEXT NOT NULL,
    {_COLS},
    PRIMARY KEY (service, username, gen, endpoint));
CREATE TABLE service_totals (
    service TEXT PRIMARY KEY, {_COLS}, rejected BIGINT NOT NULL DEFAULT 0);
CREATE TABLE journal_applied (writer TEXT PRIMARY KEY, seq BIGINT NOT NULL, applied_at DOUBLE PRECISION NOT NULL);
CREATE TABLE imports (source TEXT PRIMARY KEY, imported_at DOUBLE PRECISION NOT NULL, requests BIGINT NOT NULL,
    note TEXT)
"""


def check_version(version: int, where: str, known: int) -> None:
    if version > known:
        raise StoreError(f"{where} has schema version {version}; this relayd knows up to {known} "
                         "(was it migrated by a newer relayd? upgrade this node)")


class PgStore(Store):
    """Blocking, like Store; used from the component's single worker thread."""

    def __init__(self, url: str, component: str, journal_dir: Path, health: Any = None) -> None:
        # The held-counts journal of this node lives in state_dir, named after the component.
        super().__init__(Path(journal_dir) / f"http_proxy-{component}.postgresql")
        self.url = url
        self.schema = schema_name("http_proxy", component)
        self.db = None
        self.health = health
        self.where = Db(url, self.schema).where

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = Db(self.url, self.schema, self.health)
        self.db = db
        try:
            self._transaction(self.migrate)
            self.refresh_gens()
        except BaseException:
            self.db = None
            db.close()
            raise

    def migrate(self) -> str:
        """Create or migrate the schema (in a transaction; two nodes starting at once wait for
        each other on an advisory lock). Returns what was done."""
        db = self.db
        db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", ("relayd schema " + self.schema,))
        version = self.version()
        if version == 0:
            for statement in PG_SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT INTO schema_version VALUES (?, ?, ?)", (SCHEMA_VERSION, time.time(), "created"))
            return f"created schema {self.schema!r} version {SCHEMA_VERSION}"
        check_version(version, self.where, SCHEMA_VERSION)
        return f"schema {self.schema!r} is at version {version} (current)"

    def migrate_now(self) -> str:
        """``relayctl db migrate``: only the schema (no journal, no incarnations read)."""
        self.db = Db(self.url, self.schema, self.health)
        try:
            return self._transaction(self.migrate)
        finally:
            self.close()

    def version(self) -> int:
        if "schema_version" not in self.db.tables():
            return 0
        return self.db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0

    def _transaction(self, fn: Any, *args: Any) -> Any:
        assert self.db is not None
        return self.db.transaction(lambda: fn(*args))

    def _lock_service(self, service: str) -> None:
        self.db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", ("relayd service " + self.schema + "/" + service,))

    def _notify(self, what: str) -> None:
        self.db.notify(what)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
