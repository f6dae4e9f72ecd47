"""``basic`` auth users in PostgreSQL (schema ``basic:NAME``), the same interface as UserStore.

Checks read a copy of the table kept in memory (user -> hash), loaded at start and refreshed by
a relayd.state.pg.Watcher after every NOTIFY, reconnect and RESYNC interval: a password check
never waits for the network, and while PostgreSQL is unreachable the users known keep working.
A removal or password change made on another node is therefore in force here within the
propagation bound (RESYNC seconds, in practice the NOTIFY round trip). Writes go to the
database first (a 503 from the management API when it is unreachable), then to the copy.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from relayd.auth.users import (
    _HASHER,
    UnknownUser,
    UserExists,
    UserInfo,
    UserStore,
    check_password,
    check_username,
)
from relayd.state.pg import Db, StateUnavailable, schema_name

SCHEMA_VERSION = 1
_DDL = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL,
    note TEXT);
CREATE TABLE IF NOT EXISTS users (username TEXT PRIMARY KEY NOT NULL, hash TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL)
"""


class PgUserStore(UserStore):
    def __init__(self, url: str, method: str, health: Any = None) -> None:
        super().__init__(Path(f"/nonexistent/{method}"))  # no file: every storage call is overridden
        self.url = url
        self.schema = schema_name("basic", method)
        self.db = Db(url, self.schema, health)
        self.where = self.db.where
        self._copy: dict[str, tuple[str, float]] = {}
        self._copy_lock = threading.Lock()
        self._opened = False

    def __str__(self) -> str:
        return self.where

    # -- storage -------------------------------------------------------------------------------

    def _ensure(self) -> None:
        if not self._opened:
            self.db.transaction(self._migrate)
            self.reload()
            self._opened = True

    def _migrate(self) -> None:
        self.db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", ("relayd schema " + self.schema,))
        for statement in _DDL.split(";"):
            if statement.strip():
                self.db.execute(statement)
        row = self.db.execute("SELECT max(version) FROM schema_version").fetchone()
        version = row[0] if row else None
        if version is None:
            self.db.execute("INSERT INTO schema_version VALUES (?, ?, 'created')", (SCHEMA_VERSION, time.time()))
        elif version > SCHEMA_VERSION:
            from relayd.components.http_proxy.store import StoreError

            raise StoreError(f"{self.where} has schema version {version}; this relayd knows up to "
                             f"{SCHEMA_VERSION} (upgrade this node)")

    def open(self) -> None:
        self._ensure()
        self.dummy_hash()

    def reload(self) -> None:
        """Replace the in-memory copy with the table (the watcher calls this)."""
        rows = self.db.execute("SELECT username, hash, created_at FROM users").fetchall()
        with self._copy_lock:
            self._copy = {u: (h, c) for u, h, c in rows}

    def _write(self, fn: Any) -> Any:
        self._ensure()
        result = self.db.transaction(fn)
        self.reload()
        return result

    # -- management ----------------------------------------------------------------------------

    def add(self, username: str, password: str) -> UserInfo:
        check_username(username)
        digest = _HASHER.hash(check_password(password))
        created = time.time()

        def work() -> None:
            try:
                self.db.execute("INSERT INTO users (username, hash, created_at) VALUES (?, ?, ?)",
                                (username, digest, created))
            except psycopg.errors.UniqueViolation:
                raise UserExists(username) from None
            self.db.notify(f"user {username}")

        self._write(work)
        return UserInfo(username, created)

    def remove(self, username: str) -> None:
        def work() -> None:
            if self.db.execute("DELETE FROM users WHERE username = ?", (username,)).rowcount == 0:
                raise UnknownUser(username)
            self.db.notify(f"user {username}")

        self._write(work)

    def set_password(self, username: str, password: str) -> None:
        digest = _HASHER.hash(check_password(password))

        def work() -> None:
            if self.db.execute("UPDATE users SET hash = ? WHERE username = ?", (digest, username)).rowcount == 0:
                raise UnknownUser(username)
            self.db.notify(f"user {username}")

        self._write(work)

    def list(self) -> list[UserInfo]:
        self._ensure_or_copy()
        with self._copy_lock:
            return [UserInfo(u, c) for u, (_, c) in sorted(self._copy.items())]

    def get(self, username: str) -> UserInfo | None:
        self._ensure_or_copy()
        with self._copy_lock:
            entry = self._copy.get(username)
        return UserInfo(username, entry[1]) if entry else None

    def __len__(self) -> int:
        self._ensure_or_copy()
        return len(self._copy)

    def _stored_hash(self, username: str) -> str | None:
        self._ensure_or_copy()
        with self._copy_lock:
            entry = self._copy.get(username)
        return entry[0] if entry else None

    def _ensure_or_copy(self) -> None:
        """Reads use the copy; before the first load they try the database once."""
        if not self._opened:
            try:
                self._ensure()
            except StateUnavailable:
                if not self._copy:
                    raise

    def _rehash(self, username: str, old: str, password: str) -> None:
        try:
            self.db.execute("UPDATE users SET hash = ? WHERE username = ? AND hash = ?",
                            (_HASHER.hash(password), username, old))
        except StateUnavailable:
            pass  # next time

    def close(self) -> None:
        self.db.close()
