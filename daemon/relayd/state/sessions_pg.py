"""Browser sessions of a ``globus_login`` method in PostgreSQL (schema ``globus_login:NAME``).

The same interface as globus_login.SessionStore, so a session made on one node is valid on every
node: the cookie key is in the shared ``meta`` table, sessions (only SHA-256 of their ids) and
pending token revocations in shared tables. The event loop checks cookies against its copy in
memory (cheap, and it keeps working while PostgreSQL is unreachable); writes are queued to one
worker thread in order, so a login never waits for the network, and a NOTIFY in their
transaction makes every other node re-read (``changed``, called by a Watcher): new sessions
appear there, sessions revoked anywhere disappear, within the propagation bound.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from relayd.auth.browser_session import session_from_row, session_row
from relayd.state.pg import Db, StateUnavailable, schema_name

log = logging.getLogger("relayd.auth")
_INSERT = ("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sid_hash) DO UPDATE SET "
           "last_seen = GREATEST(sessions.last_seen, excluded.last_seen)")
_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    sid_hash TEXT PRIMARY KEY, identity TEXT NOT NULL, tokens TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS revocations (
    token TEXT PRIMARY KEY, added DOUBLE PRECISION NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)
"""


class PgSessionStore:
    def __init__(self, url: str, method: str, health: Any = None) -> None:
        self.url = url
        self.schema = schema_name("globus_login", method)
        self.db = Db(url, self.schema, health)
        self.path = self.db.where
        self.queue = ThreadPoolExecutor(1, thread_name_prefix="sessions-db")
        self.unwritten: set[str] = set()  # sessions added here whose row is not committed yet
        self.retry: list[tuple[str, Any]] = []  # writes that failed while unreachable, in order
        self._lock = threading.Lock()
        self.db.transaction(self._migrate)

    def _migrate(self) -> None:
        self.db.execute("SELECT pg_advisory_xact_lock(hashtext(?))", ("relayd schema " + self.schema,))
        for statement in _DDL.split(";"):
            if statement.strip():
                self.db.execute(statement)

    def key(self) -> bytes:
        import secrets

        self.db.execute("INSERT INTO meta VALUES ('cookie_key', ?) ON CONFLICT (key) DO NOTHING",
                        (secrets.token_bytes(32).hex(),))
        row = self.db.execute("SELECT value FROM meta WHERE key = 'cookie_key'").fetchone()
        assert row is not None  # inserted just above unless already there
        return bytes.fromhex(row[0])

    def rows(self) -> list[tuple]:
        """Every session row (the watcher's re-read). Writes that failed while the database was
        unreachable go first, in order, so a reconnect neither ends a session made meanwhile
        nor brings back one ended meanwhile."""
        while True:
            with self._lock:
                if not self.retry:
                    break
                what, fn = self.retry[0]
            self.db.transaction(fn)  # raises while still unreachable: nothing is re-read then
            with self._lock:
                self.retry.pop(0)
            log.info("browser sessions: %s written after the database came back", what)
        return self.db.execute(
            "SELECT sid_hash, identity, tokens, created, last_seen, expires FROM sessions").fetchall()

    def load(self, method: str) -> dict[str, Any]:
        return {row[0]: session_from_row(method, row) for row in self.rows()}

    def _queue(self, what: str, fn: Any) -> None:
        """Run ``fn`` in a transaction on the writer thread, after earlier writes; if the
        database is unreachable, keep it for ``rows`` to write once it is back."""
        def run() -> None:
            with self._lock:
                if self.retry:  # keep the order: behind the writes already waiting
                    self.retry.append((what, fn))
                    return
            try:
                self.db.transaction(fn)
            except StateUnavailable as exc:
                log.error("browser sessions: %s not written yet (%s); kept, written when the database "
                          "is back", what, exc)
                with self._lock:
                    self.retry.append((what, fn))
            except Exception:
                log.exception("browser sessions: writing %s failed", what)
        self.queue.submit(run)

    def add(self, sid_hash: str, session: Any) -> None:
        row = session_row(sid_hash, session)
        with self._lock:
            self.unwritten.add(sid_hash)

        def work() -> None:
            self.db.execute(_INSERT, row)
            self.db.notify("session")
            with self._lock:
                self.unwritten.discard(sid_hash)
        self._queue("a new session", work)

    def seen(self, sid_hash: str, when: float) -> None:
        self._queue("last use", lambda: self.db.execute(
            "UPDATE sessions SET last_seen = GREATEST(last_seen, ?) WHERE sid_hash = ?", (when, sid_hash)))

    def end(self, sid_hashes: list[str], tokens: list[str]) -> None:
        now = time.time()

        def work() -> None:
            self.db.executemany("DELETE FROM sessions WHERE sid_hash = ?", [(h,) for h in sid_hashes])
            self.db.executemany("INSERT INTO revocations (token, added) VALUES (?, ?) ON CONFLICT DO NOTHING",
                                [(t, now) for t in tokens])
            self.db.notify("ended")
        self._queue("the end of sessions", work)

    def pending_revocations(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT token FROM revocations ORDER BY added").fetchall()]

    def revoked(self, tokens: list[str]) -> None:
        if tokens:
            self._queue("revocations", lambda: self.db.executemany(
                "DELETE FROM revocations WHERE token = ?", [(t,) for t in tokens]))

    def failed(self, tokens: list[str]) -> None:
        if tokens:
            self._queue("revocation attempts", lambda: self.db.executemany(
                "UPDATE revocations SET attempts = attempts + 1 WHERE token = ?", [(t,) for t in tokens]))

    def close(self) -> None:
        self.queue.shutdown(wait=True)
        self.db.close()
