"""Usage counters: cheap in-memory deltas on the event loop, flushed to SQLite by a worker.

The event loop only adds to a dict of deltas (``record``). Every ``flush_interval`` the dict is
swapped for an empty one and handed to the store's single worker thread, which adds it to the
database in one transaction. Reads for the management API run in that same thread, after every
flush submitted before them, and add the deltas not yet handed over: a value read never goes
down. Prometheus totals are ``database totals + batch in flight + pending deltas``, and the
first two are swapped together on the loop when a flush completes, for the same reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .store import NCOL, OVERFLOW, Store

log = logging.getLogger("relayd.http_proxy")
MAX_ENDPOINT_LEN = 256


class Counters:
    def __init__(self, store: Store, max_endpoints: int) -> None:
        self.store = store
        self.max_endpoints = max_endpoints
        self.pending: dict[tuple[str, str, str], list[int]] = {}
        self.inflight: dict[tuple[str, str, str], list[int]] | None = None
        self.db_totals: dict[str, list[int]] = {}
        self.endpoints: dict[tuple[str, str], set[str]] = {}
        self.rejected_counts: dict[str, int] = {}
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="http-proxy-db")
        self._flusher: asyncio.Task | None = None
        self._closed = False

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.executor.submit(fn, *args))

    async def start(self, interval: float) -> None:
        await self.call(self.store.open)
        self.endpoints = await self.call(self.store.endpoint_keys)
        self.db_totals = await self.call(self.store.service_totals)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(interval))

    async def _flush_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)  # the flush period itself, not synchronisation
            try:
                await self.flush()
            except Exception:
                log.exception("flushing counters failed; will retry")

    async def flush(self) -> None:
        if not self.pending or self.inflight is not None:
            return
        batch, self.pending = self.pending, {}
        self.inflight = batch
        try:
            totals = await self.call(self.store.add, batch)
        except BaseException:
            # Put the batch back in front of newer deltas so nothing is lost.
            for key, values in batch.items():
                row = self.pending.setdefault(key, [0] * NCOL)
                for i, v in enumerate(values):
                    row[i] += v
            self.inflight = None
            raise
        self.db_totals = totals
        self.inflight = None

    async def close(self) -> None:
        """Final flush (graceful stop loses nothing), then release the database."""
        if self._closed:
            return
        self._closed = True
        if self._flusher:
            self._flusher.cancel()
            try:
                await self._flusher
            except BaseException:
                pass
        while self.inflight is not None:
            await asyncio.sleep(0.01)
        await self.flush()
        await self.call(self.store.close)
        self.executor.shutdown(wait=True)

    # -- the hot path ------------------------------------------------------------------------

    def record(self, service: str, user: str, endpoint: str, bytes_in: int, bytes_out: int,
               status: int) -> None:
        if len(endpoint) > MAX_ENDPOINT_LEN:
            endpoint = endpoint[:MAX_ENDPOINT_LEN]
        known = self.endpoints.get((service, user))
        if known is None:
            known = self.endpoints[(service, user)] = set()
        if endpoint not in known:
            if len(known) >= self.max_endpoints:
                endpoint = OVERFLOW
            known.add(endpoint)
        column = 2 + status // 100 if 100 <= status < 600 else 8
        pending = self.pending
        for key in ((service, user, ""), (service, user, endpoint)):
            row = pending.get(key)
            if row is None:
                row = pending[key] = [0] * NCOL
            row[0] += 1
            row[1] += bytes_in
            row[2] += bytes_out
            row[column] += 1

    def rejected(self, service: str) -> None:
        self.rejected_counts[service] = self.rejected_counts.get(service, 0) + 1

    # -- reading -------------------------------------------------------------------------------

    def totals(self) -> dict[str, list[int]]:
        """Per-service totals for metrics (synchronous, monotonic)."""
        out = {s: list(v) for s, v in self.db_totals.items()}
        for source in (self.inflight or {}, self.pending):
            for (service, _user, endpoint), values in source.items():
                if endpoint:
                    continue
                row = out.setdefault(service, [0] * NCOL)
                for i, v in enumerate(values):
                    row[i] += v
        return out

    async def rows(self, service: str | None = None, user: str | None = None,
                   endpoints: bool = False) -> dict[tuple[str, str, str], list[int]]:
        """Counter rows (database + deltas not yet handed to the worker)."""
        snapshot = {k: list(v) for k, v in self.pending.items()
                    if (service is None or k[0] == service) and (user is None or k[1] == user)
                    and (bool(k[2]) == endpoints)}
        rows = await self.call(self.store.rows, service, user, endpoints)
        out: dict[tuple[str, str, str], list[int]] = {}
        for row in rows:
            out[(row[0], row[1], row[2])] = list(row[3:])
        for key, values in snapshot.items():
            row = out.setdefault(key, [0] * NCOL)
            for i, v in enumerate(values):
                row[i] += v
        return out
