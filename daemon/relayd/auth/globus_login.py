"""``method = "globus_login"``: browser users log in with Globus (code flow + PKCE + state).

    [auth.browser]
    method = "globus_login"
    client_id = "..."                  # a Globus confidential client; register the redirect URL
    client_secret = "credential:globus-login-secret"   # https://HOST/.relayd/login of each service host
    # scopes = ["openid", "profile", "email"]
    # allowed_domains = ["example.org"]

Used by the http_proxy: a request without a valid session cookie is redirected (GET/HEAD) to
Globus Auth's authorize endpoint, or refused with 401 (other methods, which a redirect would
lose). Globus sends the browser back to ``login_path`` with ``code`` and ``state``; the state
must match the one in the short-lived login cookie of the same browser (no login CSRF), the code
is exchanged with the PKCE verifier, the identity read from the OIDC userinfo endpoint and
checked against the allowlists. The session is a cookie ``<sid>.<expiry>.<HMAC>`` (HttpOnly,
Secure, SameSite=Lax) naming a server-side session that holds the identity and the tokens;
``logout_path`` revokes the tokens at Globus and ends the session. Sessions live in memory:
a restart (or a change of this table) logs everyone out.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode

import aiohttp
from pydantic import Field, model_validator

from relayd.auth.base import AuthConfig, AuthError, AuthFailure, AuthMethod, Identity
from relayd.auth.globus import AuthBaseUrl, _default_base_url
from relayd.config.types import Secret, Seconds

_MAX_PENDING = 10000
_PENDING_TTL = 600.0


class GlobusLoginConfig(AuthConfig):
    method: Literal["globus_login"]
    client_id: str = Field(description="Globus confidential client doing the login (its redirect URLs "
                           "must include https://HOST<login_path> of every service host)")
    client_secret: Secret = Field(description="its secret: inline, 'credential:NAME' or 'file:/path'")
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"],
                              description="scopes requested at login (openid is needed for the identity)")
    session_secret: Secret | None = Field(
        None, description="key signing session cookies; default: random per start")
    session_lifetime: Seconds = Field(8 * 3600.0, gt=0, description="seconds a login session lasts")
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


@dataclass
class Session:
    identity: Identity
    expires: float
    tokens: list[str] = field(default_factory=list)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def cookies(header: bytes | str | None) -> dict[str, str]:
    if not header:
        return {}
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    out = {}
    for part in text.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out.setdefault(name, value)
    return out


class GlobusLogin(AuthMethod):
    Config = GlobusLoginConfig
    config: GlobusLoginConfig
    browser = True  # the http_proxy drives the login flow for this method

    def __init__(self, name: str, config: GlobusLoginConfig, context: Any) -> None:
        super().__init__(name, config, context)
        secret = config.session_secret.get_secret_value().encode() if config.session_secret else None
        self._key = hashlib.sha256(b"relayd session\0" + secret).digest() if secret else secrets.token_bytes(32)
        self.sessions: dict[str, Session] = {}
        self.pending: dict[str, tuple[str, str, str, float]] = {}  # state -> verifier, redirect, target, at
        self.http: aiohttp.ClientSession | None = None
        self.login_cookie = config.cookie_name + "_login"

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout))

    async def close(self) -> None:
        if self.http:
            await self.http.close()

    async def authenticate(self, authorization: str | None) -> Identity:
        raise AuthError(AuthFailure.MISSING, "log in with a web browser (Globus login)")

    def describe(self) -> dict[str, Any]:
        return {"method": "globus_login", "client_id": self.config.client_id, "scopes": self.config.scopes,
                "login_path": self.config.login_path, "logout_path": self.config.logout_path,
                "auth_base_url": self.config.auth_base_url}

    # -- cookies -------------------------------------------------------------------------------

    def _sign(self, value: str) -> str:
        return value + "." + _b64(hmac.new(self._key, value.encode(), hashlib.sha256).digest())

    def _unsign(self, signed: str) -> str | None:
        value, _, signature = signed.rpartition(".")
        expected = _b64(hmac.new(self._key, value.encode(), hashlib.sha256).digest())
        return value if value and hmac.compare_digest(signature, expected) else None

    def _cookie(self, name: str, value: str, max_age: int) -> bytes:
        return (f"Set-Cookie: {name}={value}; Path=/; Max-Age={max_age}; HttpOnly; Secure; "
                "SameSite=Lax").encode()

    def session_identity(self, cookie_header: bytes | None) -> Identity | None:
        """The identity of a valid session cookie, else None (cheap: HMAC + dict lookup)."""
        raw = cookies(cookie_header).get(self.config.cookie_name)
        if not raw:
            return None
        value = self._unsign(raw)
        if value is None:
            return None
        sid, _, expiry = value.partition(".")
        session = self.sessions.get(sid)
        now = time.time()
        if session is None or session.expires < now or not expiry.isdigit() or int(expiry) < now:
            return None
        return session.identity

    # -- the flow --------------------------------------------------------------------------------

    def start_login(self, scheme: str, host: str, target: str) -> tuple[str, list[bytes]]:
        """(authorize URL, Set-Cookie headers) for a browser without a session."""
        now = time.time()
        if len(self.pending) >= _MAX_PENDING:
            self.pending = {s: p for s, p in self.pending.items() if now - p[3] < _PENDING_TTL}
            while len(self.pending) >= _MAX_PENDING:
                self.pending.pop(next(iter(self.pending)))
        verifier = secrets.token_urlsafe(48)
        state = secrets.token_urlsafe(24)
        redirect_uri = f"{scheme}://{host}{self.config.login_path}"
        self.pending[state] = (verifier, redirect_uri, target, now)
        query = urlencode({
            "client_id": self.config.client_id, "redirect_uri": redirect_uri, "response_type": "code",
            "scope": " ".join(self.config.scopes), "state": state, "access_type": "online",
            "code_challenge": _b64(hashlib.sha256(verifier.encode()).digest()), "code_challenge_method": "S256",
        })
        return (f"{self.config.auth_base_url}/v2/oauth2/authorize?{query}",
                [self._cookie(self.login_cookie, self._sign(state), int(_PENDING_TTL))])

    async def finish_login(self, query: dict[str, str], cookie_header: bytes | None) -> tuple[int, str, list[bytes]]:
        """Handle the redirect back from Globus: (status, location or message, headers)."""
        state, code = query.get("state", ""), query.get("code", "")
        clear = [self._cookie(self.login_cookie, "", 0)]
        if query.get("error"):
            return 403, f"Globus login failed: {query.get('error_description') or query['error']}", clear
        signed = cookies(cookie_header).get(self.login_cookie, "")
        if not state or not code or self._unsign(signed) != state:
            return 400, "login state does not match this browser; start again", clear
        pending = self.pending.pop(state, None)
        if pending is None or time.time() - pending[3] > _PENDING_TTL:
            return 400, "login expired; start again", clear
        verifier, redirect_uri, target, _ = pending
        try:
            tokens = await self._post("/v2/oauth2/token", {
                "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": verifier})
            all_tokens = [tokens] + list(tokens.get("other_tokens") or [])
            auth_token = next((t["access_token"] for t in all_tokens
                               if t.get("resource_server") == "auth.globus.org"), None)
            if auth_token is None:
                return 403, "the login did not grant the openid scope", clear
            assert self.http is not None
            async with self.http.get(self.config.auth_base_url + "/v2/oauth2/userinfo",
                                     headers={"Authorization": f"Bearer {auth_token}"}) as response:
                if response.status != 200:
                    return 503, "Globus Auth did not return the identity", clear
                info = await response.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
            return 503, "Globus Auth is unavailable", clear
        held = [t[k] for t in all_tokens for k in ("access_token", "refresh_token") if t.get(k)]
        identity = Identity(sub=info["sub"], method=self.name, username=info.get("preferred_username"),
                            name=info.get("name"), email=info.get("email"),
                            scopes=frozenset(" ".join(t.get("scope", "") for t in all_tokens).split()))
        linked = {i.get("sub") for i in info.get("identity_set") or [] if isinstance(i, dict)} | {identity.sub}
        refusal = self._refusal(identity, linked)
        if refusal:
            await self._revoke(held)
            return 403, refusal, clear
        sid = secrets.token_urlsafe(24)
        expires = time.time() + self.config.session_lifetime
        self.sessions[sid] = Session(identity, expires, held)
        self._expire_sessions()
        value = self._sign(f"{sid}.{int(expires)}")
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        return 302, target, clear + [self._cookie(self.config.cookie_name, value, int(self.config.session_lifetime))]

    def _refusal(self, identity: Identity, linked: set[str]) -> str | None:
        cfg = self.config
        if cfg.allowed_identities and not linked & set(cfg.allowed_identities):
            return "this Globus identity is not allowed here"
        username = identity.username or ""
        if cfg.allowed_usernames and username not in cfg.allowed_usernames:
            return "this Globus username is not allowed here"
        if cfg.allowed_domains and username.rpartition("@")[2] not in cfg.allowed_domains:
            return "this identity provider's domain is not allowed here"
        return None

    async def logout(self, cookie_header: bytes | None) -> list[bytes]:
        raw = cookies(cookie_header).get(self.config.cookie_name, "")
        value = self._unsign(raw) if raw else None
        if value:
            session = self.sessions.pop(value.partition(".")[0], None)
            if session is not None:
                await self._revoke(session.tokens)
        return [self._cookie(self.config.cookie_name, "", 0)]

    def _expire_sessions(self) -> None:
        now = time.time()
        if len(self.sessions) % 256 == 0:
            self.sessions = {s: v for s, v in self.sessions.items() if v.expires > now}

    async def _revoke(self, tokens: list[str]) -> None:
        for token in tokens:
            try:
                await self._post("/v2/oauth2/token/revoke", {"token": token})
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                self.log.warning("could not revoke a token at Globus Auth")

    async def _post(self, path: str, form: dict[str, str]) -> dict[str, Any]:
        assert self.http is not None
        auth = aiohttp.BasicAuth(self.config.client_id, self.config.client_secret.get_secret_value())
        async with self.http.post(self.config.auth_base_url + path, data=form, auth=auth) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                raise ValueError(f"Globus Auth answered {response.status}: {body.get('error')}")
            return body
