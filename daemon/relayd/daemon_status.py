"""What ``relayctl status`` and sd_notify's STATUS= say about the daemon (relayd.runtime.Daemon)."""

from __future__ import annotations

import os
import time
import weakref
from typing import Any

from relayd import __version__
from relayd.engines import Engines
from relayd.generation import Generation, ReloadResult, component_warnings
from relayd.lifecycle import Lifecycle, State


class StatusReport:
    """The status of relayd.runtime.Daemon, which makes these attributes in its constructor."""

    generation: Generation | None
    started_at: float
    last_reload: ReloadResult | None
    reload_counts: dict[str, int]
    engines: Engines
    retiring: set[str]
    stopping: bool
    states: weakref.WeakKeyDictionary[Lifecycle, State]

    def state_of(self, obj: Lifecycle) -> State:
        return self.states.get(obj, State.CREATED)

    def status_line(self) -> str:
        gen = self.generation
        if gen is None:
            return "starting"
        clients = sum(int(c.status().get("clients", 0) or 0) for c in gen.components.values())
        return f"generation {gen.number}: {len(gen.components)} components, {clients} clients"

    def status(self) -> dict[str, Any]:
        gen = self.generation
        assert gen is not None
        components = {}
        for name, component in gen.components.items():
            entry = {"kind": component.kind, "state": self.state_of(component).value, **component.status()}
            warnings = component_warnings(gen, component)
            if warnings:
                entry["warnings"] = warnings
            components[name] = entry
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": time.time() - self.started_at,
            "generation": gen.number,
            "loaded_at": gen.loaded_at,
            "config_files": [str(p) for p in gen.config.files],
            "last_reload": self.last_reload.as_dict() if self.last_reload else None,
            "reloads": dict(self.reload_counts),
            "listeners": {
                n: {"addresses": l.addresses, "tls": l.ssl_context is not None, "activated": l.activated,
                    **(l.gate.status() if l.gate is not None else {})}
                for n, l in gen.listeners.items()
            },
            "components": components,
            "node": gen.config.settings.cluster.node,
            "engines": self.engines.as_dict(),
            "degraded": self.engines.degraded(),
            "draining": sorted(self.retiring),
            "stopping": self.stopping,
        }
