"""The contract between auth methods and components.

Every method turns the credentials a client presented (today: the value of an HTTP
``Authorization`` header or its gRPC metadata twin) into one :class:`Identity`, or raises
:class:`AuthError` with one :class:`AuthFailure` reason. Components map reasons to their
protocol: HTTP 401/403/503, relay close 4001/4002, gRPC UNAUTHENTICATED, and so on.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from relayd.config.model import ClusterConfig, StateConfig
    from relayd.engines import Engines
    from relayd.metric_families import Metric


class AuthFailure(enum.Enum):
    MISSING = "missing"  # no credentials at all: HTTP 401, relay 4001
    MALFORMED = "malformed"  # credentials of the wrong shape: HTTP 401, relay 4001
    INVALID = "invalid"  # unknown user, wrong password, inactive/expired token: 401, 4002
    FORBIDDEN = "forbidden"  # authenticated but not allowed (scope, audience, allowlist): 403, 4002
    UNAVAILABLE = "unavailable"  # the authority could not be asked (Globus down): 503, 1013


class AuthError(Exception):
    """Authentication refused; ``str(err)`` is safe to show the client (no secrets)."""

    def __init__(self, reason: AuthFailure, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Identity:
    """Who a request belongs to, the same shape for every auth method."""

    sub: str  # stable unique id: Globus identity id, basic user name, "anonymous"
    method: str  # the [auth.NAME] that decided
    username: str | None = None
    name: str | None = None
    email: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    anonymous: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "sub": self.sub,
            "method": self.method,
            "username": self.username,
            "name": self.name,
            "email": self.email,
            "scopes": sorted(self.scopes),
            "anonymous": self.anonymous,
        }


class AuthConfig(BaseModel):
    """Base of every [auth.NAME] table; plugins add ``method: Literal["..."]``."""

    model_config = ConfigDict(extra="forbid")


class AuthContext(Protocol):
    """What an auth method may use from its relayd.context.Context (which has this shape)."""

    state_dir: Path
    state: StateConfig | None
    cluster: ClusterConfig | None
    engines: Engines | None


class AuthMethod:
    """Base class of auth plugins (entry point group ``relayd.auth``).

    Same lifecycle as a component (:mod:`relayd.lifecycle`): the constructor makes every
    attribute and does no I/O; ``start`` opens databases or HTTP sessions and may raise to
    reject the configuration; ``stop`` releases them, also after a failed start. Auth methods
    stop after the components that use them.
    """

    Config: ClassVar[type[AuthConfig]]
    # The http_proxy may cache this method's verdict on a credential for auth_cache_ttl (basic:
    # an argon2 check per request would be the bottleneck). Methods that cache themselves, or
    # whose verdict may change at any moment, leave it False.
    cacheable: ClassVar[bool] = False

    def __init__(self, name: str, config: AuthConfig, context: AuthContext) -> None:
        self.name = name
        self.config = config
        self.context = context
        self.log = logging.getLogger(f"relayd.auth.{name}")

    async def start(self) -> None:
        pass

    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Release what start() opened (also after a start() that raised). The runtime calls
        this, never :meth:`close`."""
        if type(self).close is not AuthMethod.close:  # a plugin written before stop() existed
            await self.close()

    async def close(self) -> None:
        """Deprecated alias of :meth:`stop` (the name this hook had before auth methods and
        components shared one lifecycle): older plugins may still override or call it."""
        await self.stop()

    async def authenticate(self, authorization: str | None) -> Identity:
        """Decide who presented ``authorization`` (an HTTP Authorization header value)."""
        raise NotImplementedError

    def challenge(self) -> str | None:
        """The WWW-Authenticate value to send with a 401, if the method has one."""
        return None

    def describe(self) -> dict[str, Any]:
        """What a client must present, for unauthenticated discovery (no secrets)."""
        return {"method": self.config.method}  # type: ignore[attr-defined]

    @property
    def allows_anonymous(self) -> bool:
        return False

    def metrics(self) -> Iterable[Metric]:
        """Prometheus metric families for this method (label ``auth`` = its name)."""
        return ()


# -- optional capabilities -------------------------------------------------------------------
# What some auth methods can do beyond authenticate(). A component asks with isinstance()
# (the Protocols are runtime-checkable), never with getattr(), and gets a typed object back.


@runtime_checkable
class OAuthClientConfig(Protocol):
    """The method's *config* names an OAuth client (globus, globus_login): ``client_id`` is the
    resource a stream's scope belongs to."""

    client_id: str


class BrowserLoginConfig(Protocol):
    login_path: str
    logout_path: str
    cookie_name: str


@runtime_checkable
class BrowserLogin(Protocol):
    """The method signs browsers in with cookie sessions (globus_login): the http_proxy routes
    ``login_path``/``logout_path`` to :meth:`browser_step`, strips ``cookie_name`` (and
    ``cookie_name + "_login"``) from upstream requests and admits a request whose session
    cookie :meth:`session_identity` knows."""

    name: str

    @property
    def config(self) -> BrowserLoginConfig: ...

    def session_identity(self, cookie_header: bytes | None) -> Identity | None: ...

    async def browser_step(self, path: str, query: dict[str, str], cookie_header: bytes | None,
                           scheme: str, host: str, target: str, home: str = "/") -> Any: ...


class UserDatabase(Protocol):
    """Users with passwords that relayd can change (relayd.auth.users.UserStore)."""

    def add(self, username: str, password: str) -> object: ...

    def remove(self, username: str) -> None: ...

    def verify(self, username: str, password: str) -> bool: ...

    def __contains__(self, username: str) -> bool: ...


class ReadOnlyUsers(Protocol):
    def get(self, username: str) -> bytes | None: ...


@runtime_checkable
class ManagesUsers(Protocol):
    """The method checks passwords against a user database relayd writes (basic): the
    http_proxy's management API and ``relayctl users`` add and remove users through ``users``;
    ``htpasswd``, when set, holds more users, read only."""

    name: str
    users: UserDatabase
    htpasswd: ReadOnlyUsers | None
