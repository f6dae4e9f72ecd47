"""``relayctl db migrate`` and ``relayctl import-state``: the PostgreSQL state (``[state] url``).

Both read relayd's configuration (``--config``, default /etc/relayd) and open the databases
directly; neither needs a running relayd.

``db migrate`` creates or migrates the schema of every http_proxy component, ``basic`` method and
``globus_login`` method of the configuration (relayd also does it when it starts; this is for
operators who migrate before a rolling upgrade). It refuses a schema newer than the code.

``import-state`` moves one node's SQLite state (state_dir) into PostgreSQL without losing a
count: the node must be stopped (its held-counts journals, if any, are replayed into its SQLite
file first, exactly once); then, per http_proxy component, in one PostgreSQL transaction, every
service incarnation, user incarnation, counter row, per-service total, runtime service and
membership is copied, and the import is recorded (table ``imports``, keyed by node and file):
running it again refuses, so nothing is imported twice. The target must not have counted
anything yet for that component (import before the nodes run on PostgreSQL); the configured
services' open incarnations a start on PostgreSQL made are replaced. Users of ``basic`` methods
and browser sessions are copied too (existing names kept). Totals are compared after the
commit and printed.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

TABLES = ("service_incarnations", "user_incarnations", "counters", "service_totals", "services", "members")


def _die(message: str, code: int = 1) -> int:
    print(f"relayctl: {message}", file=sys.stderr)
    return code


def _settings(args: argparse.Namespace) -> Any:
    from relayd.config import DEFAULT_CONFIG, load_config
    from relayd.plugins import Registry

    return load_config(args.config or DEFAULT_CONFIG, registry=Registry.discover()).settings


def _url(settings: Any) -> str | None:
    url = settings.state.url
    return url.get_secret_value() if url is not None else None


def _methods(settings: Any, method: str) -> list[str]:
    return sorted(n for n, a in settings.auth.items() if getattr(a, "method", None) == method)


def _http_proxies(settings: Any) -> dict[str, Any]:
    return {n: c for n, c in settings.components.items() if getattr(c, "kind", None) == "http_proxy"}


def cmd_migrate(args: argparse.Namespace, _client: Any) -> int:
    from relayd.components.http_proxy.store import StoreError
    from relayd.engines import redact_url
    from relayd.state.http_proxy_pg import PgStore
    from relayd.state.pg import StateUnavailable
    from relayd.state.sessions_pg import PgSessionStore
    from relayd.state.users_pg import PgUserStore

    settings = _settings(args)
    url = _url(settings)
    if url is None:
        return _die("[state] url is not set: the state is in SQLite files, which relayd migrates itself")
    try:
        for name in _http_proxies(settings):
            print(f"http_proxy {name}: {PgStore(url, name, Path(settings.state_dir)).migrate_now()}")
        for name in _methods(settings, "basic"):
            users = PgUserStore(url, name)
            users.open()
            users.close()
            print(f"basic {name}: schema {users.schema!r} ready")
        for name in _methods(settings, "globus_login"):
            PgSessionStore(url, name).close()
            print(f"globus_login {name}: schema 'globus_login:{name}' ready")
    except (StoreError, StateUnavailable) as exc:
        return _die(str(exc))
    print(f"PostgreSQL {redact_url(url)}: up to date")
    return 0


def _sqlite_total(db: Any) -> int:
    return db.execute("SELECT coalesce(sum(requests), 0) FROM counters WHERE endpoint = ''").fetchone()[0]


def _import_component(name: str, cfg: Any, settings: Any, url: str, node: str) -> str:
    from relayd.components.http_proxy import journal
    from relayd.components.http_proxy.counters import Counters
    from relayd.components.http_proxy.store import Store, StoreError
    from relayd.state.http_proxy_pg import PgStore

    path = cfg.state_db or Path(settings.state_dir) / f"http_proxy-{name}.sqlite3"
    if not path.exists():
        return f"http_proxy {name}: no SQLite state at {path}; nothing to import"
    for writer, paths in journal.orphans(path, None).items():
        with journal.Unlocked(paths) as lock:
            if not lock.ok:
                raise StoreError(f"{path} is in use (writer {writer} holds its journal): stop relayd first")
    source = Store(path)
    source.open()
    try:
        replay = Counters(source, 1 << 30)  # held counts of earlier runs go in first, exactly once
        try:
            for message in replay._replay_orphans():
                print(f"http_proxy {name}: {message}")
        finally:
            replay.executor.shutdown()
        rows = {t: source.db.execute(f"SELECT * FROM {t}").fetchall() for t in TABLES}
        src_total = _sqlite_total(source.db)
    finally:
        source.close()
    key = f"sqlite:{node}:{os.path.realpath(path)}"
    target = PgStore(url, name, Path(settings.state_dir))
    target.open()
    try:
        def work() -> None:
            db = target.db
            done = db.execute("SELECT imported_at FROM imports WHERE source = ?", (key,)).fetchone()
            if done is not None:
                raise StoreError(f"{path} of node {node} was already imported "
                                 f"({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(done[0]))}); "
                                 "nothing done (importing twice would double its counts)")
            busy = db.execute("SELECT (SELECT count(*) FROM counters) + (SELECT count(*) FROM user_incarnations) "
                              "+ (SELECT count(*) FROM services) + (SELECT count(*) FROM members) "
                              "+ (SELECT count(*) FROM service_incarnations WHERE origin != 'config')").fetchone()[0]
            if busy:
                raise StoreError(f"{target.where} already holds state for component {name!r}: import a node's "
                                 "SQLite state before any node runs on PostgreSQL")
            db.execute("DELETE FROM service_incarnations")  # opened by a start on PostgreSQL, nothing counted
            db.execute("DELETE FROM service_totals")
            for table in TABLES:
                if rows[table]:
                    marks = ", ".join("?" * len(rows[table][0]))
                    db.executemany(f"INSERT INTO {table} VALUES ({marks})", rows[table])
            db.execute("INSERT INTO imports VALUES (?, ?, ?, ?)", (key, time.time(), src_total, f"from {path}"))
            db.notify("import")
        target._transaction(work)
        pg_total = target.db.execute(
            "SELECT coalesce(sum(requests), 0) FROM counters WHERE endpoint = ''").fetchone()[0]
    finally:
        target.close()
    if pg_total != src_total:
        raise StoreError(f"http_proxy {name}: {src_total} requests in {path} but {pg_total} in PostgreSQL")
    return (f"http_proxy {name}: imported {path} ({len(rows['user_incarnations'])} user incarnations, "
            f"{len(rows['counters'])} counter rows, {src_total} requests; totals equal)")


def _import_users(name: str, cfg: Any, settings: Any, url: str) -> str:
    import sqlite3

    from relayd.auth.basic import default_users_db
    from relayd.state.users_pg import PgUserStore

    path = cfg.users_db or default_users_db(Path(settings.state_dir), name)
    if not path.exists():
        return f"basic {name}: no SQLite users at {path}"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT username, hash, created_at FROM users").fetchall()
    store = PgUserStore(url, name)
    store.open()
    try:
        def work() -> int:
            added = 0
            for row in rows:
                cur = store.db.execute("INSERT INTO users VALUES (?, ?, ?) ON CONFLICT (username) DO NOTHING", row)
                added += cur.rowcount
            store.db.notify("import")
            return added
        added = store.db.transaction(work)
    finally:
        store.close()
    return f"basic {name}: {added} of {len(rows)} users copied (names already there kept)"


def _import_sessions(name: str, cfg: Any, settings: Any, url: str) -> str:
    import sqlite3

    from relayd.auth.globus_login import default_sessions_db
    from relayd.state.sessions_pg import PgSessionStore

    path = cfg.sessions_db or default_sessions_db(Path(settings.state_dir), name)
    if not path.exists():
        return f"globus_login {name}: no SQLite sessions at {path}"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        sessions = conn.execute("SELECT * FROM sessions").fetchall()
        revocations = conn.execute("SELECT * FROM revocations").fetchall()
        meta = conn.execute("SELECT key, value FROM meta").fetchall()
    store = PgSessionStore(url, name)
    try:
        def work() -> None:
            store.db.executemany("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO NOTHING", meta)
            store.db.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", sessions)
            store.db.executemany("INSERT INTO revocations VALUES (?, ?, ?) ON CONFLICT DO NOTHING", revocations)
            store.db.notify("import")
        store.db.transaction(work)
    finally:
        store.close()
    return f"globus_login {name}: {len(sessions)} sessions, {len(revocations)} pending revocations copied"


def user_store_for(args: argparse.Namespace) -> Any:
    """``relayctl users`` with ``[state] url`` set: the basic method's PostgreSQL user store
    (read from the local configuration, which holds the URL's secret), else None."""
    from relayd.config import ConfigError

    if getattr(args, "db", None):
        return None  # an explicit SQLite file
    try:
        settings = _settings(args)
    except (ConfigError, OSError):
        return None
    url = _url(settings)
    names = _methods(settings, "basic")
    name = args.auth or (names[0] if len(names) == 1 else None)
    if url is None or name not in names:
        return None
    from relayd.state.users_pg import PgUserStore

    return PgUserStore(url, name)


def cmd_import_state(args: argparse.Namespace, _client: Any) -> int:
    from relayd.components.http_proxy.store import StoreError
    from relayd.state.pg import StateUnavailable

    settings = _settings(args)
    url = _url(settings)
    if url is None:
        return _die("[state] url is not set: there is no PostgreSQL to import into")
    node = args.node or settings.cluster.node or socket.gethostname()
    status = 0
    for name, cfg in _http_proxies(settings).items():
        if args.component and name != args.component:
            continue
        try:
            print(_import_component(name, cfg, settings, url, node))
        except (StoreError, StateUnavailable) as exc:
            status = _die(str(exc))
    if args.component is None:
        for name in _methods(settings, "basic"):
            print(_import_users(name, settings.auth[name], settings, url))
        for name in _methods(settings, "globus_login"):
            print(_import_sessions(name, settings.auth[name], settings, url))
    return status


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("db", help="the PostgreSQL state database ([state] url)")
    db = s.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    m = db.add_parser("migrate", help="create or migrate every schema the configuration uses")
    m.set_defaults(func=cmd_migrate, no_daemon=True)
    s = sub.add_parser("import-state", help="move this node's SQLite state (state_dir) into PostgreSQL, once")
    s.add_argument("--component", metavar="NAME", help="only this http_proxy component (default: all, "
                   "with basic users and browser sessions)")
    s.add_argument("--node", help="this node's name in the import record (default: [cluster] node)")
    s.set_defaults(func=cmd_import_state, no_daemon=True)
