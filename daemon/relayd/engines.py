"""Health of the external engines a node uses (PostgreSQL for state, Redis for the cluster).

The embedded default uses none, and then this registry is empty. Whoever connects to an engine
(the state store, the relay's cluster bus) holds one `EngineHealth` and reports every change
of reachability; the daemon shows them in `relayctl status`, `/healthz` answers "degraded" while
one is down (the node still serves what it can locally, so a load balancer should keep it), and
`/metrics` exports `relayd_engine_up`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("relayd.engines")


def redact_url(url: str) -> str:
    """The URL without its password (and user info), safe for logs and status output."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        if parts.username:
            netloc = f"{parts.username}@{netloc}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<unparsable URL>"


@dataclass
class EngineHealth:
    """Reachability of one engine as its user last saw it."""

    name: str  # e.g. "state" or "cluster"
    engine: str  # e.g. "postgresql" or "redis"
    url: str  # already redacted
    up: bool = False
    detail: str = "connecting"
    since: float = field(default_factory=time.time)
    failures: int = 0

    def report(self, up: bool, detail: str = "") -> None:
        """Record a change; logs once per transition, never per retry."""
        detail = detail or ("connected" if up else "unreachable")
        if up != self.up:
            self.since = time.time()
            if up:
                log.info("%s (%s %s): %s", self.name, self.engine, self.url, detail)
            else:
                self.failures += 1
                log.warning("%s (%s %s) is down: %s; serving locally and retrying",
                            self.name, self.engine, self.url, detail)
        self.up = up
        self.detail = detail

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "url": self.url, "up": self.up, "detail": self.detail,
                "since": self.since, "failures": self.failures}


class Engines:
    """The node's engines, by name; one instance per daemon."""

    def __init__(self) -> None:
        self._engines: dict[str, EngineHealth] = {}

    def register(self, name: str, engine: str, url: str) -> EngineHealth:
        """The health record for `name` (the same one again on reload, so history is kept)."""
        health = self._engines.get(name)
        redacted = redact_url(url)
        if health is None or health.engine != engine or health.url != redacted:
            health = self._engines[name] = EngineHealth(name, engine, redacted)
        return health

    def unregister(self, name: str) -> None:
        self._engines.pop(name, None)

    def degraded(self) -> list[str]:
        return sorted(name for name, health in self._engines.items() if not health.up)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: health.as_dict() for name, health in sorted(self._engines.items())}

    def __iter__(self):
        return iter(sorted(self._engines.items()))
