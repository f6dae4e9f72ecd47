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
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from collections.abc import Iterable

    from prometheus_client.core import Metric

    from relayd.component import Context


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


class AuthMethod:
    """Base class of auth plugins (entry point group ``relayd.auth``).

    Same lifecycle as a component (:mod:`relayd.lifecycle`): the constructor makes every
    attribute and does no I/O; ``start`` opens databases or HTTP sessions and may raise to
    reject the configuration; ``stop`` releases them, also after a failed start. Auth methods
    stop after the components that use them.
    """

    Config: ClassVar[type[AuthConfig]]

    def __init__(self, name: str, config: AuthConfig, context: Context) -> None:
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
