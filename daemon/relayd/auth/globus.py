"""``method = "globus"``: bearer tokens checked by Globus Auth token introspection.

    [auth.globus]
    method = "globus"
    client_id = "<relayd's confidential client / resource server id>"
    client_secret = "credential:globus-secret"      # or file:/path, or $RELAYD_AUTH__GLOBUS__CLIENT_SECRET
    required_scopes = ["https://auth.globus.org/scopes/<client_id>/relay"]
    # audience = "<client_id>"                       (default: client_id)
    # allowed_identities / allowed_usernames / allowed_domains = [...]

Decision, in order (see ../shared/reference/http-auth-and-globus.md §3.2):
header ``Bearer <token>`` (else MISSING/MALFORMED) -> introspection with relayd's client
credentials (unreachable, 5xx, or our credentials refused: UNAVAILABLE, logged) -> ``active``
(else INVALID) -> ``nbf``/``exp`` within ``clock_skew`` (else INVALID) -> ``audience`` in ``aud``
(else FORBIDDEN) -> every ``required_scopes`` entry in ``scope`` (else FORBIDDEN) -> allowlists
(else FORBIDDEN). The identity is ``sub`` (the Globus identity id), username, name, email.

Decisions are cached under SHA-256(token): an accepted token for min(cache_ttl, exp - now), a
refused one for ``negative_cache_ttl``; UNAVAILABLE is never cached. Concurrent checks of one
token share one introspection request. Introspection runs on aiohttp, so the loop never blocks.
Tokens and the client secret are never logged; log lines name a token by ``sha256:<8 hex>``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal

import aiohttp
from pydantic import AfterValidator, Field, field_validator

from relayd.auth.base import AuthConfig, AuthError, AuthFailure, AuthMethod, Identity
from relayd.config.types import Seconds, Secret
from relayd.metric_families import Metric, counter, gauge

DEFAULT_AUTH_BASE_URL = "https://auth.globus.org"
# RFC 6750 b64token; Globus tokens are alphanumeric, this only keeps junk away from Globus.
_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
MAX_TOKEN = 4096


def _default_base_url() -> str:
    # globus-sdk's documented override, so one variable points relayd and relayctl at a test fake.
    return os.environ.get("GLOBUS_SDK_SERVICE_URL_AUTH") or DEFAULT_AUTH_BASE_URL


def _check_base_url(value: str) -> str:
    if not value.startswith(("https://", "http://")):
        raise ValueError("expected an http(s) URL")
    return value.rstrip("/")


# Shared by the globus and globus_login methods.
AuthBaseUrl = Annotated[str, AfterValidator(_check_base_url)]


class GlobusAuthConfig(AuthConfig):
    method: Literal["globus"]
    client_id: str = Field(description="client id of relayd's Globus confidential client (resource server)")
    client_secret: Secret = Field(
        description="its secret: inline, 'credential:NAME' (systemd LoadCredential=) or 'file:/path'")
    audience: str | None = Field(None, description="a token's 'aud' must contain this; default: client_id")
    required_scopes: list[str] = Field(
        default_factory=list, description="scope strings a token must all carry (e.g. https://auth.globus.org/scopes/ID/relay)")
    login_scope: str | None = Field(
        None, description="scope clients should log in for, published by discovery; default: required_scopes joined")
    allowed_identities: list[str] = Field(
        default_factory=list, description="if set, only these Globus identity ids (or linked identities) may pass")
    allowed_usernames: list[str] = Field(
        default_factory=list, description="if set, only these Globus usernames (user@idp.example) may pass")
    allowed_domains: list[str] = Field(
        default_factory=list, description="if set, only usernames at these identity-provider domains may pass")
    cache_ttl: Seconds = Field(60.0, description="how long an accepted token is remembered (never past its exp)")
    negative_cache_ttl: Seconds = Field(10.0, description="how long a refused token is remembered")
    cache_size: int = Field(10000, ge=0, description="maximum number of remembered tokens")
    timeout: Seconds = Field(10.0, gt=0, description="introspection request timeout")
    clock_skew: Seconds = Field(5.0, description="tolerance for nbf/exp against Globus's clock")
    auth_base_url: AuthBaseUrl = Field(
        default_factory=_default_base_url,
        description="Globus Auth base URL; default $GLOBUS_SDK_SERVICE_URL_AUTH or https://auth.globus.org")

    @field_validator("client_id", "client_secret")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        # SciStream treats an empty secret as "auth off"; here it is a configuration error.
        text = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        if not text.strip():
            raise ValueError("must not be empty (to turn auth off, use method = \"none\")")
        return value

    @field_validator("allowed_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return [d.lower().lstrip("@") for d in value]


def token_id(token: str) -> str:
    """A loggable, non-secret name for a token."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:8]


def parse_bearer(authorization: str | None) -> str:
    if authorization is None or not authorization.strip():
        raise AuthError(AuthFailure.MISSING, "a Globus access token is required (Authorization: Bearer <token>)")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError(AuthFailure.MALFORMED, "expected 'Authorization: Bearer <token>'")
    if len(token) > MAX_TOKEN or not _TOKEN.match(token):
        raise AuthError(AuthFailure.MALFORMED, "the bearer token has characters or a length no token has")
    return token


def decide(meta: dict[str, Any], config: GlobusAuthConfig, method: str, now: float) -> Identity:
    """The pure decision on an introspection response: an Identity, or AuthError."""
    if meta.get("active") is not True:
        raise AuthError(AuthFailure.INVALID, "token is inactive, expired or revoked")
    skew = config.clock_skew
    exp, nbf = meta.get("exp"), meta.get("nbf")
    if isinstance(exp, (int, float)) and exp <= now - skew:
        raise AuthError(AuthFailure.INVALID, "token has expired")
    if isinstance(nbf, (int, float)) and nbf > now + skew:
        raise AuthError(AuthFailure.INVALID, "token is not valid yet")
    audience = config.audience or config.client_id
    aud = meta.get("aud") or []
    if isinstance(aud, str):
        aud = [aud]
    if audience not in aud:
        raise AuthError(AuthFailure.FORBIDDEN, "token was not issued for this service (audience)")
    scopes = frozenset(str(meta.get("scope") or "").split())
    missing = [s for s in config.required_scopes if s not in scopes]
    if missing:
        raise AuthError(AuthFailure.FORBIDDEN, f"token lacks the required scope {missing[0]}")
    sub = meta.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError(AuthFailure.INVALID, "token has no identity (sub)")
    username = meta.get("username") if isinstance(meta.get("username"), str) else None
    if config.allowed_identities:
        linked = {sub, *[i for i in meta.get("identity_set") or [] if isinstance(i, str)]}
        if not linked & set(config.allowed_identities):
            raise AuthError(AuthFailure.FORBIDDEN, "identity is not in this service's allowlist")
    if config.allowed_usernames and username not in config.allowed_usernames:
        raise AuthError(AuthFailure.FORBIDDEN, "user name is not in this service's allowlist")
    if config.allowed_domains:
        domain = username.rpartition("@")[2].lower() if username and "@" in username else None
        if domain not in config.allowed_domains:
            raise AuthError(AuthFailure.FORBIDDEN, "identity provider domain is not allowed here")
    return Identity(sub=sub, method=method, username=username, name=meta.get("name"),
                    email=meta.get("email"), scopes=scopes)


class GlobusAuth(AuthMethod):
    Config = GlobusAuthConfig
    config: GlobusAuthConfig

    def __init__(self, name: str, config: GlobusAuthConfig, context: Any) -> None:
        super().__init__(name, config, context)
        self.clock: Callable[[], float] = time.time  # replaced by tests
        self.session: aiohttp.ClientSession | None = None
        # sha256(token) -> (valid until, Identity | AuthError)
        self.cache: OrderedDict[bytes, tuple[float, Identity | AuthError]] = OrderedDict()
        self.inflight: dict[bytes, asyncio.Future[Identity]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = {"checks": 0, "cache_hits": 0, "introspections": 0, "unavailable": 0}
        self._outage_logged_at = -1e9
        self._outage_quiet = 0
        self.introspect_url = f"{config.auth_base_url}/v2/oauth2/token/introspect"

    async def start(self) -> None:
        credentials = f"{self.config.client_id}:{self.config.client_secret.get_secret_value()}"
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            headers={"User-Agent": "relayd",
                     "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()},
        )
        self.log.info("globus auth %r: introspecting at %s as client %s", self.name,
                      self.config.auth_base_url, self.config.client_id)

    async def stop(self, drain_timeout: float = 0.0) -> None:
        if self.session:
            await self.session.close()
            self.session = None

    async def authenticate(self, authorization: str | None) -> Identity:
        token = parse_bearer(authorization)
        self.stats["checks"] += 1
        key = hashlib.sha256(token.encode()).digest()
        cached = self._cached(key)
        if cached is not None:
            self.stats["cache_hits"] += 1
            if isinstance(cached, AuthError):
                raise AuthError(cached.reason, cached.message)
            return cached
        flight = self.inflight.get(key)
        if flight is None:
            flight = asyncio.get_running_loop().create_future()
            self.inflight[key] = flight
            task = asyncio.ensure_future(self._check(token, key, flight))
            self._tasks.add(task)  # keep a reference until done
            task.add_done_callback(self._tasks.discard)
        # shield: one waiter being cancelled must not cancel the check the others share
        return await asyncio.shield(flight)

    def _cached(self, key: bytes) -> Identity | AuthError | None:
        entry = self.cache.get(key)
        if entry is None:
            return None
        until, result = entry
        if until <= self.clock():
            del self.cache[key]
            return None
        return result

    def _remember(self, key: bytes, result: Identity | AuthError, until: float) -> None:
        if self.config.cache_size == 0 or until <= self.clock():
            return
        self.cache[key] = (until, result)
        self.cache.move_to_end(key)
        while len(self.cache) > self.config.cache_size:
            self.cache.popitem(last=False)

    async def _check(self, token: str, key: bytes, flight: asyncio.Future[Identity]) -> None:
        try:
            meta = await self._introspect(token)
            now = self.clock()
            try:
                identity = decide(meta, self.config, self.name, now)
            except AuthError as exc:
                self.log.info("token %s refused: %s", token_id(token), exc.message)
                self._remember(key, exc, now + self.config.negative_cache_ttl)
                flight.set_exception(exc)
                return
            exp = meta.get("exp")
            until = now + self.config.cache_ttl
            if isinstance(exp, (int, float)):
                until = min(until, float(exp))
            self._remember(key, identity, until)
            flight.set_result(identity)
        except AuthError as exc:  # UNAVAILABLE: not cached
            flight.set_exception(exc)
        except BaseException as exc:  # never leave waiters hanging
            flight.set_exception(AuthError(AuthFailure.UNAVAILABLE, "token check failed"))
            if not isinstance(exc, Exception):
                raise
            self.log.exception("token %s: unexpected error during introspection", token_id(token))
        finally:
            self.inflight.pop(key, None)
            if flight.done() and not flight.cancelled():
                flight.exception()  # mark retrieved: nobody may be waiting any more

    async def _introspect(self, token: str) -> dict[str, Any]:
        self.stats["introspections"] += 1
        if self.session is None:
            raise AuthError(AuthFailure.UNAVAILABLE, "Globus auth method is not started")
        form = {"token": token}
        if self.config.allowed_identities:
            form["include"] = "identity_set"
        try:
            async with self.session.post(self.introspect_url, data=form) as response:
                if response.status == 401:
                    self._unavailable("Globus refused relayd's client credentials (client_id %s): check "
                                      "client_secret", self.config.client_id)
                if response.status != 200:
                    self._unavailable("Globus introspection answered HTTP %d", response.status)
                body = await response.json(content_type=None)
        except AuthError:
            raise
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self._unavailable("Globus introspection at %s failed: %s", self.introspect_url,
                              type(exc).__name__ + (f": {exc}" if str(exc) else ""))
        if not isinstance(body, dict):
            self._unavailable("Globus introspection returned %s, not a JSON object", type(body).__name__)
        return body

    def _unavailable(self, message: str, *args: Any) -> None:
        self.stats["unavailable"] += 1
        # During an outage every request fails the same way: one line per 10 s, with a count.
        now = time.monotonic()
        if now - self._outage_logged_at >= 10.0:
            extra = f" ({self._outage_quiet} more denials since the last line)" if self._outage_quiet else ""
            self.log.error(message + " -> denying" + extra, *args)
            self._outage_logged_at, self._outage_quiet = now, 0
        else:
            self._outage_quiet += 1
        raise AuthError(AuthFailure.UNAVAILABLE, "Globus Auth is unavailable; try again later")

    def metrics(self) -> Iterable[Metric]:
        help_text = {
            "checks": "Bearer tokens checked (cache hits included)",
            "cache_hits": "Token checks answered from the cache",
            "introspections": "Introspection requests sent to Globus Auth",
            "unavailable": "Checks denied because Globus Auth could not be asked",
        }
        for key, text in help_text.items():
            yield counter(f"relayd_auth_globus_{key}", text, ["auth"], [([self.name], self.stats[key])])
        yield gauge("relayd_auth_globus_cached_tokens", "Tokens in the cache", ["auth"],
                    [([self.name], len(self.cache))])

    def challenge(self) -> str:
        scope = self.login_scope
        return 'Bearer realm="relayd"' + (f', scope="{scope}"' if scope else "")

    @property
    def login_scope(self) -> str | None:
        return self.config.login_scope or (" ".join(self.config.required_scopes) or None)

    def describe(self) -> dict[str, Any]:
        return {"method": "globus", "scope": self.login_scope,
                "audience": self.config.audience or self.config.client_id,
                "auth_base_url": self.config.auth_base_url}
