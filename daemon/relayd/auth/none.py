"""``method = "none"``: everyone is the anonymous identity. Must be chosen explicitly."""

from __future__ import annotations

from typing import Literal

from relayd.auth.base import AuthConfig, AuthMethod, Identity


class NoAuthConfig(AuthConfig):
    method: Literal["none"]


class NoAuth(AuthMethod):
    Config = NoAuthConfig

    async def authenticate(self, authorization: str | None) -> Identity:
        return Identity(sub="anonymous", method=self.name, anonymous=True)

    @property
    def allows_anonymous(self) -> bool:
        return True
