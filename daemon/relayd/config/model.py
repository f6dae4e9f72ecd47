"""The configuration model: core tables plus plugin tables discriminated on kind/method."""

from __future__ import annotations

import os
import re
import socket
import typing
from pathlib import Path
from types import GenericAlias
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from relayd.config.types import Name, RefTo, Seconds, Secret
from relayd.plugins import Registry


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(Strict):
    """Certificate and key in PEM; with client_ca, clients must present a certificate."""

    cert: Path = Field(description="PEM certificate chain file")
    key: Path = Field(description="PEM private key file")
    client_ca: Path | None = Field(None, description="CA bundle; when set, clients need a certificate it signed")


_BIND = re.compile(r"^(unix:.+|\[[0-9a-fA-F:.]+\]:\d{1,5}|[^:\[\]]*:\d{1,5}|\d{1,5})$")


class ListenerConfig(Strict):
    """A listening socket: bound by relayd, or passed by systemd socket activation."""

    bind: str | None = Field(
        None,
        description="'HOST:PORT', '[IPV6]:PORT', 'PORT', 'unix:/path' or 'unix:@abstract'",
    )
    fd_name: str | None = Field(
        None,
        description="FileDescriptorName= of a systemd socket unit; preferred over bind when passed",
    )
    tls: TLSConfig | None = Field(None, description="serve TLS with this certificate")
    backlog: int = Field(1024, ge=1, description="listen(2) backlog when relayd binds (and for "
                         "socket-activated unix sockets)")
    max_connections: int | None = Field(
        None, ge=1,
        description="open client connections at most; at the limit relayd stops accepting (new "
        "connections wait in the backlog) until some close. Default: a share of RLIMIT_NOFILE",
    )

    @field_validator("bind")
    @classmethod
    def _bind_shape(cls, value: str | None) -> str | None:
        if value is not None and not _BIND.match(value):
            raise ValueError("expected 'HOST:PORT', '[IPV6]:PORT', 'PORT' or 'unix:PATH'")
        if value is not None and not value.startswith("unix:") and int(value.rpartition(":")[2]) > 65535:
            raise ValueError("the port must be between 0 and 65535")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ListenerConfig:
        if self.bind is None and self.fd_name is None:
            raise ValueError("a listener needs 'bind' or 'fd_name' (or both)")
        return self


class ScopeMapConfig(Strict):
    """Server addresses (host, host:port, [v6]:port) mapped to the Globus scope they require."""

    servers: dict[str, str] = Field(
        default_factory=dict,
        description="address ('host', 'host:port', '[v6]:port') -> Globus scope string; "
        "keys are normalised (lower case, canonical IP), never resolved")

    @field_validator("servers")
    @classmethod
    def _normalise_servers(cls, value: dict[str, str]) -> dict[str, str]:
        from relayd.auth.scopes import normalize_servers

        return normalize_servers(value)


class ControlConfig(Strict):
    # Not under /run/relayd: systemd deletes RuntimeDirectory= on every stop, which would take
    # the node of systemd/relayd-control.socket with it. Same path as relayctl's default.
    socket: str = Field(
        "/run/relayd-control.sock", description="control socket path, or '@name' for abstract"
    )
    fd_name: str = Field("control", description="socket-activated control socket name")
    mode: str = Field("0660", pattern=r"^0?[0-7]{3}$", description="file mode of the control socket")


class LoggingConfig(Strict):
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    format: Literal["text", "json"] = "text"
    loggers: dict[str, Literal["debug", "info", "warning", "error", "critical"]] = Field(
        default_factory=dict, description="per-logger levels, e.g. 'relayd.relay' = 'debug'"
    )


def _default_state_dir() -> Path:
    # systemd's StateDirectory= exports STATE_DIRECTORY (colon-separated if several).
    return Path(os.environ.get("STATE_DIRECTORY", "/var/lib/relayd").split(":")[0])


class StateConfig(Strict):
    """Where durable state lives: SQLite files in state_dir (default) or one PostgreSQL database."""

    url: Secret | None = Field(
        None,
        description="'postgresql://USER[:PASSWORD]@HOST[:PORT]/DB' (or credential:NAME / file:PATH "
        "holding it); unset: SQLite files in state_dir, no external service",
    )


class ClusterConfig(Strict):
    """Several relayd nodes acting as one service; unset redis: this node is on its own."""

    redis: Secret | None = Field(
        None,
        description="'redis://[:PASSWORD@]HOST[:PORT][/DB]' or 'rediss://...' (or credential:NAME / "
        "file:PATH holding it); nodes exchange relay messages through its PUB/SUB",
    )
    node: str = Field(
        default_factory=socket.gethostname,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="this node's name, unique in the cluster; default: the host name",
    )


class CoreSettings(Strict):
    # Defaults are validated too (a host name that is no valid cluster node name is an error).
    model_config = ConfigDict(extra="forbid", validate_default=True)

    listeners: dict[Name, ListenerConfig] = Field(default_factory=dict)
    scope_maps: dict[Name, ScopeMapConfig] = Field(default_factory=dict)
    control: ControlConfig = Field(default_factory=ControlConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    state_dir: Path = Field(default_factory=_default_state_dir, description="databases live here")
    drain_timeout: Seconds = Field(10.0, description="how long removed components may drain")
    state: StateConfig = Field(default_factory=StateConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    if typing.TYPE_CHECKING:
        # Added by build_settings_model(), typed by the installed plugins' Config classes.
        auth: dict[str, Any] = Field(default_factory=dict)
        components: dict[str, Any] = Field(default_factory=dict)


def _union(models: list[type[BaseModel]], discriminator: str) -> Any:
    if not models:
        # No plugin installed: accept nothing, with a clear message from the tag check.
        return Annotated[dict[str, Any], Field()]
    return Annotated[Union[tuple(models)], Field(discriminator=discriminator)]  # noqa: UP007


def build_settings_model(registry: Registry) -> type[CoreSettings]:
    """Settings with `components` and `auth` tables typed by the installed plugins."""
    components: list[type[BaseModel]] = [cls.Config for cls in registry.usable("components").values()]
    auth: list[type[BaseModel]] = [cls.Config for cls in registry.usable("auth").values()]
    # dict[Name, <union>] with a union built at run time: GenericAlias is what dict[...] makes.
    auth_table: Any = GenericAlias(dict, (Name, _union(auth, "method")))
    component_table: Any = GenericAlias(dict, (Name, _union(components, "kind")))
    return create_model(
        "RelaydSettings",
        __base__=CoreSettings,
        auth=(auth_table, Field(default_factory=dict)),
        components=(component_table, Field(default_factory=dict)),
    )


def iter_refs(model: BaseModel, path: tuple[str | int, ...] = ()):
    """Yield (path, table, name) for every RefTo-annotated value inside `model`."""
    for field_name, info in type(model).model_fields.items():
        value = getattr(model, field_name)
        yield from _refs_in(value, info.annotation, info.metadata, path + (field_name,))


def _refs_in(value: Any, annotation: Any, metadata: list[Any], path: tuple[str | int, ...]):
    for meta in metadata:
        if isinstance(meta, RefTo) and isinstance(value, str):
            yield path, meta.table, value
            return
    if isinstance(value, BaseModel):
        yield from iter_refs(value, path)
        return
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        inner, *extra = typing.get_args(annotation)
        yield from _refs_in(value, inner, list(extra), path)
        return
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(value, (list, tuple)) and args:
        for index, item in enumerate(value):
            yield from _refs_in(item, args[0], [], path + (index,))
    elif isinstance(value, dict) and len(args) == 2:
        for key, item in value.items():
            yield from _refs_in(item, args[1], [], path + (key,))
    elif origin in (Union, getattr(__import__("types"), "UnionType", None)) and value is not None:
        for arg in args:
            yield from _refs_in(value, arg, [], path)
