"""``method = "basic"``: HTTP Basic users from an SQLite user store (and optionally htpasswd).

    [auth.users]
    method = "basic"
    realm = "relayd"
    # users_db = "/var/lib/relayd/users-users.sqlite3"   (default: <state_dir>/users-<NAME>.sqlite3)
    # htpasswd = "/etc/relayd/htpasswd"                  (read-only, bcrypt entries only)

Users are managed with ``relayctl users`` or the http_proxy management API (both use
:class:`relayd.auth.users.UserStore` on the same file). With ``[state] url`` set, the users live
in PostgreSQL instead (relayd.state.users_pg: schema ``basic:NAME``, shared by every node, a
copy in memory refreshed on NOTIFY), and users_db is not used. A user in the database wins over a
user of the same name in the htpasswd file. The identity is ``Identity(sub=username,
username=username)``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from relayd import state
from relayd.auth import htpasswd as htp
from relayd.auth.base import AuthConfig, AuthError, AuthFailure, AuthMethod, Identity
from relayd.auth.users import MAX_PASSWORD, MAX_USERNAME, UserStore, verify_hash
from relayd.metric_families import Metric, counter

if TYPE_CHECKING:
    from relayd.state.users_pg import PgUserStore


class BasicAuthConfig(AuthConfig):
    method: Literal["basic"]
    realm: str = Field("relayd", pattern=r'^[^"\\\x00-\x1f]*$',
                       description="realm sent in WWW-Authenticate (no quotes or backslashes)")
    users_db: Path | None = Field(
        None, description="SQLite user database; default <state_dir>/users-<NAME>.sqlite3")
    htpasswd: Path | None = Field(
        None, description="Apache htpasswd file with bcrypt entries (htpasswd -B), read only")


def default_users_db(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / f"users-{name}.sqlite3"


class BasicAuth(AuthMethod):
    Config = BasicAuthConfig
    config: BasicAuthConfig
    cacheable = True  # an argon2 check per request would be the bottleneck

    def __init__(self, name: str, config: BasicAuthConfig, context: Any) -> None:
        super().__init__(name, config, context)
        self.db_path: Path | str = config.users_db or default_users_db(context.state_dir, name)
        self.watcher: Any = None
        self.pg_users: PgUserStore | None = None  # the same store as users, with [state] url
        url = state.postgres_url(context)
        if url is None:
            self.users = UserStore(self.db_path)
        else:
            from relayd.state.users_pg import PgUserStore

            self.users = self.pg_users = PgUserStore(url, name, state.health(context, url))
            self.db_path = self.pg_users.where
        self.htpasswd = htp.Htpasswd(config.htpasswd) if config.htpasswd else None
        self.stats = {"checks": 0, "failures": 0}

    async def start(self) -> None:
        await asyncio.to_thread(self.users.open)
        pg = self.pg_users
        if pg is not None:  # PostgreSQL: follow the other nodes' changes
            from relayd.state.pg import Watcher

            self.watcher = Watcher(pg.url, pg.schema, lambda: asyncio.to_thread(pg.reload), pg.db.health)
            self.watcher.start()
        if self.htpasswd:
            try:
                await asyncio.to_thread(self.htpasswd.load)
            except htp.HtpasswdError as exc:
                raise ValueError(f"auth.{self.name}: {exc}") from None
        self.log.info("basic auth %r: users in %s%s", self.name, self.db_path,
                      f", read-only htpasswd {self.config.htpasswd}" if self.htpasswd else "")

    async def stop(self, drain_timeout: float = 0.0) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        close = getattr(self.users, "close", None)
        if close is not None:
            await asyncio.to_thread(close)

    async def authenticate(self, authorization: str | None) -> Identity:
        username, password = parse_basic(authorization)
        self.stats["checks"] += 1
        try:
            ok = await asyncio.to_thread(self.check, username, password)
        except (sqlite3.Error, OSError) as exc:
            self.log.error("user database %s unusable: %s -> denying", self.db_path, exc)
            raise AuthError(AuthFailure.UNAVAILABLE, "the user database is unavailable; try again later") \
                from None
        if not ok:
            self.stats["failures"] += 1
            raise AuthError(AuthFailure.INVALID, "wrong user name or password")
        return Identity(sub=username, method=self.name, username=username)

    def metrics(self) -> Iterable[Metric]:
        for key, text in (("checks", "Basic credentials checked"),
                          ("failures", "Basic credentials refused (unknown user or wrong password)")):
            yield counter(f"relayd_auth_basic_{key}", text, ["auth"], [([self.name], self.stats[key])])

    def check(self, username: str, password: str) -> bool:
        """Blocking: database user, else htpasswd user, else a dummy hash (same cost)."""
        if username in self.users:
            return self.users.verify(username, password)
        digest = self.htpasswd.get(username) if self.htpasswd else None
        if digest is not None:
            return htp.check(digest, password)
        verify_hash(self.users.dummy_hash(), password)  # spend the same time as a real check
        return False

    def challenge(self) -> str:
        return f'Basic realm="{self.config.realm}", charset="UTF-8"'

    def describe(self) -> dict[str, Any]:
        return {"method": "basic", "realm": self.config.realm}


def parse_basic(authorization: str | None) -> tuple[str, str]:
    """Split an ``Authorization: Basic`` value (RFC 7617) into user and password."""
    if authorization is None or not authorization.strip():
        raise AuthError(AuthFailure.MISSING, "credentials required (HTTP Basic)")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        raise AuthError(AuthFailure.MALFORMED, "expected 'Authorization: Basic <base64 user:password>'")
    value = value.strip()
    if len(value) > 4 * (MAX_USERNAME * 4 + MAX_PASSWORD * 4 + 1) // 3 + 4:
        raise AuthError(AuthFailure.MALFORMED, "Basic credentials too long")
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise AuthError(AuthFailure.MALFORMED, "Basic credentials are not base64 of UTF-8 'user:password'") \
            from None
    username, sep, password = decoded.partition(":")
    if not sep or not username:
        raise AuthError(AuthFailure.MALFORMED, "Basic credentials must be 'user:password'")
    return username, password
