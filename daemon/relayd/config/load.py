"""Load, merge and validate the layered configuration into one settings object."""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from relayd.config.model import CoreSettings, build_settings_model, iter_refs
from relayd.config.sources import ConfigError, Layers, Path_, Problem, env_layer, parse_set, read_layers
from relayd.plugins import GROUPS, Registry

DEFAULT_CONFIG = Path("/etc/relayd")
SECRET_WORDS = ("secret", "password", "token", "key")


@dataclass
class LoadedConfig:
    settings: CoreSettings
    origins: dict[Path_, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. a conf.d value a later file overrides

    def effective(self) -> dict[str, Any]:
        """The merged configuration as JSON-able data; SecretStr values print as '**********'."""
        # By alias: keys as written in the files (`from`, not the attribute name `from_`).
        return self.settings.model_dump(mode="json", by_alias=True)

    def with_origins(self) -> list[tuple[str, Any, str]]:
        """(key.path, value, origin) for every leaf of the effective configuration."""
        rows: list[tuple[str, Any, str]] = []
        _leaves(self.effective(), (), rows, self.origins)
        return rows


def _leaves(value: Any, path: Path_, rows: list, origins: dict[Path_, str]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _leaves(item, path + (key,), rows, origins)
        return
    origin = origins.get(path, "default")
    rows.append((dotted_key(path), value, origin))


def dotted_key(path: Path_) -> str:
    """A key path as TOML writes it: logging.loggers."relayd.relay" (dots inside quoted)."""
    return ".".join(
        str(part) if re.fullmatch(r"[A-Za-z0-9_-]+", str(part)) else json.dumps(str(part), ensure_ascii=False)
        for part in path
    )


def load_config(
    config_path: Path = DEFAULT_CONFIG,
    *,
    registry: Registry,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> LoadedConfig:
    """Read every layer, validate, check references. Raises ConfigError listing all problems."""
    environ = dict(os.environ if environ is None else environ)
    layers: Layers = read_layers(Path(config_path))
    env_data, env_origins = env_layer(environ)
    layers.merge(env_data, lambda p: _nearest(env_origins, p))
    for assignment in overrides:
        # The origin names the key only: the value may be a secret, and origins are printed.
        key = assignment.partition("=")[0].strip()
        layers.merge(parse_set(assignment), lambda p, k=key: f"--set {k}")

    model = build_settings_model(registry)
    try:
        settings = model.model_validate(layers.data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, layers, registry, model)) from None
    problems = _check_references(settings, layers)
    if problems:
        raise ConfigError(problems)
    problems = _check_listener_claims(settings, layers, registry) + _check_components(settings, layers, registry)
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(settings, layers.origins, layers.files, layers.override_warnings())


def _nearest(origins: dict[Path_, str], path: Path_) -> str:
    """The variable that set `path`: itself, an ancestor (a JSON table), or else a descendant."""
    for depth in range(len(path), 0, -1):
        if path[:depth] in origins:
            return origins[path[:depth]]
    for key, origin in origins.items():
        if key[: len(path)] == path:
            return origin
    return "env"


def _origin(layers: Layers, loc: Path_) -> str | None:
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in layers.origins:
            return layers.origins[loc[:depth]]
    return layers.files[-1].as_posix() if layers.files else None


def _strip_tags(loc: Path_, registry: Registry) -> Path_:
    """pydantic puts the union tag in error paths (components.x.relay.port); drop it."""
    if len(loc) >= 3 and loc[0] in GROUPS and loc[2] in registry.plugins[loc[0]]:
        return loc[:2] + loc[3:]
    return loc


def _explain(exc: ValidationError, layers: Layers, registry: Registry, model: type) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = _strip_tags(tuple(error["loc"]), registry)
        key = dotted_key(loc) or None
        kind = error["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_keys(model, layers.data, loc[:-1], registry)
            message = "unknown key"
            if allowed:
                near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
                message += f" (did you mean {near[0]!r}?)" if near else f" (expected one of: {', '.join(allowed)})"
        elif kind == "missing":
            message = "missing required key"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            group = str(loc[0])
            tag = GROUPS[group][1] if group in GROUPS else "kind"
            value = error.get("ctx", {}).get("tag")
            installed = ", ".join(sorted(registry.plugins[group])) if group in GROUPS else ""
            if kind == "union_tag_not_found":
                message = f"missing '{tag}' (one of: {installed})"
            else:
                problem = registry.problem(group, str(value)) if group in GROUPS else None
                message = problem or f"unknown {tag} {value!r} (installed: {installed})"
            key = f"{key}.{tag}"
            if kind == "union_tag_invalid":
                loc = loc + (tag,)  # point at the `kind = ...` line, not the table header
        elif loc and loc[-1] == "[key]":  # a table name like [components.Health]
            loc = loc[:-1]
            key = dotted_key(loc)
            message = (f"invalid name {loc[-1]!r}: names are lower-case letters, digits, '_' and '-', "
                       "starting with a letter (RELAYD_* variables cannot spell upper case)")
        else:
            # pydantic prefixes our validators' messages with "Value error, ": noise to a reader.
            message = error["msg"].removeprefix("Value error, ")
            value = error.get("input")
            secret = _looks_secret(loc) or _is_secret_field(model, layers.data, loc, registry)
            if isinstance(value, (str, int, float, bool)) and not secret:
                message += f" (got {value!r})"
        problems.append(Problem(message, _origin(layers, loc), key))
    return problems


def _looks_secret(loc: Path_) -> bool:
    return any(word in str(part).lower() for part in loc for word in SECRET_WORDS)


def _allowed_keys(model: type, data: Any, loc: Path_, registry: Registry) -> list[str]:
    """Field names of the model found at `loc`, to suggest a fix for a misspelt key."""
    found = _model_at(model, data, loc, registry)
    return sorted(found.model_fields) if found else []


def _is_secret_field(model: type, data: Any, loc: Path_, registry: Registry) -> bool:
    """Whether `loc` is a Secret field of whatever model (core or plugin) holds it."""
    parent = _model_at(model, data, loc[:-1], registry) if loc else None
    info = parent.model_fields.get(str(loc[-1])) if parent else None
    return info is not None and "SecretStr" in repr(info.annotation)


def _model_at(model: type, data: Any, loc: Path_, registry: Registry) -> type[BaseModel] | None:
    """The model describing the table at `loc` (plugin tables resolved by their kind/method)."""
    current: Any = model
    skip_key = False
    for depth, part in enumerate(loc):
        if skip_key:  # the key of a dict table: [listeners.NAME]
            skip_key = False
            if depth == 1 and loc[0] in GROUPS:
                entry = _get(data, loc[:2])
                tag = entry.get(GROUPS[str(loc[0])][1]) if isinstance(entry, dict) else None
                cls = registry.usable(str(loc[0])).get(str(tag))
                current = cls.Config if cls else None
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(str(part))
        if info is None:
            return None
        skip_key = typing.get_origin(info.annotation) is dict
        current = _model_of(info.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (Optional[M], dict[Name, M], Annotated[M, ...])."""
    if isinstance(annotation, type) and not typing.get_args(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _get(data: Any, path: Path_) -> Any:
    for part in path:
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _check_references(settings: CoreSettings, layers: Layers) -> list[Problem]:
    problems = []
    for group in ("components", "auth"):
        for name, entry in getattr(settings, group).items():
            for path, table, target in iter_refs(entry, (group, name)):
                defined = getattr(settings, table)
                if target not in defined:
                    known = ", ".join(sorted(defined)) or "none defined"
                    problems.append(
                        Problem(
                            f"refers to {table}.{target}, which is not defined ({table}: {known})",
                            _origin(layers, path),
                            dotted_key(path),
                        )
                    )
    return problems


def _socket_keys(listener: Any) -> set[tuple[str, str]]:
    """What a listener's socket may be: the one bound for `bind`, or the one systemd passes as
    `fd_name` (whichever is used at run time, two listeners with one of these in common may be
    the same socket: the pool opens each once)."""
    keys = set()
    if listener.bind is not None:
        keys.add(("bind", listener.bind))
    if listener.fd_name is not None:
        keys.add(("fd_name", listener.fd_name))
    return keys


def _check_listener_claims(settings: CoreSettings, layers: Layers, registry: Registry) -> list[Problem]:
    """Two components accepting on one socket would each get a random share of its connections
    (the kernel wakes either accept loop): refused, naming both."""
    claims: list[tuple[str, str, Path_]] = []  # (component, listener, key path of the reference)
    for cname, entry in settings.components.items():
        cls = registry.usable("components").get(getattr(entry, "kind", ""))
        claim = getattr(cls, "listener_claims", None)
        if claim is None:
            continue
        seen: set[str] = set()
        for path, listener in claim(entry):
            if listener not in seen and listener in settings.listeners:
                seen.add(listener)
                path = tuple(path)
                while path and isinstance(path[-1], int):  # listeners.0: name the list, as written
                    path = path[:-1]
                claims.append((cname, listener, ("components", cname) + path))
    problems = []
    reported: set[frozenset] = set()
    for i, (comp_a, lis_a, path_a) in enumerate(claims):
        for comp_b, lis_b, path_b in claims[i + 1:]:
            if lis_a == lis_b:
                if comp_a == comp_b:
                    continue
                pair = frozenset({("c", comp_a), ("c", comp_b), ("l", lis_a)})
                message = (f"listener {lis_a!r} is used by both components.{comp_a} and components.{comp_b}: "
                           "two components cannot accept connections on one listener "
                           "(give each its own listener)")
            else:
                shared = _socket_keys(settings.listeners[lis_a]) & _socket_keys(settings.listeners[lis_b])
                if not shared:
                    continue
                pair = frozenset({("c", comp_a), ("c", comp_b), ("l", lis_a), ("l", lis_b)})
                how, value = min(shared)
                users = (f"both used by components.{comp_a}" if comp_a == comp_b
                         else f"used by components.{comp_a} and components.{comp_b}")
                message = (f"listeners {lis_a!r} and {lis_b!r} ({users}) have the same {how} {value!r}, "
                           "so they are one socket: two servers would accept on it "
                           "(give each listener its own address)")
            if pair in reported:
                continue
            reported.add(pair)
            where = _origin(layers, path_a)
            first = f"{dotted_key(path_a)} ({where})" if where else dotted_key(path_a)
            problems.append(Problem(f"{message}; the other reference is {first}",
                                    _origin(layers, path_b), dotted_key(path_b)))
    return problems


def _check_components(settings: CoreSettings, layers: Layers, registry: Registry) -> list[Problem]:
    """Each component kind's own checks across tables (Component.config_problems)."""
    problems = []
    for cname, entry in settings.components.items():
        cls = registry.usable("components").get(getattr(entry, "kind", ""))
        check = getattr(cls, "config_problems", None)
        if check is None:
            continue
        for path, message in check(cname, entry, settings):
            full = ("components", cname) + tuple(path)
            problems.append(Problem(message, _origin(layers, full), dotted_key(full)))
    return problems
