"""Persistent state of an http_proxy component: one SQLite file, used from one worker thread.

Schema version 2 (``schema_version`` holds one row per version the file went through; a file
without that table is version 1 and is migrated when opened, in one transaction):

    services              runtime services created through the management API: the relayd
                          definition and the client's JSON as sent (echoed back field by field)
    members               who may use which service now
    service_incarnations  every life of a service name: (service, sgen), origin, created and
                          deleted times, requests refused by auth (rejected)
    user_incarnations     every life of a user of a service: (service, username, gen), in service
                          incarnation sgen, member (created through the API) or counted without
                          membership, created and deleted (ended) times
    counters              per user incarnation and endpoint (endpoint '' holds the incarnation's
                          total)
    service_totals        per service name, the sum over all its incarnations (Prometheus totals)
    journal_applied       per journal writer, the last snapshot of held counts already in here

A user created again (``POST .../users``) or a service created again starts a new incarnation
from 0; the old ones keep their totals for ever. Counters are only ever increased, by adding
deltas, so several component objects (during a reload the old one drains while the new one
serves) can flush into the same file without losing or double-counting anything. WAL with
synchronous=NORMAL: a committed flush survives the process being killed.

An incarnation the event loop counted before the database knew it (an ``Inc`` whose ``gen``
is None) is resolved here, inside the transaction that adds its counts: it becomes the latest
incarnation of that user in its service incarnation, or a new one if there is none.

The queries that only read are in store_reads.py, the tables in store_schema.py, the schema
1 -> 2 migration in store_migrate.py; relayd.state.http_proxy_pg.PgStore is this class on PostgreSQL.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from .store_reads import StoreReads
from .store_rows import COLUMNS, NCOL, Inc, StoreConflict, StoreError, row_dict
from .store_schema import SCHEMA_VERSION, TOTALS_UPSERT, UPSERT, create_schema

__all__ = ["COLUMNS", "NCOL", "OVERFLOW", "SCHEMA_VERSION", "Inc", "Store", "StoreConflict", "StoreError",
           "row_dict"]
OVERFLOW = "(other)"
FLUSH_MARK = "flush:"  # journal_applied key prefix of a writer's flush sequence (see ``add``)


def _add_into(target: list[int], values: list[int] | tuple[int, ...]) -> None:
    for i, v in enumerate(values):
        target[i] += v


class Store(StoreReads):
    """Blocking methods; the component calls them in its single worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)  # for messages: the file, or the PostgreSQL database and schema
        self.db: Any = None  # sqlite3.Connection, or relayd.state.pg.Db (the same calls)
        # Service name -> its latest incarnation, as this object last set or read it. Read by
        # the event loop (a dict lookup) to tag new user incarnations with their service's.
        self.service_gens: dict[str, int] = {}

    # -- opening, schema, migration ------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self.db = db
            version = self.version()
            if version == 0:
                self._transaction(self._create)
            elif version == 1:
                self._transaction(self._migrate_1_to_2)
            elif version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {version}; this relayd knows up to "
                                 f"{SCHEMA_VERSION} (was it written by a newer relayd?)")
            self.service_gens = {s: g for s, g in db.execute(
                "SELECT service, max(sgen) FROM service_incarnations GROUP BY service")}
        except BaseException:
            self.db = None
            db.close()
            raise

    def version(self) -> int:
        """0: empty file; 1: the schema before incarnations (no version table); else the table's."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" in tables:
            return self.db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
        return 1 if "counters" in tables else 0

    def _transaction(self, fn: Any, *args: Any) -> Any:
        db = self.db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(*args)
            db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (SQLITE_FULL...) may already have rolled back: only roll back an
            # open transaction, so that the error reported is the real one.
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        return result

    def _create(self) -> None:
        create_schema(self.db)

    def _migrate_1_to_2(self) -> None:
        from .store_migrate import migrate_1_to_2

        migrate_1_to_2(self.db, self.path)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    # -- counters ---------------------------------------------------------------------------

    def add(self, batch: dict[tuple[Inc, str], list[int]], rejected: dict[tuple[str, int | None], int],
            writer: str | None = None, covers: int = 0,
            flush: tuple[str, int] | None = None) -> tuple[dict[str, list[int]], dict[str, int]]:
        """Add counter deltas in one transaction; record that journal snapshot ``covers`` of
        ``writer`` is now in the database. Returns lifetime totals per service afterwards.

        ``flush`` = (writer, seq) makes the call idempotent: the transaction records the seq
        (journal_applied, key FLUSH_MARK + writer) and adds nothing if it is already there. A
        flush whose COMMIT was sent but whose acknowledgement was lost (PostgreSQL going away)
        is retried with the same seq: it is then counted once whether or not it had committed."""
        return self.add_all([(batch, rejected, writer, covers, flush)])

    def add_all(self, parts: list[tuple[Any, ...]]) -> tuple[dict[str, list[int]], dict[str, int]]:
        """Several ``add`` calls' arguments, in one transaction (a journal snapshot's failed
        flush and held counts are replayed together)."""
        resolved: dict[Inc, tuple[int, int]] = {}

        def work() -> None:
            for batch, rejected, writer, covers, flush in parts:
                self._add(batch, rejected, writer, covers, flush, resolved)

        self._transaction(work)
        for inc, (sgen, gen) in resolved.items():  # only once committed
            inc.sgen, inc.gen = sgen, gen
        return self.totals()

    def _add(self, batch: dict[tuple[Inc, str], list[int]], rejected: dict[tuple[str, int | None], int],
             writer: str | None, covers: int, flush: tuple[str, int] | None,
             resolved: dict[Inc, tuple[int, int]]) -> None:
        db = self.db
        assert db is not None
        if flush is not None:
            key = FLUSH_MARK + flush[0]
            if self.applied_seq(key) >= flush[1]:
                return  # committed before; its acknowledgement was lost
            self._mark_applied(key, flush[1])
        # Services whose incarnations may be created here are locked first, in one order,
        # then rows are upserted in key order: concurrent flushes of several nodes then
        # wait for each other instead of deadlocking (PostgreSQL; no-ops on SQLite).
        for service in sorted({inc.service for inc, _ in batch if inc.gen is None or inc.sgen is None}
                              | {s for s, g in rejected if g is None}):
            self._lock_service(service)
        rows = []
        totals: dict[str, list[int]] = {}
        for (inc, endpoint), values in batch.items():
            sgen, gen = self._resolve(inc, resolved)
            rows.append((inc.service, inc.user, gen, endpoint, *values))
            if endpoint == "":
                _add_into(totals.setdefault(inc.service, [0] * NCOL), values)
        rows.sort(key=lambda r: r[:4])
        db.executemany(UPSERT, rows)
        refused: dict[str, int] = {}
        for (service, known), n in rejected.items():
            sgen = known if known is not None else self._service_gen(service)
            db.execute("UPDATE service_incarnations SET rejected = rejected + ? WHERE service = ? AND sgen = ?",
                       (n, service, sgen))
            refused[service] = refused.get(service, 0) + n
        for service in sorted(set(totals) | set(refused)):
            db.execute(TOTALS_UPSERT, (service, *totals.get(service, [0] * NCOL), refused.get(service, 0)))
        if writer is not None and covers:
            self._mark_applied(writer, covers)

    def _mark_applied(self, writer: str, seq: int) -> None:
        self.db.execute(
            "INSERT INTO journal_applied VALUES (?, ?, ?) ON CONFLICT (writer) DO UPDATE SET "
            "seq = CASE WHEN excluded.seq > journal_applied.seq THEN excluded.seq ELSE journal_applied.seq END, "
            "applied_at = excluded.applied_at", (writer, seq, time.time()))

    def applied_seq(self, writer: str) -> int:
        row = self.db.execute("SELECT seq FROM journal_applied WHERE writer = ?", (writer,)).fetchone()
        return row[0] if row else 0

    def _lock_service(self, service: str) -> None:
        """Serialise incarnation changes of one service between writers: SQLite's BEGIN
        IMMEDIATE already does; the PostgreSQL store takes an advisory transaction lock."""

    def refresh_gens(self) -> dict[str, int]:
        """Re-read the latest incarnation of every service (another node may have made one)."""
        self.service_gens = {s: g for s, g in self.db.execute(
            "SELECT service, max(sgen) FROM service_incarnations GROUP BY service")}
        return self.service_gens

    def _service_gen(self, service: str) -> int:
        """The latest incarnation of a service; one is made if the name was never seen."""
        self._lock_service(service)
        db = self.db
        row = db.execute("SELECT max(sgen) FROM service_incarnations WHERE service = ?", (service,)).fetchone()
        if row[0] is not None:
            return row[0]
        db.execute("INSERT INTO service_incarnations (service, sgen, origin, created_at, note) "
                   "VALUES (?, 1, 'unknown', ?, 'counted before it was registered')", (service, time.time()))
        self.service_gens.setdefault(service, 1)
        return 1

    def _resolve(self, inc: Inc, resolved: dict[Inc, tuple[int, int]]) -> tuple[int, int]:
        if inc.gen is not None and inc.sgen is not None:
            return inc.sgen, inc.gen
        done = resolved.get(inc)
        if done is not None:
            return done
        db = self.db
        assert db is not None
        self._lock_service(inc.service)
        sgen = inc.sgen if inc.sgen is not None else self._service_gen(inc.service)
        row = db.execute("SELECT max(gen) FROM user_incarnations WHERE service = ? AND username = ? AND sgen = ?",
                         (inc.service, inc.user, sgen)).fetchone()
        if row[0] is not None:
            gen = row[0]
        else:
            gen = db.execute("SELECT coalesce(max(gen), 0) + 1 FROM user_incarnations WHERE service = ? "
                             "AND username = ?", (inc.service, inc.user)).fetchone()[0]
            db.execute("INSERT INTO user_incarnations (service, username, gen, sgen, member, created_at) "
                       "VALUES (?, ?, ?, ?, 0, ?)", (inc.service, inc.user, gen, sgen, inc.created))
        resolved[inc] = (sgen, gen)
        return sgen, gen

    # -- runtime services, members and their incarnations ------------------------------------

    def services(self) -> list[tuple[str, dict[str, Any], float]]:
        return [(n, json.loads(d), c) for n, d, c in
                self.db.execute("SELECT name, definition, created_at FROM services ORDER BY name")]

    def service_requests(self) -> dict[str, Any]:
        """The JSON each runtime service was created with (None for those made before it was kept)."""
        return {n: (json.loads(r) if r is not None else None)
                for n, r in self.db.execute("SELECT name, request FROM services")}

    def add_service(self, name: str, definition: dict[str, Any], request: Any = None) -> float:
        """A runtime service: a new incarnation of its name (the previous one, if open, ends)."""
        now = time.time()

        def work() -> int:
            db = self.db
            self._lock_service(name)
            if db.execute("SELECT 1 FROM services WHERE name = ?", (name,)).fetchone() is not None:
                raise StoreConflict(f"Service '{name}' already exists")
            db.execute("INSERT INTO services VALUES (?, ?, ?, ?)",
                       (name, json.dumps(definition), now, None if request is None else json.dumps(request)))
            self._notify(f"service {name}")
            return self._new_service_incarnation(name, "runtime", now)

        self.service_gens[name] = self._transaction(work)
        return now

    def _notify(self, what: str) -> None:
        """Tell the other nodes (PostgreSQL: NOTIFY in this transaction; SQLite: one node)."""

    def _new_service_incarnation(self, name: str, origin: str, now: float) -> int:
        self._lock_service(name)
        db = self.db
        db.execute("UPDATE service_incarnations SET deleted_at = ? WHERE service = ? AND deleted_at IS NULL",
                   (now, name))
        db.execute("UPDATE user_incarnations SET deleted_at = ? WHERE service = ? AND deleted_at IS NULL",
                   (now, name))
        sgen = db.execute("SELECT coalesce(max(sgen), 0) + 1 FROM service_incarnations WHERE service = ?",
                          (name,)).fetchone()[0]
        db.execute("INSERT INTO service_incarnations (service, sgen, origin, created_at) VALUES (?, ?, ?, ?)",
                   (name, sgen, origin, now))
        return sgen

    def remove_service(self, name: str) -> None:
        """A runtime service deleted: its incarnation and its users' end; their counts stay."""
        now = time.time()

        def work() -> None:
            db = self.db
            self._notify(f"service {name}")
            db.execute("DELETE FROM services WHERE name = ?", (name,))
            db.execute("DELETE FROM members WHERE service = ?", (name,))
            db.execute("UPDATE service_incarnations SET deleted_at = ? WHERE service = ? AND deleted_at IS NULL",
                       (now, name))
            db.execute("UPDATE user_incarnations SET deleted_at = ? WHERE service = ? AND deleted_at IS NULL",
                       (now, name))

        self._transaction(work)

    def created_at(self, name: str) -> float:
        """A configured service: its open incarnation (one is made when none is open)."""
        def work() -> tuple[int, float]:
            self._lock_service(name)
            row = self.db.execute(
                "SELECT sgen, created_at, deleted_at FROM service_incarnations WHERE service = ? "
                "ORDER BY sgen DESC LIMIT 1", (name,)).fetchone()
            if row is not None and row[2] is None:
                return row[0], row[1]
            now = time.time()
            return self._new_service_incarnation(name, "config", now), now

        row = self.db.execute(
            "SELECT sgen, created_at FROM service_incarnations WHERE service = ? AND deleted_at IS NULL "
            "ORDER BY sgen DESC LIMIT 1", (name,)).fetchone()
        sgen, created = row if row is not None else self._transaction(work)
        self.service_gens[name] = sgen
        return created

    def members(self) -> dict[tuple[str, str], float]:
        return {(s, u): c for s, u, c in self.db.execute("SELECT service, username, created_at FROM members")}

    def add_member(self, service: str, username: str, earlier: list[Inc] | None = None) -> tuple[float, Inc]:
        """A new incarnation of a member: its previous one ends, counting restarts from 0.
        ``earlier``: incarnations of this user the loop counted but the database has not seen
        yet; they are resolved first, so that their counts stay with the previous incarnation."""
        now = time.time()
        resolved: dict[Inc, tuple[int, int]] = {}

        def work() -> Inc:
            db = self.db
            self._lock_service(service)
            for inc in earlier or ():
                self._resolve(inc, resolved)
            sgen = self._service_gen(service)
            self._notify(f"member {service}")
            db.execute("UPDATE user_incarnations SET deleted_at = ? WHERE service = ? AND username = ? "
                       "AND deleted_at IS NULL", (now, service, username))
            gen = db.execute("SELECT coalesce(max(gen), 0) + 1 FROM user_incarnations WHERE service = ? "
                             "AND username = ?", (service, username)).fetchone()[0]
            db.execute("INSERT INTO user_incarnations (service, username, gen, sgen, member, created_at) "
                       "VALUES (?, ?, ?, ?, 1, ?)", (service, username, gen, sgen, now))
            db.execute("INSERT INTO members VALUES (?, ?, ?) ON CONFLICT (service, username) DO UPDATE SET "
                       "created_at = excluded.created_at", (service, username, now))
            return Inc(service, username, sgen, gen, now)

        inc = self._transaction(work)
        for earlier_inc, (sgen, gen) in resolved.items():
            earlier_inc.sgen, earlier_inc.gen = sgen, gen
        return now, inc

    def remove_member(self, service: str, username: str) -> None:
        """The member's incarnation ends (its counts stay, readable until it is created again)."""
        now = time.time()

        def work() -> None:
            self._notify(f"member {service}")
            self.db.execute("DELETE FROM members WHERE service = ? AND username = ?", (service, username))
            self.db.execute("UPDATE user_incarnations SET deleted_at = ? WHERE service = ? AND username = ? "
                            "AND deleted_at IS NULL", (now, service, username))

        self._transaction(work)
