"""The ``[auth.NAME]`` table of ``method = "globus_login"`` (relayd.auth.globus_login)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from relayd.auth.base import AuthConfig
from relayd.auth.globus import AuthBaseUrl, _default_base_url
from relayd.config.types import Seconds, Secret


class GlobusLoginConfig(AuthConfig):
    method: Literal["globus_login"]
    client_id: str = Field(description="Globus confidential client doing the login (its redirect URLs "
                           "must include https://HOST<login_path> of every service host)")
    client_secret: Secret = Field(description="its secret: inline, 'credential:NAME' or 'file:/path'")
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"],
                              description="scopes requested at login (openid is needed for the identity)")
    session_secret: Secret | None = Field(
        None, description="key signing session cookies; default: a random key kept in sessions_db")
    session_lifetime: Seconds = Field(8 * 3600.0, gt=0, description="seconds a login session lasts")
    session_idle: Seconds = Field(3600.0, ge=0, description="a session without a request for this many "
                                  "seconds ends (0 = only session_lifetime)")
    sessions_db: Path | None = Field(None, description="SQLite database of browser sessions; default "
                                     "<state_dir>/browser-sessions-<NAME>.sqlite3")
    revoke_retry: Seconds = Field(30.0, gt=0, description="seconds between attempts to revoke the tokens "
                                  "of ended sessions while Globus Auth is unreachable")
    cookie_name: str = Field("relayd_session", pattern=r"^[A-Za-z0-9_-]+$", description="session cookie name")
    login_path: str = Field("/.relayd/login", pattern=r"^/\S*$", description="redirect (callback) path")
    logout_path: str = Field("/.relayd/logout", pattern=r"^/\S*$", description="path that ends the session")
    allowed_identities: list[str] = Field(default_factory=list, description="if set, only these identity ids")
    allowed_usernames: list[str] = Field(default_factory=list, description="if set, only these usernames")
    allowed_domains: list[str] = Field(default_factory=list,
                                       description="if set, only usernames at these identity-provider domains")
    timeout: Seconds = Field(10.0, gt=0, description="timeout of each request to Globus Auth")
    auth_base_url: AuthBaseUrl = Field(default_factory=_default_base_url,
                               description="Globus Auth base URL; default $GLOBUS_SDK_SERVICE_URL_AUTH "
                               "or https://auth.globus.org")

    @model_validator(mode="after")
    def _distinct_paths(self) -> GlobusLoginConfig:
        # Two methods on one listener must not share these either: checked where services use
        # them (http_proxy), as only there is it known which methods meet on a listener.
        if self.login_path == self.logout_path:
            raise ValueError(f"login_path and logout_path must differ (both are {self.login_path!r})")
        return self
