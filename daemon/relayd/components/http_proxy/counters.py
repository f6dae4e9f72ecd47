"""Usage counters: cheap in-memory deltas on the event loop, flushed to SQLite by a worker.

The event loop only adds to a dict of deltas (``record``), keyed by the user's current
incarnation (an ``Inc``: a user created again through the management API starts a new one).
Every ``flush_interval`` the dict is swapped for an empty one and handed to the store's single
worker thread, which adds it to the database in one transaction.

Nothing counted is ever dropped nor counted twice. Every flush carries this writer's next
sequence number, recorded in the same transaction (Store.add ``flush``). A flush that failed
may still have committed (PostgreSQL: the COMMIT went out, its acknowledgement never came
back), so its batch is kept apart, *unsure*, and retried alone with the same number before any
newer deltas: the database adds it only if that number is not recorded yet. The retry happens
every interval, and a failed flush is followed by a snapshot of
everything held into this writer's preallocated journal files (journal.py), so that a crash
meanwhile loses at most one interval. At stop, deltas the database still cannot take are
snapshotted there too and ``close`` raises ``CountsNotSaved`` naming how many requests are
held where; whoever opens the database next replays the snapshot exactly once.

Reads for the management API (``counter_reads``) wait for a flush in progress, then run in the worker after it and
add the deltas not yet handed over, so a value read never goes down. Prometheus totals are
``database totals + batch in flight + pending deltas``, swapped together on the loop when a
flush completes, for the same reason.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import journal
from .counter_reads import CounterReads
from .journal import CountsNotSaved
from .store import NCOL, OVERFLOW, Inc, Store

log = logging.getLogger("relayd.http_proxy")
MAX_ENDPOINT_LEN = 256
ORPHAN_SCAN = 5.0  # seconds between looks for snapshots of writers that ended
REPORT_EVERY = 60.0  # seconds between reminders while the database refuses counts
_ROW_BYTES = 48  # a held counter row in a compressed snapshot, generously (measured ~25)


class Counters(CounterReads):
    def __init__(self, store: Store, max_endpoints: int) -> None:
        self.store = store
        self.max_endpoints = max_endpoints
        self.live: dict[tuple[str, str], Inc] = {}  # (service, user) -> what new counts go to
        self.pending: dict[tuple[Inc, str], list[int]] = {}
        self.inflight: dict[tuple[Inc, str], list[int]] | None = None
        self.pending_rejected: dict[tuple[str, int | None], int] = {}
        self.inflight_rejected: dict[tuple[str, int | None], int] | None = None
        # A failed flush, kept apart until a retry with its own seq settles it: (seq, batch, rejected).
        self.unsure: tuple[int, dict[tuple[Inc, str], list[int]], dict[tuple[str, int | None], int]] | None = None
        self.flush_seq = 0
        self.db_totals: dict[str, list[int]] = {}
        self.db_rejected: dict[str, int] = {}
        self.nkeys = 0  # counter rows the live incarnations may hold (journal reserve size)
        self.writer = journal.new_writer_id()
        self.journal = journal.Journal(store.path, self.writer)
        self.snapshot_seq = 0  # last snapshot scheduled
        self._snapshot_held: tuple[int, int] = (0, 0)  # (seq, requests) of the last one written
        self.failing_since: float | None = None
        self.last_error = ""
        self._next_report = 0.0
        self._reserve_warned = False
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="http-proxy-db")
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._flusher: asyncio.Task | None = None
        self._closed = False
        self._next_scan = 0.0

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.executor.submit(fn, *args))

    async def _call_to_end(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, BaseException | None, bool]:
        """(result, error, cancelled): like ``call``, but if this task is cancelled meanwhile
        it still waits for the worker (whether a write committed must be known)."""
        future = asyncio.wrap_future(self.executor.submit(fn, *args))
        cancelled = False
        while not future.done():
            try:
                await asyncio.wait({future})  # never cancels the future itself
            except asyncio.CancelledError:
                cancelled = True
        if future.cancelled():
            return None, asyncio.CancelledError(), True
        error = future.exception()
        return (None if error else future.result()), error, cancelled

    async def start(self, interval: float) -> None:
        await self.call(self.store.open)
        try:
            await self.call(self.journal.open)
        except OSError as exc:  # counting works; held counts could not be kept across a stop
            log.error("cannot create the held-counts journal %s: %s", self.journal.paths[0], exc)
        for message in await self.call(self._replay_orphans):
            log.warning("%s", message)
        incs = await self.call(self.store.current_incarnations)
        self.live = {(inc.service, inc.user): inc for inc, _open in incs}
        self.nkeys = sum(len(inc.endpoints) + 1 for inc in self.live.values())
        self.db_totals, self.db_rejected = await self.call(self.store.totals)
        await self._reserve()
        self._next_scan = asyncio.get_running_loop().time() + ORPHAN_SCAN
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(interval))

    async def _flush_loop(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), interval)  # the flush period itself
            except TimeoutError:
                pass
            if self._stop.is_set():
                return  # close() makes the last flush
            try:
                await self.flush()
                if self.failing_since is None and loop.time() >= self._next_scan:
                    self._next_scan = loop.time() + ORPHAN_SCAN
                    await self._scan_orphans()
            except Exception:
                log.exception("flushing counters failed unexpectedly; will retry")

    # -- writing -------------------------------------------------------------------------------

    async def flush(self) -> bool:
        """Hand the pending deltas to the database. False if it refused them: they are then
        kept (the failed batch apart, see ``unsure``) and snapshotted to the journal."""
        async with self._lock:
            if self.unsure is not None:  # settle the failed flush first, with its own seq
                seq, batch, rejected = self.unsure
                self.unsure = None  # in flight now (counted once by the readers); back on failure
                if not await self._flush_batch(seq, batch, rejected, 0):
                    return False
            if not self.pending and not self.pending_rejected:
                return True
            batch, rejected = self.pending, self.pending_rejected
            self.pending, self.pending_rejected = {}, {}
            self.flush_seq += 1
            covers = self.snapshot_seq  # every snapshot so far holds a subset of this batch
            ok = await self._flush_batch(self.flush_seq, batch, rejected, covers)
            if ok and self.nkeys * _ROW_BYTES > self.journal.reserved:
                await self._reserve()
            return ok

    async def _flush_batch(self, seq: int, batch: dict[tuple[Inc, str], list[int]],
                           rejected: dict[tuple[str, int | None], int], covers: int) -> bool:
        """One idempotent Store.add (under the lock). On failure the batch becomes ``unsure``."""
        self.inflight, self.inflight_rejected = batch, rejected
        result, error, cancelled = await self._call_to_end(
            self.store.add, batch, rejected, self.writer, covers, (self.writer, seq))
        self.inflight = self.inflight_rejected = None
        if error is None:
            self.db_totals, self.db_rejected = result
            self._saved(batch)
        else:
            self.unsure = (seq, batch, rejected)
            self._failed(error)
            if not cancelled:
                try:
                    await self._snapshot()
                except OSError as exc:
                    self._snapshot_failed(exc)
        if cancelled:
            raise asyncio.CancelledError
        return error is None

    def _failed(self, error: BaseException) -> None:
        now = time.monotonic()
        self.last_error = str(error) or type(error).__name__
        if self.failing_since is None:
            self.failing_since = now
            self._next_report = now + REPORT_EVERY
            log.error("cannot write usage counters to %s: %s; holding %d counted requests in memory and "
                      "in the journal %s.{0,1}, retrying every flush", self.store.where, self.last_error,
                      self.held_requests(), self.journal.paths[0].with_suffix(""))
        elif now >= self._next_report:
            self._next_report = now + REPORT_EVERY
            log.error("still cannot write usage counters to %s (%s, for %.0fs): %d counted requests held",
                      self.store.where, self.last_error, now - self.failing_since, self.held_requests())

    def _saved(self, batch: dict[tuple[Inc, str], list[int]]) -> None:
        if self.failing_since is not None:
            requests = sum(v[0] for (_, e), v in batch.items() if e == "")
            log.warning("usage counters written to %s again after %.1fs: %d held requests saved",
                        self.store.where, time.monotonic() - self.failing_since, requests)
            self.failing_since = None
            self.last_error = ""

    def _snapshot_failed(self, exc: BaseException) -> None:
        log.error("cannot write the held counts to the journal %s either: %s (they stay in memory)",
                  self.journal.paths[self.snapshot_seq % 2], exc)

    async def _snapshot(self) -> Path:
        """Write everything held to the journal (called under the lock, nothing in flight)."""
        held = {key: list(values) for key, values in self.pending.items()}
        rejected = dict(self.pending_rejected)
        self.snapshot_seq += 1
        path = await self.call(self._write_snapshot, self.snapshot_seq, held, rejected, self.unsure)
        self._snapshot_held = (self.snapshot_seq, self.held_requests())
        return path

    def _write_snapshot(self, seq: int, held: dict[tuple[Inc, str], list[int]],
                        rejected: dict[tuple[str, int | None], int], unsure: Any = None) -> Path:
        payload = journal.encode(self.writer, seq, held, rejected, unsure=unsure)
        try:
            return self.journal.write(seq, payload)
        except OSError as exc:
            folded = journal.encode(self.writer, seq, held, rejected, fold=True, unsure=unsure)
            if len(folded) >= len(payload):
                raise
            path = self.journal.write(seq, folded)
            log.warning("the held counts did not fit in the journal (%s): per-endpoint detail folded into "
                        "%r, totals kept", exc, OVERFLOW)
            return path

    async def _reserve(self) -> None:
        try:
            await self.call(self.journal.reserve, self.nkeys * _ROW_BYTES * 2)
            self._reserve_warned = False
        except OSError as exc:
            if not self._reserve_warned:
                self._reserve_warned = True
                log.warning("cannot preallocate the held-counts journal %s: %s", self.journal.paths[0], exc)

    async def _scan_orphans(self) -> None:
        try:
            messages = await self.call(self._replay_orphans)
        except (sqlite3.Error, OSError, ValueError, KeyError, zlib.error) as exc:
            log.error("cannot replay held counts of earlier writers yet: %s", exc)
            return
        for message in messages:
            log.warning("%s", message)
        if messages:
            self.db_totals, self.db_rejected = await self.call(self.store.totals)

    def _replay_orphans(self) -> list[str]:
        """Worker: apply the latest snapshot of every writer that ended, exactly once."""
        return journal.replay_orphans(self.store, self.writer)

    async def close(self) -> None:
        """Final flush (a graceful stop loses nothing), then release the database. Raises
        CountsNotSaved when the database cannot take the last counts (they are then held in
        the journal, or, if even that fails, lost: the message says which)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._flusher is not None:
            try:
                await self._flusher  # returns once _stop is set, after the flush in progress
            except asyncio.CancelledError:
                if not self._flusher.cancelled():
                    raise  # close() itself was cancelled
        problem: CountsNotSaved | None = None
        saved = await self.flush()
        if not saved:
            async with self._lock:
                held = self.held_requests()
                where = self.journal.last
                try:
                    if self._snapshot_held != (self.snapshot_seq, held) or where is None:
                        where = await self._snapshot()  # anything counted since the last one
                    problem = CountsNotSaved(
                        f"{held} counted requests could not be written to {self.store.where} "
                        f"({self.last_error}); they are held in {where} and will be added when "
                        "the database is next opened", held, where)
                    log.error("%s", problem)
                except OSError as exc:
                    problem = CountsNotSaved(
                        f"{held} counted requests could not be written to {self.store.where} "
                        f"({self.last_error}) nor to the journal {self.journal.paths[0].parent} ({exc}): "
                        "they are LOST", held, None)
                    log.critical("%s", problem)
        try:
            await self.call(self._release, saved)
        finally:
            self.executor.shutdown(wait=True)
        if problem is not None:
            raise problem

    def _release(self, saved: bool) -> None:
        try:
            self.journal.close(remove=saved)
        finally:
            self.store.close()

    # -- the hot path ------------------------------------------------------------------------

    def record(self, service: str, user: str, endpoint: str, bytes_in: int, bytes_out: int,
               status: int) -> None:
        if len(endpoint) > MAX_ENDPOINT_LEN:
            endpoint = endpoint[:MAX_ENDPOINT_LEN]
        inc = self.live.get((service, user))
        if inc is None:
            inc = self.live[(service, user)] = Inc(service, user, self.store.service_gens.get(service), None)
            self.nkeys += 1
        known = inc.endpoints
        if endpoint not in known:
            if len(known) >= self.max_endpoints:
                endpoint = OVERFLOW
            if endpoint not in known:
                known.add(endpoint)
                self.nkeys += 1
        column = 2 + status // 100 if 100 <= status < 600 else 8
        pending = self.pending
        for key in ((inc, ""), (inc, endpoint)):
            row = pending.get(key)
            if row is None:
                row = pending[key] = [0] * NCOL
            row[0] += 1
            row[1] += bytes_in
            row[2] += bytes_out
            row[column] += 1

    def rejected(self, service: str) -> None:
        key = (service, self.store.service_gens.get(service))
        self.pending_rejected[key] = self.pending_rejected.get(key, 0) + 1

    # -- incarnations (management API) ------------------------------------------------------------

    async def add_member(self, service: str, user: str) -> float:
        """A new incarnation of ``user`` in ``service``: counts from 0 on."""
        async with self._lock:
            earlier = [inc for (inc, _e) in self.pending if inc.service == service and inc.user == user
                       and inc.gen is None]
            created, inc = await self.call(self.store.add_member, service, user, earlier)
        self.live[(service, user)] = inc
        self.nkeys += 1
        return created

    async def remove_member(self, service: str, user: str) -> None:
        # The incarnation ends; requests still in progress are counted to it when they end.
        await self.call(self.store.remove_member, service, user)

    async def add_service(self, name: str, definition: dict[str, Any], request: Any) -> float:
        created = await self.call(self.store.add_service, name, definition, request)
        self._forget_service(name)
        return created

    async def remove_service(self, name: str) -> None:
        await self.call(self.store.remove_service, name)
        self._forget_service(name)

    def _forget_service(self, name: str) -> None:
        # New counts start new incarnations; deltas already counted keep theirs.
        for key in [k for k in self.live if k[0] == name]:
            del self.live[key]
