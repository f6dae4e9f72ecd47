"""Several nodes, one PostgreSQL state: which store a component uses, and how it learns the
changes other nodes make (runtime services, memberships, user incarnations).

With ``[state] url`` unset the component is alone with its SQLite file and nothing here runs.
With it set, a relayd.state.pg.Watcher re-reads the component's services and members after
every NOTIFY on its schema's channel, after every reconnect, and every RESYNC seconds, and
applies the difference to what the event loop uses (routes, the members set, the incarnation
each user's new counts go to). When PostgreSQL is unreachable the node keeps serving what it
knows; counts are held (memory + journal) until it is back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from relayd import state
from relayd.lifecycle import State
from relayd.state.pg import Watcher, schema_name

from .config import ServiceConfig
from .store import Store

if TYPE_CHECKING:
    from . import HttpProxy


def make_store(component: HttpProxy) -> Store:
    url = state.postgres_url(component.context)
    if url is None:
        return Store(component.db_path)
    from relayd.state.http_proxy_pg import PgStore

    health = state.health(component.context, url)
    return PgStore(url, component.name, component.context.state_dir, health)


def start_watcher(component: HttpProxy) -> Watcher | None:
    url = state.postgres_url(component.context)
    if url is None:
        return None
    watcher = Watcher(url, schema_name("http_proxy", component.name), lambda: resync(component),
                      state.health(component.context, url))
    watcher.start()
    return watcher


async def resync(c: HttpProxy) -> None:
    """Make this node's view equal to the database's (called by the watcher)."""
    counters = c.counters
    store = counters.store

    def read() -> tuple[Any, ...]:
        return (store.refresh_gens(), store.members(), store.services(), store.current_incarnations())

    gens, members, runtime, incarnations = await counters.call(read)
    daemon = c.context.daemon  # the runtime owns the lifecycle state (relayd.lifecycle)
    if daemon is not None and daemon.state_of(c) not in (State.SERVING, State.CREATED):
        return
    # Members: who may use which service now.
    c.membership.replace_all(members)
    # Runtime services: created, deleted or re-created elsewhere.
    changed = False
    seen = set()
    for name, definition, created in runtime:
        seen.add(name)
        current = c.services.get(name)
        if current is not None and (current.origin == "config" or
                                    (current.definition == definition and current.created_at == created)):
            continue
        try:
            scfg = ServiceConfig.model_validate(definition)
            c.check_service(name, scfg)
        except Exception as exc:
            c.log.warning("runtime service %r (made by another node) not loaded: %s", name, exc)
            continue
        from . import Service

        c.services[name] = Service(name, scfg, "runtime", created, definition)
        changed = True
    for name in [n for n, s in c.services.items() if s.origin == "runtime" and n not in seen]:
        del c.services[name]
        changed = True
    if changed:
        c.api.requests = None  # re-read the JSON each service was created with
        c.rebuild_routes()
        c.load_service_certs()
    # Incarnations: new counts go to the user's current incarnation, wherever it was made.
    live = counters.live
    for key in [k for k, inc in live.items() if inc.sgen is not None and gens.get(k[0]) != inc.sgen]:
        del live[key]  # the service was created again elsewhere
    for inc, _open in incarnations:
        key = (inc.service, inc.user)
        mine = live.get(key)
        if mine is None or (mine.gen is not None and (mine.sgen, mine.gen) != (inc.sgen, inc.gen)):
            live[key] = inc
            counters.nkeys += len(inc.endpoints) + 1
