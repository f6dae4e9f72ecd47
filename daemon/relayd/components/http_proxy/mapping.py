"""Pure routing logic: segment-aware prefixes, their overlap, and the from/to path mapping."""

from __future__ import annotations


def normalize_prefix(prefix: str) -> str:
    """'/acme/' and 'acme' -> '/acme'; '/' -> '' (matches everything)."""
    prefix = "/" + prefix.strip("/")
    return "" if prefix == "/" else prefix


def matches(prefix: str, target: str) -> bool:
    """Segment-aware: '/acme' matches '/acme', '/acme/x', '/acme?q', not '/acmefoo'."""
    if not target.startswith(prefix):
        return False
    if len(target) == len(prefix):
        return True
    return target[len(prefix)] in "/?"


def overlap(a: str, b: str) -> bool:
    """Whether two normalized prefixes could both match one path."""
    return matches(a, b) or matches(b, a)


def map_target(prefix: str, target: str, to_path: str) -> str:
    """Upstream request target for ``target`` (which ``prefix`` matches).

    The prefix is stripped and the rest appended to the ``to`` URL's path; the query is
    kept: ``/acme/register?x=1`` with ``from = "/acme"``, ``to = "http://h:1"`` becomes
    ``/register?x=1``; with ``to = "http://h:1/to"``, ``/acme`` -> ``/to``, ``/acme/`` -> ``/to/``.
    """
    rest = target[len(prefix):]
    path, sep, query = rest.partition("?")
    if not path:
        new = to_path or "/"
    else:
        new = to_path.rstrip("/") + path
    return new + sep + query


def has_dot_segment(path: str) -> bool:
    """'.' or '..' segments (also percent-encoded) would let an upstream escape the `to` path."""
    if "." not in path and "%2" not in path and "%2".upper() not in path:
        return False
    for segment in path.split("?", 1)[0].split("/"):
        s = segment.lower().replace("%2e", ".")
        if s in (".", ".."):
            return True
    return False
