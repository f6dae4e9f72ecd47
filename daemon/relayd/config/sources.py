"""Reading configuration files and recording where every value came from.

Sources, lowest to highest: built-in defaults < relayd.yaml < relayd.toml < conf.d/*.toml
(lexical order) < RELAYD_* environment < ``relayd --set``. Tables merge deeply; any other
value (lists included) is replaced by the higher source. ``origins`` maps every key path to
"FILE:LINE", "env:RELAYD_..." or "--set ...".
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Path_ = tuple[str | int, ...]


@dataclass
class Problem:
    message: str
    origin: str | None = None  # "FILE", "FILE:LINE", "env:NAME", "--set ..."
    key: str | None = None

    def __str__(self) -> str:
        parts = [p for p in (self.origin, self.key) if p]
        return ": ".join(parts + [self.message])


class ConfigError(Exception):
    """One or more configuration problems, each naming where it is."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass
class Layers:
    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[Path_, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    # (key path, origin of the value replaced, origin of the new one): a conf.d file whose
    # value a later file replaced, which an operator rarely means (see override_warnings).
    overridden: list[tuple[Path_, str, str]] = field(default_factory=list)

    def merge(self, new: dict[str, Any], origin_of: Any, watch: str | None = None) -> None:
        """Deep-merge `new` into data; origin_of(path) labels each key path. Replacing a value
        whose origin starts with `watch` (a conf.d directory) with a different one is recorded."""
        _merge(self.data, new, (), origin_of, self.origins, watch, self.overridden)

    def override_warnings(self) -> list[str]:
        return [f"{new}: {_dotted(path)} overrides the value {old} set; the later file wins "
                "(remove the key from one of them, or use other table names)"
                for path, old, new in self.overridden]


def _dotted(path: Path_) -> str:
    return ".".join(str(p) if re.fullmatch(r"[A-Za-z0-9_-]+", str(p)) else json.dumps(str(p)) for p in path)


def _merge(dst: dict, src: dict, path: Path_, origin_of: Any, origins: dict[Path_, str],
           watch: str | None = None, overridden: list | None = None) -> None:
    for key, value in src.items():
        sub = path + (key,)
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, sub, origin_of, origins, watch, overridden)
            continue
        if watch is not None and overridden is not None and key in dst and dst[key] != value:
            earlier = origins.get(sub)
            if earlier is not None and earlier.startswith(watch):
                overridden.append((sub, earlier, origin_of(sub)))
        # A replaced subtree must not keep the origins of what it replaced.
        for old in [p for p in origins if p[: len(sub)] == sub]:
            del origins[old]
        dst[key] = _copy(value)
        _record(value, sub, origin_of, origins)


def _record(value: Any, path: Path_, origin_of: Any, origins: dict[Path_, str]) -> None:
    origins[path] = origin_of(path)
    if isinstance(value, dict):
        for key, item in value.items():
            _record(item, path + (key,), origin_of, origins)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def config_files(path: Path) -> list[Path]:
    """The files a --config PATH stands for, lowest precedence first."""
    if not path.exists():
        raise ConfigError([Problem("configuration path does not exist", str(path))])
    if path.is_file():
        return [path]
    files = [p for p in (path / "relayd.yaml", path / "relayd.yml", path / "relayd.toml") if p.is_file()]
    confd = path / "conf.d"
    if confd.is_dir():
        files += sorted(p for p in confd.glob("*.toml") if p.is_file())
    if not files:  # most likely the wrong directory: do not start an empty daemon
        raise ConfigError([Problem("no relayd.toml, relayd.yaml or conf.d/*.toml here", str(path))])
    return files


def read_file(path: Path) -> tuple[dict[str, Any], dict[Path_, int]]:
    """Parse one file; returns its data and the line of every key path we could locate."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(f"cannot read: {exc}", str(path))]) from None
    if path.suffix in (".yaml", ".yml"):
        return _read_yaml(path, text)
    if path.suffix != ".toml":
        raise ConfigError([Problem("expected a .toml, .yaml or .yml file", str(path))])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib puts "(at line L, column C)" at the end; move the line into the origin.
        message = str(exc)
        match = re.search(r"\(at line (\d+), column (\d+)\)$", message)
        origin = str(path)
        if match:
            origin = f"{path}:{match[1]}"
            message = f"TOML syntax error: {message[: match.start()].strip()} (column {match[2]})"
        else:
            message = f"TOML syntax error: {message}"
        raise ConfigError([Problem(message, origin)]) from None
    return data, toml_key_lines(text)


def _read_yaml(path: Path, text: str) -> tuple[dict[str, Any], dict[Path_, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        origin = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem(f"YAML syntax error: {problem}", origin)]) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("the top level must be a mapping of tables", str(path))])
    lines: dict[Path_, int] = {}
    _yaml_lines(node, (), lines)
    return data, lines


def _yaml_lines(node: Any, path: Path_, lines: dict[Path_, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            sub = path + (key_node.value,)
            lines[sub] = key_node.start_mark.line + 1
            _yaml_lines(value_node, sub, lines)


_SEGMENT = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_SEGMENT}(?:\s*\.\s*{_SEGMENT})*"
_HEADER = re.compile(rf"^\s*\[\[?\s*({_DOTTED})\s*\]\]?")
_KEY = re.compile(rf"^\s*({_DOTTED})\s*=")


def _split_dotted(text: str) -> Path_:
    return tuple(
        s[1:-1] if s[:1] in "\"'" else s for s in re.findall(_SEGMENT, text)
    )


def toml_key_lines(text: str) -> dict[Path_, int]:
    """Best-effort line of each table header and key (tomllib gives no positions)."""
    lines: dict[Path_, int] = {}
    table: Path_ = ()
    for number, line in enumerate(text.splitlines(), start=1):
        if match := _HEADER.match(line):
            table = _split_dotted(match[1])
            for depth in range(1, len(table) + 1):
                lines.setdefault(table[:depth], number)
        elif match := _KEY.match(line):
            key = table + _split_dotted(match[1])
            lines.setdefault(key, number)
    return lines


def _origin_with_line(path: Path, lines: dict[Path_, int]):
    def origin_of(key: Path_) -> str:
        for depth in range(len(key), 0, -1):
            if key[:depth] in lines:
                return f"{path}:{lines[key[:depth]]}"
        return str(path)

    return origin_of


def read_layers(config_path: Path) -> Layers:
    layers = Layers()
    problems: list[Problem] = []
    for file in config_files(config_path):
        try:
            data, lines = read_file(file)
        except ConfigError as exc:
            problems += exc.problems
            continue
        layers.files.append(file)
        confd = file.parent if file.parent.name == "conf.d" else None
        layers.merge(data, _origin_with_line(file, lines), watch=f"{confd}/" if confd else None)
    if problems:
        raise ConfigError(problems)
    return layers


def env_layer(environ: dict[str, str], prefix: str = "RELAYD_") -> tuple[dict[str, Any], dict[Path_, str]]:
    """RELAYD_A__B__C=value as {"a": {"b": {"c": value}}}; JSON values are decoded.

    Keys are lower-cased (environment variable names are conventionally upper case); the names
    of config tables are restricted to lower case for that reason.
    """
    data: dict[str, Any] = {}
    origins: dict[Path_, str] = {}
    for name in sorted(environ):
        if not name.upper().startswith(prefix) or name.upper() == prefix:
            continue
        path = tuple(part.lower() for part in name[len(prefix):].split("__"))
        if any(not part for part in path):
            continue
        raw = environ[name]
        try:
            value = json.loads(raw) if raw[:1] in "[{" else raw
        except json.JSONDecodeError:
            value = raw
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = value
            origins[path] = f"env:{name}"
    return data, origins


def parse_set(assignment: str) -> dict[str, Any]:
    """``key.path=value`` from the command line; the value is read as TOML, else as a string."""
    key, sep, raw = assignment.partition("=")
    path = _split_dotted(key.strip()) if key.strip() else ()
    if not sep or not path or ".".join(map(str, path)) != key.strip().replace('"', "").replace("'", ""):
        raise ConfigError([Problem("expected KEY.PATH=VALUE", f"--set {assignment}")])
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    result: dict[str, Any] = {}
    node = result
    for part in path[:-1]:
        node = node.setdefault(str(part), {})
    node[str(path[-1])] = value
    return result
