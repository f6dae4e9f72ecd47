"""Prometheus exposition of the daemon's and components' metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest

from relayd.lifecycle import State
from relayd.metric_families import Metric, counter, gauge

if TYPE_CHECKING:
    from relayd.context import RuntimeView

log = logging.getLogger("relayd.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DaemonCollector:
    """Reads the current generation at scrape time; nothing is registered globally."""

    def __init__(self, daemon: RuntimeView) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        daemon = self.daemon
        gen = daemon.generation
        components = list(gen.components.items()) if gen else []
        gates = [(name, listener.gate) for name, listener in (gen.listeners.items() if gen else ())
                 if listener.gate is not None]
        yield gauge("relayd_generation", "Configuration generation being served",
                    samples=[((), gen.number if gen else 0)])
        yield gauge("relayd_uptime_seconds", "Seconds since relayd started",
                    samples=[((), time.time() - daemon.started_at)])
        yield counter("relayd_reloads", "Configuration reloads", ["result"],
                      (([result], count) for result, count in daemon.reload_counts.items()))
        yield gauge("relayd_component_up", "1 while a component serves", ["component", "kind"],
                    (([name, component.kind], 1 if daemon.state_of(component) is State.SERVING else 0)
                     for name, component in components))
        yield gauge("relayd_listener_connections", "Open client connections per listener", ["listener"],
                    (([name], gate.open) for name, gate in gates if gate.enforced))
        yield gauge("relayd_listener_max_connections", "max_connections of each listener", ["listener"],
                    (([name], gate.limit) for name, gate in gates))
        yield counter("relayd_listener_limit_reached",
                      "Times a listener reached max_connections and stopped accepting", ["listener"],
                      (([name], gate.reached) for name, gate in gates))
        engines = list(daemon.engines)
        yield gauge("relayd_engine_up", "1 while an external engine (Redis, PostgreSQL) is reachable",
                    ["name", "engine"], (([name, health.engine], 1 if health.up else 0) for name, health in engines))
        yield counter("relayd_engine_failures", "Times an external engine became unreachable", ["name", "engine"],
                      (([name, health.engine], health.failures) for name, health in engines))
        # Components (and auth methods) of one kind yield families of the same names: the text
        # format allows one HELP/TYPE block per family, so their samples are merged into one
        # family, told apart by the `component` (`auth`) label.
        merged = _Families()
        for name, component in components:
            try:
                families = list(component.metrics())
            except Exception:  # one broken component must not hide the others
                log.exception("metrics of component %s failed", name)
                continue
            merged.add(families, "component", name)
        for name, method in (gen.auth.items() if gen else ()):
            try:
                families = list(method.metrics())
            except Exception:
                log.exception("metrics of auth method %s failed", name)
                continue
            merged.add(families, "auth", name)
        yield from merged.families.values()


class _Families:
    """Metric families by name, the samples of every owner in one family."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        self._warned: set[str] = set()

    def add(self, families: list[Metric], label: str, owner: str) -> None:
        for family in families:
            into = self.families.get(family.name)
            if into is None:
                into = self.families[family.name] = Metric(family.name, family.documentation, family.type,
                                                           family.unit)
            elif into.type != family.type:
                if family.name not in self._warned:
                    self._warned.add(family.name)
                    log.error("metric %s is a %s for %s %s but a %s for another: not exported for it",
                              family.name, family.type, label, owner, into.type)
                continue
            for sample in family.samples:
                # Owners always carry their label: without it two owners' samples would collide.
                labels = sample.labels if label in sample.labels else {label: owner, **sample.labels}
                into.samples.append(sample._replace(labels=labels))


def render(daemon: RuntimeView) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))
    return generate_latest(registry)


__all__ = ["CONTENT_TYPE", "DaemonCollector", "Metric", "render"]
