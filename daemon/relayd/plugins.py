"""Plugin registry: component kinds and auth methods found through entry points.

Built-in kinds are declared in relayd's own pyproject.toml under the same groups a
third-party package uses, so there is exactly one way in. A plugin is a class with:

* ``Config``: a pydantic model with ``kind: Literal["NAME"]`` (components) or
  ``method: Literal["NAME"]`` (auth), ``extra="forbid"``;
* a constructor ``(name, config, context)`` that does no I/O, and the async lifecycle of
  :class:`relayd.component.Component` or :class:`relayd.auth.base.AuthMethod`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

GROUPS = {"components": ("relayd.components", "kind"), "auth": ("relayd.auth", "method")}


@dataclass
class Plugin:
    group: str  # "components" or "auth"
    name: str
    value: str  # "module:attr"
    distribution: str
    version: str
    cls: type | None = None
    error: str | None = None

    def describe(self) -> dict[str, str | None]:
        return {
            "group": GROUPS[self.group][0],
            "name": self.name,
            "target": self.value,
            "distribution": f"{self.distribution} {self.version}",
            "error": self.error,
        }


@dataclass
class Registry:
    plugins: dict[str, dict[str, Plugin]] = field(default_factory=lambda: {g: {} for g in GROUPS})
    # name -> every plugin of that name when two distributions claim it (both refused)
    conflicts: dict[str, dict[str, list[Plugin]]] = field(
        default_factory=lambda: {g: {} for g in GROUPS}
    )

    @classmethod
    def discover(cls) -> Registry:
        registry = cls()
        for group, (entry_group, _) in GROUPS.items():
            for ep in entry_points(group=entry_group):
                registry._add(group, ep)
        return registry

    def _add(self, group: str, ep: EntryPoint) -> None:
        dist = ep.dist
        plugin = Plugin(
            group, ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?"
        )
        try:
            plugin.cls = ep.load()
            _check_plugin(group, ep.name, plugin.cls)
        except (Exception, SystemExit) as exc:  # a broken plugin is reported, not fatal until used
            plugin.cls = None
            plugin.error = f"{type(exc).__name__}: {exc}"
        existing = self.plugins[group].get(ep.name) or None
        if ep.name in self.conflicts[group]:
            self.conflicts[group][ep.name].append(plugin)
        elif existing is not None:
            if (existing.distribution, existing.value) == (plugin.distribution, plugin.value):
                return  # the same distribution seen twice on sys.path
            self.conflicts[group][ep.name] = [existing, plugin]
            del self.plugins[group][ep.name]
        else:
            self.plugins[group][ep.name] = plugin

    def usable(self, group: str) -> dict[str, typing.Any]:  # the plugin classes of `group`
        return {n: p.cls for n, p in self.plugins[group].items() if p.cls is not None}

    def problem(self, group: str, name: str) -> str | None:
        """Why the plugin `name` cannot be used, or None if it can."""
        entry_group, _ = GROUPS[group]
        if name in self.conflicts[group]:
            dists = ", ".join(f"{p.distribution} ({p.value})" for p in self.conflicts[group][name])
            return f"{entry_group} plugin {name!r} is registered by more than one package: {dists}"
        plugin = self.plugins[group].get(name)
        if plugin is None:
            known = ", ".join(sorted(self.plugins[group])) or "none"
            return f"no {entry_group} plugin named {name!r} is installed (installed: {known})"
        if plugin.error:
            return f"{entry_group} plugin {name!r} from {plugin.distribution} failed to load: {plugin.error}"
        return None

    def describe(self) -> list[dict[str, str | None]]:
        rows = []
        for group in GROUPS:
            rows += [p.describe() for p in self.plugins[group].values()]
            for name, plugins in self.conflicts[group].items():
                for p in plugins:
                    row = p.describe()
                    row["error"] = self.problem(group, name)
                    rows.append(row)
        return sorted(rows, key=lambda r: (r["group"] or "", r["name"] or ""))


def _check_plugin(group: str, name: str, cls: type) -> None:
    _, discriminator = GROUPS[group]
    config = getattr(cls, "Config", None)
    if config is None or not hasattr(config, "model_fields"):
        raise TypeError(f"{cls!r} has no pydantic `Config` model")
    tag = config.model_fields.get(discriminator)
    if tag is None or typing.get_args(tag.annotation) != (name,):
        raise TypeError(
            f"{cls.__name__}.Config must declare {discriminator}: Literal[{name!r}] "
            "(the entry point's name)"
        )
