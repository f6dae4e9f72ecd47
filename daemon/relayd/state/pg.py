"""PostgreSQL plumbing shared by the stores: connections, errors, LISTEN/NOTIFY.

Driver: psycopg 3 (chosen by measurement over asyncpg, bench/cluster/state_driver.py: the same
flush, management and lookup costs within noise on our box; psycopg's synchronous API lets the
PostgreSQL stores keep the SQLite stores' interface and their one worker thread, so both run
the same code and the same tests). The LISTEN side uses psycopg's asyncio connection.

Each store works in its own schema (``SET search_path``), so the SQL is the SQLite stores' SQL
(``?`` placeholders are rewritten to ``%s``) and two components never see each other's tables.
A change is announced with ``pg_notify(channel, payload)`` in the same transaction (delivered
only if it commits); every node LISTENs and re-reads. Because a notification can be missed
while a node is disconnected, the watcher also re-reads after every (re)connect and every
``RESYNC`` seconds: a change made on any node is in force everywhere within ``RESYNC`` seconds
plus one read while PostgreSQL is reachable (in practice: the NOTIFY round trip, milliseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from relayd.engines import redact_url

log = logging.getLogger("relayd.state")
RESYNC = 5.0  # seconds between full re-reads (the propagation bound when a NOTIFY is lost)
CONNECT_TIMEOUT = 3  # seconds: an unreachable server must not hold a worker for long
BACKOFF_MAX = 5.0
_PLACEHOLDER = re.compile(r"\?")


class StateUnavailable(ConnectionError):
    """PostgreSQL cannot be reached; nothing was changed (an OSError, as a full disk is for
    SQLite, so callers that answer 503 for one answer 503 for the other)."""


def schema_name(kind: str, name: str) -> str:
    return f"{kind}:{name}"


def channel_name(schema: str) -> str:
    # Channel names are identifiers (at most 63 bytes); schema names are short enough.
    return f"relayd {schema}"[:63]


def connect(url: str, schema: str | None = None, autocommit: bool = True) -> psycopg.Connection:
    """A connection with timeouts that detect a dead peer; search_path set to ``schema``."""
    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT,
                               keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                               tcp_user_timeout=10000, application_name="relayd")
    except psycopg.OperationalError as exc:
        raise StateUnavailable(f"PostgreSQL {redact_url(url)}: {_first_line(exc)}") from None
    if schema is not None:
        try:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        except psycopg.errors.UniqueViolation:
            pass  # two nodes creating it at once: it exists now
        except psycopg.errors.InsufficientPrivilege:
            pass  # created by the operator; SET below says if it is missing
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        if not autocommit:
            conn.commit()
    return conn


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Db:
    """A reconnecting connection with the sqlite3-like calls the stores use (``execute``
    returning an iterable cursor, ``executemany``), thread-safe by a lock. Connection failures
    become StateUnavailable and are reported to the engine health record."""

    def __init__(self, url: str, schema: str, health: Any = None) -> None:
        self.url = url
        self.schema = schema
        self.health = health
        self.conn: psycopg.Connection | None = None
        self.lock = threading.RLock()
        self.where = f"PostgreSQL {redact_url(url)} (schema {schema})"

    def _conn(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed or self.conn.broken:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            try:
                self.conn = connect(self.url, self.schema)
            except StateUnavailable as exc:
                self._report(False, str(exc))
                raise
        return self.conn

    def _report(self, up: bool, detail: str = "") -> None:
        if self.health is not None:
            self.health.report(up, detail)

    def _failed(self, exc: psycopg.Error) -> StateUnavailable:
        detail = f"{self.where}: {_first_line(exc)}"
        self._report(False, detail)
        if self.conn is not None:
            self.conn.close()  # a fresh one next time
            self.conn = None
        return StateUnavailable(detail)

    def execute(self, query: str, args: Sequence[Any] = ()) -> psycopg.Cursor:
        with self.lock:
            conn = self._conn()
            try:
                cursor = conn.execute(_PLACEHOLDER.sub("%s", query), args)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if isinstance(exc, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable):
                    raise
                raise self._failed(exc) from None
            self._report(True)
            return cursor

    def executemany(self, query: str, rows: Iterable[Sequence[Any]]) -> None:
        with self.lock:
            conn = self._conn()
            try:
                with conn.cursor() as cursor:
                    cursor.executemany(_PLACEHOLDER.sub("%s", query), list(rows))
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                raise self._failed(exc) from None

    def transaction(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in one transaction (rolled back on any error)."""
        with self.lock:
            conn = self._conn()
            try:
                with conn.transaction():
                    result = fn()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                raise self._failed(exc) from None
            self._report(True)
            return result

    def tables(self) -> set[str]:
        return {r[0] for r in self.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", (self.schema,))}

    def notify(self, payload: str = "") -> None:
        """Announce a change (call inside the transaction that makes it)."""
        self.execute("SELECT pg_notify(?, ?)", (channel_name(self.schema), payload))

    def close(self) -> None:
        with self.lock:
            if self.conn is not None:
                self.conn.close()
                self.conn = None


class Watcher:
    """LISTENs on a store's channel and calls ``refresh`` (coalesced: one run at a time, again
    if something arrived meanwhile) after each notification, after every (re)connect and every
    RESYNC seconds. Reconnects with exponential backoff; reports reachability."""

    def __init__(self, url: str, schema: str, refresh: Callable[[], Awaitable[None]], health: Any = None,
                 resync: float = RESYNC) -> None:
        self.url = url
        self.channel = channel_name(schema)
        self.refresh = refresh
        self.health = health
        self.resync = resync
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.refreshes = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen()), loop.create_task(self._refresher())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # it was cancelled; whatever it raised on the way out is moot
        self._tasks = []

    async def _refresher(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.refresh()
                self.refreshes += 1
            except Exception as exc:
                log.debug("state refresh from %s failed: %s", redact_url(self.url), exc)

    async def _listen(self) -> None:
        delay = 0.2
        while True:
            try:
                aconn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, keepalives=1,
                    keepalives_idle=5, keepalives_interval=2, keepalives_count=3, tcp_user_timeout=10000,
                    application_name="relayd listener")
            except (psycopg.Error, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            try:
                await aconn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                if self.health is not None:
                    self.health.report(True)
                delay = 0.2
                self._dirty.set()  # whatever was missed while disconnected
                while True:
                    async for _ in aconn.notifies(timeout=self.resync):
                        self._dirty.set()
                    self._dirty.set()  # periodic re-read: the bound if a notification is lost
                    await aconn.execute("SELECT 1")  # notices a dead connection
            except (psycopg.Error, OSError) as exc:
                self._down(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
            finally:
                await aconn.close()

    def _down(self, exc: BaseException) -> None:
        if self.health is not None:
            self.health.report(False, f"PostgreSQL {redact_url(self.url)}: {_first_line(exc)}")
