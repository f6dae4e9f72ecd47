"""What the management API reports of usage: ``stats``, ``usage`` and ``history`` (see
``manage``), read from the counters; a user's counts stay readable after it left a service.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .compat import ApiError, rfc3339
from .store import NCOL, row_dict

if TYPE_CHECKING:
    from . import HttpProxyComponent


def _time(value: float | None) -> str | None:
    return rfc3339(value) if value is not None else None


async def member_or_counted(c: HttpProxyComponent, service: str, user: str) -> None:
    # Stats stay readable after a user is removed (billing must not lose them).
    if not c.membership.is_member(service, user) and not await c.counters.known(service, user):
        raise ApiError(404, f"User '{user}' not found")


async def _service_heads(c: HttpProxyComponent, service: str | None) -> dict[str, dict[str, Any]]:
    """The current incarnation of each service name (database + pending refusals)."""
    heads: dict[str, dict[str, Any]] = {}
    for name, sgen, origin, created, deleted, rejected, _note in await c.counters.service_incarnations(
            service):
        heads[name] = {"incarnation": sgen, "origin": origin, "createdAt": _time(created),
                       "deletedAt": _time(deleted), "rejected": rejected}
    return heads

async def stats(c: HttpProxyComponent, service: str | None = None, user: str | None = None,
                compat: bool = True) -> dict[str, Any]:
    """The current incarnations: of each service, and of each of its users."""
    counters = c.counters
    if service is not None and service not in c.services and not await counters.current(service):
        raise ApiError(404, f"Service '{service}' not found")
    if service is not None and user is not None:  # a user is only asked for within a service
        await member_or_counted(c, service, user)
    rows = await counters.current(service, user)
    heads = await _service_heads(c, service)
    names = [service] if service is not None else list(c.services)
    total = [0] * NCOL
    per_service: dict[str, dict[str, Any]] = {}
    for name in names:
        head = heads.get(name, {"incarnation": None, "createdAt": None, "deletedAt": None, "rejected": 0})
        per_service[name] = {"incarnation": head["incarnation"], "createdAt": head["createdAt"],
                             "deletedAt": head["deletedAt"], "rejected": head["rejected"],
                             "total": [0] * NCOL, "users": {}}
    for row in rows:
        entry = per_service.get(row["service"])
        if entry is None:
            continue  # a service deleted since: see history
        entry["users"][row["user"]] = {
            "incarnation": row["gen"], "member": c.membership.is_member(row["service"], row["user"]),
            "createdAt": _time(row["created"]), "deletedAt": _time(row["deleted"]), **row_dict(row["values"])}
        for i, v in enumerate(row["values"]):
            entry["total"][i] += v
            total[i] += v
    summed = row_dict(total)
    out: dict[str, Any] = {
        "users": sum(len(e["users"]) for e in per_service.values()),
        "services": len(per_service),
        "requests": {"requests": total[0]} if compat else total[0],
        **{k: v for k, v in summed.items() if k != "requests"},
        "rejected": sum(e["rejected"] for e in per_service.values()),
        "unsaved": counters.held_requests(),
        "perService": {s: {**{k: v for k, v in e.items() if k != "total"}, **row_dict(e["total"]),
                           "users": e["users"]} for s, e in per_service.items()},
    }
    if counters.last_error:
        out["saveError"] = counters.last_error
    if service is not None and user is not None:
        endpoints = await counters.current(service, user, endpoints=True)
        out["endpoints"] = {r["endpoint"]: row_dict(r["values"]) for r in endpoints}
    return out

async def history(c: HttpProxyComponent, service: str | None = None, user: str | None = None) -> dict[str, Any]:
    """Every incarnation of the services and of their users, oldest first, with totals."""
    counters = c.counters
    services, rows = await counters.history(service, user)
    endpoint_rows: list[dict[str, Any]] = []
    if user is not None:
        _, endpoint_rows = await counters.history(service, user, endpoints=True)
    if service is not None and not services and not rows:
        raise ApiError(404, f"Service '{service}' not found")
    out: dict[tuple[str, int | None], dict[str, Any]] = {}
    entry: dict[str, Any] | None
    item: dict[str, Any] | None
    for name, sgen, origin, created, deleted, rejected, note in services:
        entry = out[(name, sgen)] = {"name": name, "incarnation": sgen, "origin": origin,
                                     "createdAt": _time(created), "deletedAt": _time(deleted),
                                     "rejected": rejected, "total": [0] * NCOL, "users": []}
        if note:
            entry["note"] = note
    users: dict[tuple[str, str, int | None], dict[str, Any]] = {}
    for row in rows:
        entry = out.get((row["service"], row["sgen"]))
        if entry is None:
            entry = out[(row["service"], row["sgen"])] = {
                "name": row["service"], "incarnation": row["sgen"], "origin": None, "createdAt": None,
                "deletedAt": None, "rejected": 0, "total": [0] * NCOL, "users": []}
        item = {"username": row["user"], "incarnation": row["gen"], "member": row["member"],
                "createdAt": _time(row["created"]), "deletedAt": _time(row["deleted"]),
                **row_dict(row["values"])}
        if row["note"]:
            item["note"] = row["note"]
        entry["users"].append(item)
        users[(row["service"], row["user"], row["gen"])] = item
        for i, v in enumerate(row["values"]):
            entry["total"][i] += v
    for row in endpoint_rows:
        item = users.get((row["service"], row["user"], row["gen"]))
        if item is not None:
            item.setdefault("endpoints", {})[row["endpoint"]] = row_dict(row["values"])
    result = []
    for (_name, _sgen), entry in sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        total = entry.pop("total")
        users_list = entry.pop("users")
        result.append({**entry, **row_dict(total), "users": users_list})
    return {"services": result, "unsaved": counters.held_requests()}
