"""Prometheus exposition of the daemon's and components' metrics."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from relayd.lifecycle import State

if TYPE_CHECKING:
    from relayd.context import RuntimeView

log = logging.getLogger("relayd.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DaemonCollector:
    """Reads the current generation at scrape time; nothing is registered globally."""

    def __init__(self, daemon: RuntimeView) -> None:
        self.daemon = daemon

    def collect(self):
        daemon = self.daemon
        gen = daemon.generation
        yield GaugeMetricFamily("relayd_generation", "Configuration generation being served",
                                value=gen.number if gen else 0)
        yield GaugeMetricFamily("relayd_uptime_seconds", "Seconds since relayd started",
                                value=time.time() - daemon.started_at)
        reloads = CounterMetricFamily("relayd_reloads", "Configuration reloads", labels=["result"])
        for result, count in daemon.reload_counts.items():
            reloads.add_metric([result], count)
        yield reloads
        up = GaugeMetricFamily("relayd_component_up", "1 while a component serves",
                               labels=["component", "kind"])
        for name, component in (gen.components.items() if gen else ()):
            up.add_metric([name, component.kind], 1 if daemon.state_of(component) is State.SERVING else 0)
        yield up
        connections = GaugeMetricFamily("relayd_listener_connections",
                                        "Open client connections per listener", labels=["listener"])
        limits = GaugeMetricFamily("relayd_listener_max_connections",
                                   "max_connections of each listener", labels=["listener"])
        reached = CounterMetricFamily("relayd_listener_limit_reached",
                                      "Times a listener reached max_connections and stopped accepting",
                                      labels=["listener"])
        for name, listener in (gen.listeners.items() if gen else ()):
            gate = listener.gate
            if gate is None:
                continue
            if gate.enforced:
                connections.add_metric([name], gate.open)
            limits.add_metric([name], gate.limit)
            reached.add_metric([name], gate.reached)
        yield from (connections, limits, reached)
        engine_up = GaugeMetricFamily("relayd_engine_up", "1 while an external engine (Redis, "
                                      "PostgreSQL) is reachable", labels=["name", "engine"])
        engine_failures = CounterMetricFamily("relayd_engine_failures",
                                              "Times an external engine became unreachable",
                                              labels=["name", "engine"])
        for name, health in daemon.engines:
            engine_up.add_metric([name, health.engine], 1 if health.up else 0)
            engine_failures.add_metric([name, health.engine], health.failures)
        yield from (engine_up, engine_failures)
        # Components (and auth methods) of one kind yield families of the same names: the text
        # format allows one HELP/TYPE block per family, so their samples are merged into one
        # family, told apart by the `component` (`auth`) label.
        merged = _Families()
        for name, component in (gen.components.items() if gen else ()):
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
