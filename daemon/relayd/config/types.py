"""Field types shared by the core and plugin config models."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, SecretStr, StringConstraints, WithJsonSchema

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
# Names are lower case because environment variable keys are lower-cased (config/sources.py):
# RELAYD_COMPONENTS__MyRelay__... would silently become "myrelay".
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


@dataclass(frozen=True)
class RefTo:
    """Marks a str field as the name of an entry of a top-level table (listeners, auth...)."""

    table: str


ListenerRef = Annotated[str, RefTo("listeners")]
AuthRef = Annotated[str, RefTo("auth")]
ScopeMapRef = Annotated[str, RefTo("scope_maps")]


def _read_secret(value: Any) -> Any:
    """Secrets may be written inline, or as ``credential:NAME`` / ``file:/path``.

    ``credential:NAME`` reads $CREDENTIALS_DIRECTORY/NAME, which systemd fills from
    ``LoadCredential=NAME:/etc/relayd/credentials/...`` readable by the service user only.
    """
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        return value
    if value.startswith("credential:"):
        name = value.removeprefix("credential:")
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ValueError(
                f"{value!r} needs $CREDENTIALS_DIRECTORY (set by systemd's LoadCredential=)"
            )
        return _read_secret_file(Path(directory) / name)
    if value.startswith("file:"):
        return _read_secret_file(Path(value.removeprefix("file:")))
    return value


def _read_secret_file(path: Path) -> str:
    try:
        return path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None


Secret = Annotated[SecretStr, BeforeValidator(_read_secret)]


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def _parse_duration(value: Any) -> Any:
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("expected seconds as a number, or a string like '500ms', '30s', '5m', '1h'")
        number, unit = float(match[1]), match[2] or "s"
        return number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return value


def _non_negative(value: float) -> float:
    if value < 0:
        raise ValueError("must not be negative")
    return value


# The schema states what the validator accepts, so editors don't flag "30s".
_SECONDS_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": _DURATION.pattern},
    ]
}
Seconds = Annotated[
    float,
    BeforeValidator(_parse_duration),
    AfterValidator(_non_negative),
    WithJsonSchema(_SECONDS_SCHEMA, mode="validation"),
]
