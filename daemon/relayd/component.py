"""The contract between the daemon core and component plugins.

A component is built per configuration generation and follows :mod:`relayd.lifecycle`: the
core constructs it (every attribute, no I/O), awaits ``start()`` (bind nothing: serve on
``listener.serving_sockets()``), routes nothing to it itself, and on removal or change (or
after a failed start) awaits ``stop(drain_timeout)``. A reload that leaves a component's
configuration (and that of the listeners, auth methods and scope maps it refers to) unchanged
keeps the very same object, with its live connections.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from relayd.context import Context  # re-exported: plugins import it from here too

if TYPE_CHECKING:
    from aiohttp import web

    from relayd.metric_families import Metric


class ComponentConfig(BaseModel):
    """Base of every [components.NAME] table; plugins add ``kind: Literal["..."]``."""

    model_config = ConfigDict(extra="forbid")


class Component:
    """Base class of component plugins (entry point group ``relayd.components``)."""

    Config: ClassVar[type[ComponentConfig]]

    def __init__(self, name: str, config: ComponentConfig, context: Context) -> None:
        self.name = name
        self.config = config
        self.context = context
        self.log = logging.getLogger(f"relayd.{config.kind}.{name}")  # type: ignore[attr-defined]

    @property
    def kind(self) -> str:
        return self.config.kind  # type: ignore[attr-defined]

    async def start(self) -> None:
        """Start serving. Raising rejects the configuration generation being built."""

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting, let in-flight work finish for up to drain_timeout, then close.
        Also called after a start() that raised: release whatever it had opened."""

    def reloaded(self) -> None:
        """A reload kept this component (its configuration did not change): re-read what it
        caches from files, such as certificates of its own. Listener certificates need nothing:
        the listener pool re-reads them and new handshakes get them."""

    def status(self) -> dict[str, Any]:
        """Counts for `relayctl status` (clients, sessions, requests...)."""
        return {}

    def metrics(self) -> Iterable[Metric]:
        """Prometheus metric families for this component."""
        return ()

    def clients(self) -> list[dict[str, Any]]:
        """Live clients, for `relayctl clients NAME`."""
        return []

    async def control(self, request: web.Request, path: str) -> web.StreamResponse | None:
        """Handle control-API requests under /v1/components/NAME/<path>; None means 404."""
        return None

    def listener_names(self) -> set[str]:
        """Names of the listeners this component serves on (for status)."""
        return set()

    def warnings(self) -> list[str]:
        """Risky settings in use, shown by `relayctl status` (like AUTH DISABLED)."""
        return []

    # -- configuration checks that need other tables (run by load_config, before any start) ----

    @classmethod
    def listener_claims(cls, config: ComponentConfig) -> Iterable[tuple[tuple[str | int, ...], str]]:
        """(key path inside the component's table, listener name) of every listener on which this
        component would accept connections. Two components never accept on one listener: the
        configuration is refused. Default: every listener the table refers to."""
        from relayd.config.model import iter_refs

        for path, table, target in iter_refs(config):
            if table == "listeners":
                yield path, target

    @classmethod
    def config_problems(cls, name: str, config: ComponentConfig,
                        settings: Any) -> Iterable[tuple[tuple[str | int, ...], str]]:
        """(key path inside the component's table, message) of every problem that only shows
        with the other tables (listeners, auth methods); `settings` is the validated whole."""
        return ()
