"""A configuration generation (what one validated configuration built) and the fingerprints
that decide what a reload keeps: an object whose table, the tables it refers to, its secrets
and the engines (state, cluster) are unchanged is kept with its connections (relayd.runtime)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from relayd.auth.base import AuthMethod
from relayd.component import Component
from relayd.config import LoadedConfig
from relayd.config.model import iter_refs
from relayd.fd_limits import LimitPlan
from relayd.listeners import Listener

log = logging.getLogger("relayd")


@dataclass
class Generation:
    number: int
    config: LoadedConfig
    listeners: dict[str, Listener]
    listener_keys: dict[str, tuple[str, object]]
    auth: dict[str, AuthMethod]
    components: dict[str, Component]
    fingerprints: dict[str, str]  # "auth.NAME" / "components.NAME" -> fingerprint
    limits: LimitPlan  # max_connections of each listener
    loaded_at: float = field(default_factory=time.time)


@dataclass
class ReloadResult:
    ok: bool
    generation: int
    message: str
    errors: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "generation": self.generation,
            "message": self.message,
            "errors": self.errors,
            "changed": self.changed,
            "at": self.at,
        }


def engines_key(settings: Any) -> str:
    """Where state and cluster live: a change rebuilds every component and auth method."""
    state_url = settings.state.url.get_secret_value() if settings.state.url else ""
    redis_url = settings.cluster.redis.get_secret_value() if settings.cluster.redis else ""
    return fingerprint_of(str(settings.state_dir), state_url, redis_url, settings.cluster.node)


def fingerprint_of(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def component_fingerprint(settings: Any, name: str, cconf: Any, fps: dict[str, str]) -> str:
    refs = []
    for _path, table, target in iter_refs(cconf):
        if table == "listeners":
            # Not max_connections: the listener's gate applies a new one in place.
            refs.append((table, target, settings.listeners[target].model_dump(
                mode="json", exclude={"max_connections"})))
        elif table == "auth":
            refs.append((table, target, fps.get(f"auth.{target}")))
        else:
            refs.append((table, target, getattr(settings, table)[target].model_dump(mode="json")))
    return fingerprint_of(cconf.model_dump(mode="json"), secret_values(cconf), refs, engines_key(settings))


def secret_values(model: Any) -> list[str]:
    """Secrets take part in fingerprints (a rotated secret must rebuild), never in output."""
    from pydantic import BaseModel, SecretStr

    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(model)
    import hashlib

    return [hashlib.sha256(s.encode()).hexdigest() for s in found]


def component_warnings(gen: Generation, component: Component) -> list[str]:
    warnings = []
    refs = list(iter_refs(component.config))
    listeners = {t for _, table, t in refs if table == "listeners"}
    for _, table, target in refs:
        if table == "auth" and gen.auth.get(target) and gen.auth[target].allows_anonymous:
            public = [n for n in listeners if n in gen.listeners and not gen.listeners[n].is_loopback]
            if public:
                warnings.append(
                    f"AUTH DISABLED: auth method {target!r} lets anyone in, on non-loopback "
                    f"listener(s) {', '.join(sorted(public))}"
                )
    try:
        warnings += component.warnings()
    except Exception:  # a broken plugin must not break `relayctl status`
        log.exception("warnings of component %s failed", component.name)
    return warnings


def apply_limits(gen: Generation) -> None:
    """Set each listener's max_connections (gates outlive generations), warn if too many."""
    plan = gen.limits
    for name, listener in gen.listeners.items():
        assert listener.gate is not None
        listener.gate.set_limit(plan.limits[name], name)
    log.debug("max_connections: %s (RLIMIT_NOFILE %d, %d reserved)",
              ", ".join(f"{n}={v}" for n, v in plan.limits.items()) or "no listeners",
              plan.nofile, plan.reserved)
    warning = plan.warning()
    if warning:
        log.warning("%s", warning)
