"""The http_proxy state store, one suite run against both implementations: SQLite (the
embedded default) and PostgreSQL (a real server started by tests/pg_server.py).

Hostile cases first: duplicate creates, unknown names, concurrent writers, a flush whose
acknowledgement was lost, a schema newer than the code.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.components.http_proxy.counters import Counters
from relayd.components.http_proxy.store import NCOL, Inc, Store, StoreConflict, StoreError
from relayd.state.pg import StateUnavailable


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path: Path):
    """Factory: backend() -> a new, opened Store on the same database each call."""
    stores: list[Store] = []
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        from relayd.state.http_proxy_pg import PgStore

        def make() -> Store:
            return PgStore(url, "web", tmp_path / f"node{len(stores)}")
    else:
        def make() -> Store:
            return Store(tmp_path / "state.sqlite3")

    def opened() -> Store:
        store = make()
        store.open()
        stores.append(store)
        return store

    opened.kind = request.param  # type: ignore[attr-defined]
    opened.make = make  # type: ignore[attr-defined]
    yield opened
    for store in stores:
        store.close()


def row(requests: int = 1, bytes_in: int = 10, bytes_out: int = 20) -> list[int]:
    values = [0] * NCOL
    values[0], values[1], values[2], values[4] = requests, bytes_in, bytes_out, requests
    return values


def total(store: Store, service: str = "svc") -> int:
    return store.totals()[0].get(service, [0])[0]


def test_duplicate_service_create_is_a_conflict_and_changes_nothing(backend):
    store = backend()
    store.add_service("svc", {"from": "/a", "to": "http://127.0.0.1:1"})
    with pytest.raises(StoreConflict):
        backend().add_service("svc", {"from": "/b", "to": "http://127.0.0.1:2"})
    assert [(n, d["from"]) for n, d, _ in store.services()] == [("svc", "/a")]
    assert [r[1] for r in store.service_incarnations("svc")] == [1]


def test_unknown_names_are_harmless(backend):
    store = backend()
    store.remove_member("nope", "nobody")
    store.remove_service("nope")
    assert not store.known_user("nope", "nobody")
    assert store.current("nope") == []
    assert store.history("nope") == []


def test_counts_go_to_the_current_incarnation_and_history_keeps_the_old_one(backend):
    store = backend()
    store.add_service("svc", {"from": "/a", "to": "http://x"})
    _, first = store.add_member("svc", "alice")
    store.add({(first, ""): row(3), (first, "/e"): row(3)}, {})
    _, second = store.add_member("svc", "alice")
    store.add({(second, ""): row(2)}, {("svc", None): 4})
    current = store.current("svc", "alice")
    assert [(r[3], r[8]) for r in current] == [(2, 2)]
    assert [(r[3], r[9]) for r in store.history("svc", "alice")] == [(1, 3), (2, 2)]
    assert total(store) == 5
    assert store.totals()[1]["svc"] == 4


def test_an_unresolved_incarnation_is_resolved_once_by_concurrent_writers(backend):
    a, b = backend(), backend()
    a.add_service("svc", {"from": "/a", "to": "http://x"})
    b.refresh_gens()
    # Two nodes count "bob" before either database row exists: one incarnation results.
    a.add({(Inc("svc", "bob", None, None), ""): row(1)}, {})
    b.add({(Inc("svc", "bob", None, None), ""): row(1)}, {})
    assert [(r[3], r[8]) for r in a.current("svc", "bob")] == [(1, 2)]


def test_concurrent_upserts_from_two_connections_add_up_exactly(backend):
    a, b = backend(), backend()
    _, inc = a.add_member("svc", "alice")
    b.refresh_gens()
    errors = []

    def hammer(store: Store, n: int) -> None:
        try:
            for i in range(n):
                store.add({(inc, ""): row(1), (inc, f"/e{i % 3}"): row(1)}, {("svc", inc.sgen): 1})
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(s, 60)) for s in (a, b)]
    if backend.kind == "sqlite":
        threads = [threading.Thread(target=hammer, args=(a, 120))]  # one connection per file
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert total(a) == 120
    assert sum(r[8] for r in a.current("svc", endpoints=True)) == 120
    assert a.totals()[1]["svc"] == 120


def test_a_flush_retried_after_a_lost_acknowledgement_counts_once(backend):
    store = backend()
    _, inc = store.add_member("svc", "alice")
    batch = {(inc, ""): row(7)}
    store.add(batch, {}, flush=("node-a", 1))  # committed; say the acknowledgement was lost
    store.add(batch, {}, flush=("node-a", 1))  # the retry with the same seq
    store.add(batch, {}, flush=("node-b", 1))  # another writer's seq 1 is its own
    assert total(store) == 14
    store.add({(inc, ""): row(1)}, {}, flush=("node-a", 2))
    assert total(store) == 15


def test_a_schema_newer_than_the_code_is_refused_with_a_clear_error(backend):
    store = backend()
    store._transaction(lambda: store.db.execute("INSERT INTO schema_version VALUES (99, 0, 'future')"))
    store.close()
    with pytest.raises(StoreError, match="schema version 99"):
        backend()


def test_configured_service_keeps_its_open_incarnation(backend):
    a = backend()
    created = a.created_at("conf")
    assert backend().created_at("conf") == created
    assert [r[1] for r in a.service_incarnations("conf")] == [1]


deltas = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["alice", "bob"]),
                            st.integers(1, 5), st.sampled_from(["ok", "before", "lost"])), max_size=25)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=deltas)
def test_random_flush_failures_across_two_writers_never_lose_or_double_a_count(backend, steps):
    """Each step: a writer flushes n requests; the flush succeeds, fails before commit, or
    commits but loses its acknowledgement. A failed flush is retried with its own seq (as
    Counters does) before anything newer; the sum in the database equals what was counted."""
    store = backend()
    # The writers' names are new in each example: hypothesis runs every example against the same
    # database, where an earlier example's writer (id(steps) could repeat) already marked these
    # seqs as applied, so its flushes were skipped as replays: counts "lost" by the test itself.
    example = uuid.uuid4().hex
    seqs = {"a": 0, "b": 0}
    unsure: dict[str, tuple[int, dict] | None] = {"a": None, "b": None}
    base = total(store)
    counted = 0
    for writer, user, n, fate in steps:
        counted += n
        key = f"{writer}-{example}"
        if unsure[writer] is not None:  # settle the failed one first (always works here)
            seq, batch = unsure[writer]  # type: ignore[misc]
            store.add(batch, {}, flush=(key, seq))
            unsure[writer] = None
        seqs[writer] += 1
        batch = {(Inc("svc", user, None, None), ""): row(n)}
        if fate == "ok":
            store.add(batch, {}, flush=(key, seqs[writer]))
        elif fate == "lost":
            store.add(batch, {}, flush=(key, seqs[writer]))
            unsure[writer] = (seqs[writer], batch)
        else:
            unsure[writer] = (seqs[writer], batch)
    for writer, pending in unsure.items():
        if pending is not None:
            store.add(pending[1], {}, flush=(f"{writer}-{example}", pending[0]))
    assert total(store) - base == counted


flushes = st.lists(st.tuples(st.sampled_from(["alice", "bob"]), st.integers(1, 4),
                             st.sampled_from(["ok", "ok", "before", "lost"])), min_size=1, max_size=12)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=flushes, crash=st.booleans())
def test_counters_with_failing_flushes_and_a_crash_count_every_request_once(backend, steps, crash):
    """The real Counters against a store whose flushes fail before committing or commit and
    then lose the acknowledgement; then either a graceful close, or a crash (the journal is all
    that is left) and a new Counters replaying it. The database ends with every request once."""
    fates: list[str] = []

    def flaky(store: Store):
        real = store.add_all

        def add_all(parts):
            fate = fates.pop(0) if fates else "ok"
            if fate == "before":
                raise StateUnavailable("connection lost before COMMIT")
            result = real(parts)
            if fate == "lost":
                raise StateUnavailable("connection lost after COMMIT (acknowledgement lost)")
            return result
        store.add_all = add_all  # type: ignore[method-assign]
        return store

    async def run() -> tuple[int, int]:
        counters = Counters(flaky(backend.make()), 100)
        await counters.start(3600)  # flushed by hand below
        start_total = total(counters.store)
        counted = 0
        for user, n, fate in steps:
            for _ in range(n):
                counters.record("svc", user, "/e", 1, 2, 200)
            counted += n
            fates.append(fate)
            await counters.flush()
        fates.clear()
        if crash:  # like SIGKILL: nothing more is written; the journal files stay
            counters._stop.set()
            counters.journal.close(remove=False)
            counters.executor.shutdown(wait=True)
            counters.store.close()
            counters = Counters(backend.make(), 100)
            await counters.start(3600)  # replays the dead writer's journal
        await counters.close()
        check = backend()
        return total(check) - start_total, counted

    added, counted = asyncio.run(run())
    assert added == counted


node_flushes = st.lists(st.tuples(st.sampled_from([0, 1]), st.sampled_from(["alice", "bob"]), st.integers(1, 4),
                                  st.sampled_from(["ok", "ok", "before", "lost"])), min_size=1, max_size=16)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=node_flushes, crashed=st.sampled_from([None, 0, 1]))
def test_two_nodes_random_deltas_and_flush_failures_sum_exactly(backend, steps, crashed):
    """Two nodes (two Counters, each its own store connection and journal writer) count the same
    users; their flushes interleave and fail at random (before COMMIT, or after it with the
    acknowledgement lost); one node may crash and be replaced by one replaying its journal. The
    sum in the database equals the sum of every delta recorded on either node."""
    fates: list[list[str]] = [[], []]

    def flaky(store: Store, node: int) -> Store:
        real = store.add_all

        def add_all(parts):
            fate = fates[node].pop(0) if fates[node] else "ok"
            if fate == "before":
                raise StateUnavailable("connection lost before COMMIT")
            result = real(parts)
            if fate == "lost":
                raise StateUnavailable("acknowledgement lost after COMMIT")
            return result
        store.add_all = add_all  # type: ignore[method-assign]
        return store

    async def run() -> tuple[int, int]:
        nodes = [Counters(flaky(backend.make(), i), 100) for i in (0, 1)]
        for counters in nodes:
            await counters.start(3600)
        start_total = total(nodes[0].store)
        counted = 0
        for node, user, n, fate in steps:
            for _ in range(n):
                nodes[node].record("svc", user, "/e", 1, 2, 200)
            counted += n
            fates[node].append(fate)
            await nodes[node].flush()
        fates[0].clear()
        fates[1].clear()
        if crashed is not None:
            dead = nodes[crashed]
            dead._stop.set()
            dead.journal.close(remove=False)
            dead.executor.shutdown(wait=True)
            dead.store.close()
            nodes[crashed] = Counters(backend.make(), 100)
            await nodes[crashed].start(3600)  # replays the dead writer's journal
        for counters in nodes:
            await counters.close()
        return total(backend()) - start_total, counted

    added, counted = asyncio.run(run())
    assert added == counted
