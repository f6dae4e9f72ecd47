"""What a component or auth method may use from the daemon.

A plugin gets one :class:`Context` per configuration generation: the listeners, auth methods
and scope maps of that generation, where state lives, and a narrow, typed view of the running
daemon (:class:`RuntimeView`) instead of the daemon object itself. Unit tests build a Context
by hand, with ``daemon=None``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from aiohttp import web

    from relayd.auth.base import AuthMethod
    from relayd.config import LoadedConfig
    from relayd.config.model import ClusterConfig, ScopeMapConfig, StateConfig
    from relayd.engines import Engines
    from relayd.lifecycle import Lifecycle, State
    from relayd.listeners import Listener
    from relayd.metric_families import Metric
    from relayd.plugins import Registry


class ComponentView(Protocol):
    """A component as the daemon's own services see it (relayd.component.Component has this
    shape; declared here so that this module needs no import of it)."""

    name: str

    @property
    def kind(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self, drain_timeout: float) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def clients(self) -> list[dict[str, Any]]: ...

    def metrics(self) -> Iterable[Metric]: ...

    async def control(self, request: web.Request, path: str) -> web.StreamResponse | None: ...


class GenerationView(Protocol):
    """One configuration generation (relayd.runtime.Generation), read-only."""

    @property
    def number(self) -> int: ...

    @property
    def config(self) -> LoadedConfig: ...

    @property
    def components(self) -> Mapping[str, ComponentView]: ...

    @property
    def listeners(self) -> Mapping[str, Listener]: ...

    @property
    def auth(self) -> Mapping[str, AuthMethod]: ...


class ReloadOutcome(Protocol):
    @property
    def ok(self) -> bool: ...

    def as_dict(self) -> dict[str, Any]: ...


class RuntimeView(Protocol):
    """What plugins, the control API (relayd.control) and the metrics exposition
    (relayd.metrics) may ask the running daemon (relayd.runtime.Daemon). Typed, and without an
    import of the runtime: those modules depend on this view, not on the daemon."""

    stopping: bool
    started_at: float
    reload_counts: dict[str, int]

    @property
    def engines(self) -> Engines: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def generation(self) -> GenerationView | None: ...

    def state_of(self, obj: Lifecycle) -> State: ...

    def serving_component(self, name: str) -> object | None:
        """The component called `name` in the generation serving now (None if there is none)."""
        ...

    def status(self) -> dict[str, Any]: ...

    def load(self) -> LoadedConfig: ...

    async def reload(self) -> ReloadOutcome: ...


@dataclass
class Context:
    """What a component or auth method may use from the daemon."""

    listeners: Mapping[str, Listener]
    auth: Mapping[str, AuthMethod]
    scope_maps: Mapping[str, ScopeMapConfig]
    state_dir: Path
    daemon: RuntimeView | None = None  # the running daemon; None in unit tests
    # Where durable state lives ([state]) and the cluster this node belongs to ([cluster]);
    # None in unit tests, which means the embedded default (SQLite, one node).
    state: StateConfig | None = None
    cluster: ClusterConfig | None = None
    # Report the health of an external engine here (relayd.engines); None in unit tests.
    engines: Engines | None = None

    def listener(self, name: str) -> Listener:
        return self.listeners[name]

    def auth_method(self, name: str) -> AuthMethod:
        return self.auth[name]
