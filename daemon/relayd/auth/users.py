"""Password users in one SQLite file, hashed with argon2id.

Why argon2id (argon2-cffi) and not hashlib.scrypt: both are memory-hard, but argon2id is the
RFC 9106 / OWASP first choice, and argon2-cffi writes self-describing PHC strings
(``$argon2id$v=19$m=...,t=...,p=...$salt$hash``), so the cost parameters live in each hash and
can be raised later: a successful ``verify`` transparently rehashes with the current ones.

Cost: OWASP's argon2id minimum (19 MiB, t=2, p=1), ~20-40 ms per hash. To keep HTTP Basic
(which sends the password with every request) affordable, a successful check is remembered in
memory under an HMAC of ``user\\0password`` with a per-process random key, together with the
stored hash it matched; a hit still reads the row, so a password change or removal takes effect
at once. Nothing derived from passwords ever leaves the process.

Unknown users are verified against a dummy hash of the same cost, so the time taken does not
tell whether a user exists. The file is shared by processes (the daemon, ``relayctl users``, the
http_proxy management API); SQLite's locking serialises writers. The classic rollback journal
is used instead of WAL so that a root-run ``relayctl`` leaves no root-owned -wal/-shm files.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MAX_USERNAME = 128
MAX_PASSWORD = 1024
_CACHE_SIZE = 4096
_CACHE_TTL = 300.0

_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


class UserExists(Exception):
    pass


class UnknownUser(Exception):
    pass


class BadUsername(ValueError):
    pass


@dataclass(frozen=True)
class UserInfo:
    username: str
    created_at: float


def check_username(username: str) -> str:
    """Names usable in HTTP Basic: no colon (it separates the password), no control chars."""
    if not username or len(username) > MAX_USERNAME:
        raise BadUsername(f"user names are 1 to {MAX_USERNAME} characters")
    if ":" in username or any(unicodedata.category(c).startswith(("C", "Z")) and c != " " for c in username):
        raise BadUsername("user names may not contain ':' or control characters")
    if username != username.strip():
        raise BadUsername("user names may not start or end with spaces")
    return username


def check_password(password: str) -> str:
    if not password:
        raise ValueError("empty password")
    if len(password) > MAX_PASSWORD:
        raise ValueError(f"passwords are at most {MAX_PASSWORD} characters")
    return password


class UserStore:
    """Users of one ``basic`` auth method; thread-safe (each call opens its own connection)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._cache_key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._dummy: str | None = None
        self._initialised = False

    # -- storage -----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if not self._initialised:
            self._create()
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 10000")
        return conn

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        if fresh:
            # Create the file 0600 before SQLite touches it; hashes are still secrets.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            _match_owner(self.path)
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = DELETE")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS users ("
                " username TEXT PRIMARY KEY NOT NULL,"
                " hash TEXT NOT NULL,"
                " created_at REAL NOT NULL)"
            )
        finally:
            conn.close()
        self._initialised = True

    def open(self) -> None:
        """Create the database now (so permission problems show at start-up)."""
        self._connect().close()
        self.dummy_hash()  # so the first unknown user costs the same as the others

    # -- management --------------------------------------------------------------------------

    def add(self, username: str, password: str) -> UserInfo:
        check_username(username)
        digest = _HASHER.hash(check_password(password))
        created = time.time()
        conn = self._connect()
        try:
            conn.execute("INSERT INTO users (username, hash, created_at) VALUES (?, ?, ?)",
                         (username, digest, created))
        except sqlite3.IntegrityError:
            raise UserExists(username) from None
        finally:
            conn.close()
        return UserInfo(username, created)

    def remove(self, username: str) -> None:
        conn = self._connect()
        try:
            if conn.execute("DELETE FROM users WHERE username = ?", (username,)).rowcount == 0:
                raise UnknownUser(username)
        finally:
            conn.close()

    def set_password(self, username: str, password: str) -> None:
        digest = _HASHER.hash(check_password(password))
        conn = self._connect()
        try:
            if conn.execute("UPDATE users SET hash = ? WHERE username = ?", (digest, username)).rowcount == 0:
                raise UnknownUser(username)
        finally:
            conn.close()

    def list(self) -> list[UserInfo]:
        conn = self._connect()
        try:
            rows = conn.execute("SELECT username, created_at FROM users ORDER BY username").fetchall()
        finally:
            conn.close()
        return [UserInfo(u, c) for u, c in rows]

    def get(self, username: str) -> UserInfo | None:
        conn = self._connect()
        try:
            row = conn.execute("SELECT username, created_at FROM users WHERE username = ?",
                               (username,)).fetchone()
        finally:
            conn.close()
        return UserInfo(*row) if row else None

    def __contains__(self, username: str) -> bool:
        return self._stored_hash(username) is not None

    def __len__(self) -> int:
        conn = self._connect()
        try:
            return conn.execute("SELECT count(*) FROM users").fetchone()[0]
        finally:
            conn.close()

    # -- checking ----------------------------------------------------------------------------

    def _stored_hash(self, username: str) -> str | None:
        conn = self._connect()
        try:
            row = conn.execute("SELECT hash FROM users WHERE username = ?", (username,)).fetchone()
        finally:
            conn.close()
        return row[0] if row else None

    def verify(self, username: str, password: str) -> bool:
        """True if the password is right. CPU-heavy: call it through asyncio.to_thread."""
        if len(password) > MAX_PASSWORD or len(username) > MAX_USERNAME:
            return False
        stored = self._stored_hash(username)
        key = hmac.new(self._cache_key, f"{username}\0{password}".encode(), hashlib.sha256).digest()
        if stored is not None and self._cache_hit(key, stored):
            return True
        ok = verify_hash(stored if stored is not None else self.dummy_hash(), password)
        if stored is None or not ok:
            return False
        if _HASHER.check_needs_rehash(stored):
            self._rehash(username, stored, password)
        self._remember(key, stored)
        return True

    def dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = _HASHER.hash(secrets.token_urlsafe(16))
        return self._dummy

    def _rehash(self, username: str, old: str, password: str) -> None:
        conn = self._connect()
        try:
            conn.execute("UPDATE users SET hash = ? WHERE username = ? AND hash = ?",
                         (_HASHER.hash(password), username, old))
        finally:
            conn.close()

    def _cache_hit(self, key: bytes, stored: str) -> bool:
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                return False
            matched, at = entry
            if time.monotonic() - at > _CACHE_TTL or not hmac.compare_digest(matched, stored):
                del self._cache[key]
                return False
            return True

    def _remember(self, key: bytes, stored: str) -> None:
        with self._lock:
            self._cache[key] = (stored, time.monotonic())
            self._cache.move_to_end(key)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)


def verify_hash(stored: str, password: str) -> bool:
    """argon2 verification (constant time inside argon2); False on any mismatch."""
    try:
        return _HASHER.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _match_owner(path: Path) -> None:
    """When root creates the file (relayctl users), give it to the state directory's owner."""
    if os.geteuid() != 0:
        return
    st = path.parent.stat()
    try:
        os.chown(path, st.st_uid, st.st_gid)
    except OSError:
        pass
