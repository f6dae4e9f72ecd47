"""The read side of the usage counters (``counters.Counters``): what the database holds plus
what the event loop counted and has not written yet, so that a value read never goes down
(see ``counters`` for how deltas move from the loop to the database).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .store import NCOL, Inc, Store


def _add_into(target: list[int], values: list[int]) -> None:
    for i, v in enumerate(values):
        target[i] += v


class CounterReads:
    # Made by Counters.__init__ (see there).
    store: Store
    pending: dict[tuple[Inc, str], list[int]]
    inflight: dict[tuple[Inc, str], list[int]] | None
    pending_rejected: dict[tuple[str, int | None], int]
    inflight_rejected: dict[tuple[str, int | None], int] | None
    unsure: tuple[int, dict[tuple[Inc, str], list[int]], dict[tuple[str, int | None], int]] | None
    db_totals: dict[str, list[int]]
    db_rejected: dict[str, int]
    _lock: asyncio.Lock

    # A method, not a declared attribute: compiled by mypyc, an attribute named here would be a
    # slot of its own, never set, that Counters' method does not fill.
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the store's worker thread (``Counters.call``)."""
        raise NotImplementedError

    def held_requests(self) -> int:
        """Counted requests not (yet) in the database."""
        unsure = self.unsure[1] if self.unsure is not None else {}
        return sum(v[0] for source in (self.pending, self.inflight or {}, unsure) for (_, e), v in source.items()
                   if e == "")

    def totals(self) -> dict[str, list[int]]:
        """Per-service lifetime totals for metrics (synchronous, monotonic)."""
        out = {s: list(v) for s, v in self.db_totals.items()}
        unsure = self.unsure[1] if self.unsure is not None else {}
        for source in (self.inflight or {}, self.pending, unsure):
            for (inc, endpoint), values in source.items():
                if not endpoint:
                    _add_into(out.setdefault(inc.service, [0] * NCOL), values)
        return out

    @property
    def rejected_counts(self) -> dict[str, int]:
        """Per-service lifetime requests refused by auth (persisted; never decreases)."""
        out = dict(self.db_rejected)
        unsure = self.unsure[2] if self.unsure is not None else {}
        for source in (self.inflight_rejected or {}, self.pending_rejected, unsure):
            for (service, _sgen), n in source.items():
                out[service] = out.get(service, 0) + n
        return out

    def current_rejected(self, service: str) -> int:
        """Pending refusals of the service's current incarnation (the database has the rest)."""
        sgen = self.store.service_gens.get(service)
        unsure = self.unsure[2] if self.unsure is not None else {}
        return sum(n for source in (self.pending_rejected, unsure) for (s, g), n in source.items()
                   if s == service and g in (sgen, None))

    async def service_incarnations(self, service: str | None) -> list[tuple]:
        """Each incarnation of the services, refusals not yet written included."""
        async with self._lock:  # a flush moving refusals to the database cannot interleave
            return self._with_pending_refusals(await self.call(self.store.service_incarnations, service))

    def _with_pending_refusals(self, services: list[tuple]) -> list[tuple]:
        """Rows (name, sgen, origin, created, deleted, rejected, note): the latest incarnation
        of each name gets the refusals counted since the last flush. Call under ``_lock``."""
        latest: dict[str, int] = {}
        for row in services:
            latest[row[0]] = max(latest.get(row[0], 0), row[1] or 0)
        return [row[:5] + (row[5] + self.current_rejected(row[0]),) + row[6:]
                if (row[1] or 0) == latest[row[0]] else row for row in services]

    def _matching(self, service: str | None, user: str | None, endpoints: bool) -> dict[tuple[Inc, str], list[int]]:
        out: dict[tuple[Inc, str], list[int]] = {}
        sources = [self.pending] + ([self.unsure[1]] if self.unsure is not None else [])
        for source in sources:  # a failed flush's batch reads as not yet in the database
            for k, v in source.items():
                if (service is None or k[0].service == service) and (user is None or k[0].user == user) \
                        and bool(k[1]) == endpoints:
                    _add_into(out.setdefault(k, [0] * NCOL), v)
        return out

    async def current(self, service: str | None = None, user: str | None = None,
                      endpoints: bool = False) -> list[dict[str, Any]]:
        """The current incarnation of each user (database + deltas not yet written): dicts with
        service, user, sgen, gen, member, created, deleted, endpoint, values."""
        async with self._lock:
            snapshot = self._matching(service, user, endpoints)
            rows = await self.call(self.store.current, service, user, endpoints)
            incarnations = None
            if endpoints and snapshot:
                incarnations = await self.call(self.store.current, service, user, False)
        out: dict[tuple[str, str, str], dict[str, Any]] = {}
        heads: dict[tuple[str, str], dict[str, Any]] = {}
        entry: dict[str, Any] | None
        for row in rows:
            entry = {"service": row[0], "user": row[1], "sgen": row[2], "gen": row[3], "member": bool(row[4]),
                     "created": row[5], "deleted": row[6], "endpoint": row[7], "values": list(row[8:])}
            out[(row[0], row[1], row[7])] = entry
            heads[(row[0], row[1])] = entry
        for row in incarnations or ():
            heads[(row[0], row[1])] = {"sgen": row[2], "gen": row[3], "member": bool(row[4]),
                                       "created": row[5], "deleted": row[6]}
        for (inc, endpoint), values in snapshot.items():
            head = heads.get((inc.service, inc.user))
            if head is not None:
                if inc.gen is not None and (inc.sgen, inc.gen) != (head["sgen"], head["gen"]):
                    continue  # an earlier incarnation's late deltas
                if inc.gen is None and inc.sgen is not None and inc.sgen != head["sgen"]:
                    continue
            else:
                latest = self.store.service_gens.get(inc.service)
                if inc.sgen is not None and latest is not None and inc.sgen != latest:
                    continue
                head = {"sgen": inc.sgen, "gen": inc.gen, "member": False, "created": inc.created, "deleted": None}
                heads[(inc.service, inc.user)] = head
            entry = out.get((inc.service, inc.user, endpoint))
            if entry is None:
                entry = out[(inc.service, inc.user, endpoint)] = {
                    "service": inc.service, "user": inc.user, **head, "endpoint": endpoint, "values": [0] * NCOL}
            _add_into(entry["values"], values)
        return [out[k] for k in sorted(out)]

    async def known(self, service: str, user: str) -> bool:
        """Whether the user has a current incarnation (stats stay readable after removal)."""
        latest = self.store.service_gens.get(service)
        if any(inc.service == service and inc.user == user and inc.sgen in (latest, None) for inc, _ in self.pending):
            return True
        return await self.call(self.store.known_user, service, user)

    async def history(self, service: str | None = None, user: str | None = None,
                      endpoints: bool = False) -> tuple[list[tuple], list[dict[str, Any]]]:
        """(service incarnations, every user incarnation with its totals, deltas included)."""
        async with self._lock:
            snapshot = self._matching(service, user, endpoints)
            services = await self.call(self.store.service_incarnations, service)
            rows = await self.call(self.store.history, service, user, endpoints)
            services = self._with_pending_refusals(services)
        out: dict[tuple[str, str, int | None, str], dict[str, Any]] = {}
        latest: dict[tuple[str, str, int], int] = {}
        for row in rows:
            out[(row[0], row[1], row[3], row[8])] = {
                "service": row[0], "user": row[1], "sgen": row[2], "gen": row[3], "member": bool(row[4]),
                "created": row[5], "deleted": row[6], "note": row[7], "endpoint": row[8], "values": list(row[9:])}
            key = (row[0], row[1], row[2])
            latest[key] = max(latest.get(key, 0), row[3])
        for (inc, endpoint), values in snapshot.items():
            sgen = inc.sgen if inc.sgen is not None else self.store.service_gens.get(inc.service)
            gen = inc.gen if inc.gen is not None else latest.get((inc.service, inc.user, sgen or 0))
            entry = out.get((inc.service, inc.user, gen, endpoint))
            if entry is None:
                entry = out[(inc.service, inc.user, gen, endpoint)] = {
                    "service": inc.service, "user": inc.user, "sgen": sgen, "gen": gen, "member": False,
                    "created": inc.created, "deleted": None, "note": "not yet in the database",
                    "endpoint": endpoint, "values": [0] * NCOL}
            _add_into(entry["values"], values)
        ordered = sorted(out.values(), key=lambda e: (e["service"], e["sgen"] or 0, e["user"], e["gen"] or 0,
                                                      e["endpoint"]))
        return services, ordered
