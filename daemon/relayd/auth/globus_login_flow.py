"""Globus Auth's side of ``method = "globus_login"``: the authorization code flow with PKCE and
a state bound to the browser by a signed cookie, the session cookie's signature, and the calls
to Globus Auth (token, userinfo, revocation). relayd.auth.globus_login.GlobusLogin, which keeps
the sessions, is the only class built on it."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import aiohttp

from relayd.auth.base import Identity
from relayd.auth.browser_http import BrowserAnswer, b64url, cookies, hash_session_id
from relayd.auth.browser_session import Session
from relayd.auth.globus_login_config import GlobusLoginConfig

if TYPE_CHECKING:
    from relayd.auth.browser_sessions_sqlite import SessionStore
    from relayd.state.sessions_pg import PgSessionStore

_MAX_PENDING = 10000
_PENDING_TTL = 600.0
_REACHABLE_TTL = 30.0  # a successful contact with Globus Auth is trusted this long
_UNREACHABLE_TTL = 2.0  # a failed check is believed this long


class GlobusCodeFlow:
    """The login flow of GlobusLogin, which makes these attributes in its constructor."""

    name: str
    config: GlobusLoginConfig
    log: logging.Logger
    store: SessionStore | PgSessionStore | None  # None once stopped
    http: aiohttp.ClientSession | None
    sessions: dict[str, Session]  # by SHA-256 of the session id
    pending: dict[str, tuple[str, str, str, float]]  # state -> verifier, redirect, target, at
    done: dict[str, tuple[float, BrowserAnswer]]  # state -> outcome (no cookies), for reloads
    login_cookie: str
    reachable_at: float
    unreachable_at: float
    _key: bytes

    # -- cookies -------------------------------------------------------------------------------

    def _sign(self, value: str) -> str:
        return value + "." + b64url(hmac.new(self._key, value.encode(), hashlib.sha256).digest())

    def _unsign(self, signed: str) -> str | None:
        value, _, signature = signed.rpartition(".")
        expected = b64url(hmac.new(self._key, value.encode(), hashlib.sha256).digest())
        return value if value and hmac.compare_digest(signature, expected) else None

    def _cookie(self, name: str, value: str, max_age: int) -> bytes:
        return (f"Set-Cookie: {name}={value}; Path=/; Max-Age={max_age}; HttpOnly; Secure; "
                "SameSite=Lax").encode()

    def _session_of(self, cookie_header: bytes | None) -> tuple[str, Session] | None:
        raw = cookies(cookie_header).get(self.config.cookie_name)
        if not raw:
            return None
        value = self._unsign(raw)
        if value is None:
            return None
        sid_hash = hash_session_id(value.partition(".")[0])
        session = self.sessions.get(sid_hash)
        return (sid_hash, session) if session is not None else None

    def login_link(self, target: str) -> str:
        return f"{self.config.login_path}?rd={quote(target, safe='/')}"

    async def check_reachable(self) -> bool:
        now = time.time()
        if now - self.reachable_at < _REACHABLE_TTL:
            return True
        if now - self.unreachable_at < _UNREACHABLE_TTL:
            return False  # asked a moment ago: do not make every browser wait for a timeout
        assert self.http is not None
        try:
            async with self.http.get(self.config.auth_base_url + "/.well-known/openid-configuration",
                                     timeout=aiohttp.ClientTimeout(total=min(self.config.timeout, 5.0))) as r:
                ok = r.status < 500
        except (TimeoutError, aiohttp.ClientError, OSError):
            ok = False
        if ok:
            self.reachable_at = time.time()
        else:
            self.unreachable_at = time.time()
        return ok

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
            "code_challenge": b64url(hashlib.sha256(verifier.encode()).digest()), "code_challenge_method": "S256",
        })
        return (f"{self.config.auth_base_url}/v2/oauth2/authorize?{query}",
                [self._cookie(self.login_cookie, self._sign(state), int(_PENDING_TTL))])

    async def finish_login(self, query: dict[str, str], cookie_header: bytes | None) -> tuple[int, str, list[bytes]]:
        """Handle the redirect back from Globus: (status, location or message, headers)."""
        answer = await self.finish_login_answer(query, cookie_header)
        return answer.status, answer.location or answer.message, answer.headers

    async def finish_login_answer(self, query: dict[str, str], cookie_header: bytes | None,
                                  home: str = "/") -> BrowserAnswer:
        state = query.get("state", "")
        clear = [self._cookie(self.login_cookie, "", 0)]
        done = self.done.get(state) if state else None
        if done is not None and time.time() - done[0] < _PENDING_TTL:
            # The same callback URL again (a reload, the back button): the same outcome, no 400.
            answer = done[1]
            if answer.status == 302:
                if self._session_of(cookie_header) is not None:
                    return BrowserAnswer(303, location=answer.location, headers=clear)
                return BrowserAnswer(400, "login expired; start again", clear, values={
                    "title": "This sign-in has ended",
                    "explanation": "This sign-in link was already used and its session has ended.",
                    "links": [(self.login_link(answer.location or home), "Sign in again")]})
            return BrowserAnswer(answer.status, answer.message, clear, page=answer.page, values=answer.values)
        answer = await self._finish_login(query, cookie_header, home, clear)
        if state and answer.status != 400:
            if len(self.done) >= _MAX_PENDING:
                self.done.pop(next(iter(self.done)))
            self.done[state] = (time.time(), BrowserAnswer(answer.status, answer.message, page=answer.page,
                                                            location=answer.location, values=answer.values))
        return answer

    async def _finish_login(self, query: dict[str, str], cookie_header: bytes | None, home: str,
                            clear: list[bytes]) -> BrowserAnswer:
        state, code = query.get("state", ""), query.get("code", "")
        signed = cookies(cookie_header).get(self.login_cookie, "")
        state_ok = bool(state) and self._unsign(signed) == state
        if query.get("error"):
            pending = self.pending.pop(state, None) if state_ok else None
            target = pending[2] if pending else home
            error = query.get("error_description") or query["error"]
            return BrowserAnswer(403, f"Globus login failed: {error}", clear, page="consent.html", values={
                "title": "Sign-in was not completed",
                "links": [(self.login_link(target), "Try again")]})
        if not state or not code or not state_ok:
            return BrowserAnswer(400, "login state does not match this browser; start again", clear, values={
                "title": "This sign-in link is not valid here",
                "explanation": "It was already used, has expired, or was started in another browser.",
                "links": [(self.login_link(home), "Sign in again")]})
        pending = self.pending.pop(state, None)
        if pending is None or time.time() - pending[3] > _PENDING_TTL:
            return BrowserAnswer(400, "login expired; start again", clear, values={
                "title": "This sign-in has expired",
                "explanation": "The sign-in took too long or was already completed.",
                "links": [(self.login_link(home), "Sign in again")]})
        verifier, redirect_uri, target, _ = pending
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        again = [(self.login_link(target), "Try again")]
        try:
            tokens = await self._post("/v2/oauth2/token", {
                "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": verifier})
            all_tokens = [tokens] + list(tokens.get("other_tokens") or [])
            auth_token = next((t["access_token"] for t in all_tokens
                               if t.get("resource_server") == "auth.globus.org"), None)
            if auth_token is None:
                return BrowserAnswer(403, "the login did not grant the openid scope", clear, page="consent.html",
                                     values={"links": again})
            assert self.http is not None
            async with self.http.get(self.config.auth_base_url + "/v2/oauth2/userinfo",
                                     headers={"Authorization": f"Bearer {auth_token}"}) as response:
                if response.status != 200:
                    return BrowserAnswer(503, "Globus Auth did not return the identity", clear,
                                         page="unreachable.html", values={
                                             "title": "Globus did not confirm who you are",
                                             "explanation": "Globus Auth did not answer as expected.",
                                             "links": again})
                info = await response.json()
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError, OSError):
            self.reachable_at = 0.0
            return BrowserAnswer(503, "Globus Auth is unavailable", clear, page="unreachable.html", values={
                "title": "Globus sign-in is unreachable",
                "explanation": "Globus Auth could not be reached to finish signing you in.",
                "links": again})
        self.reachable_at = time.time()
        held = [t[k] for t in all_tokens for k in ("access_token", "refresh_token") if t.get(k)]
        identity = Identity(sub=info["sub"], method=self.name, username=info.get("preferred_username"),
                            name=info.get("name"), email=info.get("email"),
                            scopes=frozenset(" ".join(t.get("scope", "") for t in all_tokens).split()))
        linked = {str(i.get("sub")) for i in info.get("identity_set") or [] if isinstance(i, dict)} | {identity.sub}
        refusal = self._refusal(identity, linked)
        if refusal:
            await self._revoke(held)
            return BrowserAnswer(403, refusal, clear, values={
                "title": "This Globus identity may not use this service",
                "explanation": f"You signed in to Globus as {identity.username or identity.sub}.",
                "links": [(self.login_link(target), "Sign in with another identity")]})
        sid = secrets.token_urlsafe(24)
        now = time.time()
        expires = now + self.config.session_lifetime
        session = Session(identity, expires, held, now, now, now)
        sid_hash = hash_session_id(sid)
        self.sessions[sid_hash] = session
        if self.store is not None:
            self.store.add(sid_hash, session)
        value = self._sign(f"{sid}.{int(expires)}")
        return BrowserAnswer(302, location=target, headers=clear + [
            self._cookie(self.config.cookie_name, value, int(self.config.session_lifetime))])

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

    async def _revoke(self, tokens: list[str]) -> list[str]:
        done = []
        for token in tokens:
            try:
                await self._post("/v2/oauth2/token/revoke", {"token": token})
                done.append(token)
            except (TimeoutError, aiohttp.ClientError, ValueError, OSError):
                self.reachable_at = 0.0
                self.log.warning("could not revoke a token at Globus Auth; will retry")
                break
        return done

    async def _post(self, path: str, form: dict[str, str]) -> dict[str, Any]:
        assert self.http is not None
        auth = aiohttp.BasicAuth(self.config.client_id, self.config.client_secret.get_secret_value())
        async with self.http.post(self.config.auth_base_url + path, data=form, auth=auth) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                raise ValueError(f"Globus Auth answered {response.status}: {body.get('error')}")
            self.reachable_at = time.time()
            return body
