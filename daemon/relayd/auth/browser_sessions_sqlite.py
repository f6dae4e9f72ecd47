"""Browser sessions of a globus_login method in SQLite (without ``[state] url``; with it,
relayd.state.sessions_pg, the same interface): only SHA-256 hashes of session ids are stored,
with the tokens whose revocation is still pending."""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from pathlib import Path

from relayd.auth.browser_session import Session, session_from_row, session_row


class SessionStore:
    """Browser sessions and pending token revocations in SQLite (only hashes of session ids)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self.conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS sessions (
                sid_hash TEXT PRIMARY KEY, identity TEXT NOT NULL, tokens TEXT NOT NULL,
                created REAL NOT NULL, last_seen REAL NOT NULL, expires REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS revocations (
                token TEXT PRIMARY KEY, added REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
        """)

    def key(self) -> bytes:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'cookie_key'").fetchone()
        if row:
            return bytes.fromhex(row[0])
        key = secrets.token_bytes(32)
        self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('cookie_key', ?)", (key.hex(),))
        return bytes.fromhex(self.conn.execute("SELECT value FROM meta WHERE key = 'cookie_key'").fetchone()[0])

    def load(self, method: str) -> dict[str, Session]:
        return {row[0]: session_from_row(method, row) for row in self.conn.execute(
            "SELECT sid_hash, identity, tokens, created, last_seen, expires FROM sessions")}

    def add(self, sid_hash: str, session: Session) -> None:
        self.conn.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?)", session_row(sid_hash, session))

    def seen(self, sid_hash: str, when: float) -> None:
        self.conn.execute("UPDATE sessions SET last_seen = ? WHERE sid_hash = ?", (when, sid_hash))

    def end(self, sid_hashes: list[str], tokens: list[str]) -> None:
        """Delete sessions and queue their tokens for revocation, in one transaction."""
        now = time.time()
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany("DELETE FROM sessions WHERE sid_hash = ?", [(h,) for h in sid_hashes])
            self.conn.executemany("INSERT OR IGNORE INTO revocations (token, added) VALUES (?, ?)",
                                  [(t, now) for t in tokens])

    def pending_revocations(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT token FROM revocations ORDER BY added")]

    def revoked(self, tokens: list[str]) -> None:
        self.conn.executemany("DELETE FROM revocations WHERE token = ?", [(t,) for t in tokens])

    def failed(self, tokens: list[str]) -> None:
        self.conn.executemany("UPDATE revocations SET attempts = attempts + 1 WHERE token = ?",
                              [(t,) for t in tokens])

    def close(self) -> None:
        self.conn.close()


def default_sessions_db(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / f"browser-sessions-{name}.sqlite3"
