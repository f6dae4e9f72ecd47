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
Secure, SameSite=Lax): an opaque id naming a server-side session that holds the identity and the
tokens. Sessions are kept in SQLite (``sessions_db``, default
``<state_dir>/browser-sessions-<NAME>.sqlite3``, mode 0600, only the SHA-256 of session ids) so a
restart keeps users signed in; they end after ``session_lifetime``, after ``session_idle`` without
a request, on ``logout_path`` or ``relayctl logout-user``. Their Globus tokens are then revoked;
while Globus Auth is unreachable the revocations wait in the database and are retried in the
background every ``revoke_retry`` seconds (also across restarts).

A GET of ``login_path`` without ``code`` starts a login (``?rd=/path`` is where to go after it);
``logout_path?rd=/path`` returns there after sign-out. ``rd`` must stay on the service's own
origin (a path, or an absolute URL of this very scheme and host): anything else is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import sqlite3
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import aiohttp

from relayd import state
from relayd.auth.base import AuthError, AuthFailure, AuthMethod, Identity
from relayd.auth.browser_http import BrowserAnswer, cookies, safe_return
from relayd.auth.browser_session import Session, session_from_row
from relayd.auth.browser_sessions_sqlite import SessionStore, default_sessions_db
from relayd.auth.globus_login_config import GlobusLoginConfig
from relayd.auth.globus_login_flow import GlobusCodeFlow

# Their modules are where these live; they are imported from here by older code and plugins.
__all__ = ["BrowserAnswer", "GlobusLogin", "GlobusLoginConfig", "SessionStore", "cookies",
           "default_sessions_db", "safe_return"]

if TYPE_CHECKING:
    from relayd.state.sessions_pg import PgSessionStore

_SEEN_EVERY = 60.0  # last-seen times are written at most this often per session


class GlobusLogin(GlobusCodeFlow, AuthMethod):
    Config = GlobusLoginConfig
    config: GlobusLoginConfig
    browser = True  # the http_proxy drives the login flow for this method

    def __init__(self, name: str, config: GlobusLoginConfig, context: Any) -> None:
        super().__init__(name, config, context)
        self.db_path = config.sessions_db or default_sessions_db(context.state_dir, name)
        self.store: SessionStore | PgSessionStore | None = None
        secret = config.session_secret.get_secret_value().encode() if config.session_secret else None
        self._key = hashlib.sha256(b"relayd session\0" + secret).digest() if secret else secrets.token_bytes(32)
        self.sessions: dict[str, Session] = {}  # by SHA-256 of the session id
        self.pending: dict[str, tuple[str, str, str, float]] = {}  # state -> verifier, redirect, target, at
        self.done: dict[str, tuple[float, BrowserAnswer]] = {}  # state -> outcome (no cookies), for reloads
        self.http: aiohttp.ClientSession | None = None
        self.login_cookie = config.cookie_name + "_login"
        self.reachable_at = 0.0  # when Globus Auth last answered
        self.unreachable_at = 0.0  # when a check last found it unreachable
        self.revocations_pending = 0
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._watcher: Any = None

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout))
        url = state.postgres_url(self.context)
        store: SessionStore | PgSessionStore
        if url is None:
            store = SessionStore(self.db_path)
        else:  # [state] url: sessions shared by every node (relayd.state.sessions_pg)
            from relayd.state.sessions_pg import PgSessionStore

            store = await asyncio.to_thread(PgSessionStore, url, self.name, state.health(self.context, url))
        self.store = store
        if not self.config.session_secret:
            self._key = await asyncio.to_thread(store.key)
        self.sessions = await asyncio.to_thread(store.load, self.name)
        self.revocations_pending = len(await asyncio.to_thread(store.pending_revocations))
        self._worker = asyncio.get_running_loop().create_task(self._background())
        if url is not None:
            from relayd.state.pg import Watcher, schema_name

            self._watcher = Watcher(url, schema_name("globus_login", self.name), self._resync,
                                    state.health(self.context, url))
            self._watcher.start()

    async def _resync(self) -> None:
        """PostgreSQL: take the sessions other nodes made, drop those ended anywhere."""
        from relayd.state.sessions_pg import PgSessionStore  # only with [state] url, as its watcher

        store = self.store
        if not isinstance(store, PgSessionStore):
            return
        rows = await asyncio.to_thread(store.rows)
        current = {row[0]: row for row in rows}
        unwritten = set(store.unwritten)
        for sid_hash in [h for h in self.sessions if h not in current and h not in unwritten]:
            del self.sessions[sid_hash]  # ended on another node (its tokens are queued there)
        for sid_hash, row in current.items():
            mine = self.sessions.get(sid_hash)
            if mine is None:
                self.sessions[sid_hash] = session_from_row(self.name, row)
            elif row[4] > mine.last_seen:
                mine.last_seen = row[4]

    async def stop(self, drain_timeout: float = 0.0) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
        if self._worker:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        if self.http:
            await self.http.close()
        if self.store:
            # Connections of a replaced generation may still ask about sessions while they
            # drain: they see the memory copy, and nothing is written to a closed database.
            store, self.store = self.store, None
            await asyncio.to_thread(store.close)

    async def authenticate(self, authorization: str | None) -> Identity:
        raise AuthError(AuthFailure.MISSING, "log in with a web browser (Globus login)")

    def challenge(self) -> str | None:
        # The "Cookie" scheme of draft-broyer-http-cookie-auth: sign in at a page, get a cookie.
        return (f'Cookie realm="relayd", form-action="{self.config.login_path}", '
                f'cookie-name="{self.config.cookie_name}"')

    def describe(self) -> dict[str, Any]:
        return {"method": "globus_login", "client_id": self.config.client_id, "scopes": self.config.scopes,
                "login_path": self.config.login_path, "logout_path": self.config.logout_path,
                "auth_base_url": self.config.auth_base_url}

    def session_identity(self, cookie_header: bytes | None) -> Identity | None:
        """The identity of a valid session cookie, else None (cheap: HMAC + dict lookup)."""
        found = self._session_of(cookie_header)
        if found is None:
            return None
        sid_hash, session = found
        now = time.time()
        idle = self.config.session_idle
        if session.expires < now or (idle and now - session.last_seen > idle):
            self._end([sid_hash])
            return None
        session.last_seen = now
        if now - session.written_seen > _SEEN_EVERY and self.store is not None:
            session.written_seen = now
            self.store.seen(sid_hash, now)
        return session.identity

    def _end(self, sid_hashes: list[str]) -> list[str]:
        """End sessions now; their tokens are revoked by the background worker (or the caller)."""
        tokens: list[str] = []
        ended = []
        for sid_hash in sid_hashes:
            session = self.sessions.pop(sid_hash, None)
            if session is not None:
                tokens += session.tokens
                ended.append(sid_hash)
        if ended and self.store is not None:
            self.store.end(ended, tokens)
            self.revocations_pending += len(tokens)
            self._wake.set()
        return tokens

    # -- browser steps (the http_proxy calls these for login_path / logout_path) -----------------

    def return_to(self, rd: str | None, scheme: str, host: str) -> str | None:
        return safe_return(rd, scheme, host)

    async def browser_step(self, path: str, query: dict[str, str], cookie_header: bytes | None,
                           scheme: str, host: str, target: str, home: str = "/") -> BrowserAnswer:
        """One step for a browser; ``home`` is where to go when nothing better is known (the page
        the browser came from on this origin, else the first service using this method)."""
        if path == self.config.logout_path:
            return await self.logout_answer(query, cookie_header, scheme, host, home)
        if path == self.config.login_path and not any(k in query for k in ("code", "state", "error")):
            target = self.return_to(query.get("rd"), scheme, host) or home
        elif path == self.config.login_path:
            return await self.finish_login_answer(query, cookie_header, home)
        # A page of a service, by a browser without a session: to Globus, if it can be reached.
        if not await self.check_reachable():
            return BrowserAnswer(503, "Globus Auth is unavailable", page="unreachable.html", values={
                "title": "Globus sign-in is unreachable",
                "explanation": "This service signs you in with Globus, but Globus Auth cannot be reached "
                               "from here right now, so you cannot sign in.",
                "links": [(target, "Try again")]})
        location, headers = self.start_login(scheme, host, target)
        return BrowserAnswer(302, location=location, headers=headers)

    async def logout(self, cookie_header: bytes | None) -> list[bytes]:
        found = self._session_of(cookie_header)
        if found is not None:
            tokens = self._end([found[0]])
            await self._revoke_queued(tokens)
        return [self._cookie(self.config.cookie_name, "", 0)]

    async def logout_answer(self, query: dict[str, str], cookie_header: bytes | None, scheme: str,
                            host: str, home: str = "/") -> BrowserAnswer:
        found = self._session_of(cookie_header)
        username = found[1].identity.username or found[1].identity.sub if found else ""
        revoked = True
        if found is not None:
            tokens = self._end([found[0]])
            revoked = await self._revoke_queued(tokens)
        headers = [self._cookie(self.config.cookie_name, "", 0)]
        rd = self.return_to(query.get("rd"), scheme, host)
        if rd and revoked:
            return BrowserAnswer(303, headers=headers, location=rd)
        links = [(rd, "Continue")] if rd else []
        links.append((self.login_link(rd or home), "Sign in again"))
        links.append((f"{self.config.auth_base_url}/v2/web/logout?"
                      + urlencode({"client": self.config.client_id}), "Sign out at Globus"))
        return BrowserAnswer(200, "logged out", headers, page="signed_out.html", values={
            "title": "You are signed out" if revoked else "Signed out here; Globus tokens not yet revoked",
            "revoked": revoked, "username": username, "links": links, "return_to": rd})

    def end_sessions_of(self, identity: str) -> int:
        """End every session of an identity (id or username): ``relayctl logout-user``."""
        ended = [h for h, s in self.sessions.items() if identity in (s.identity.sub, s.identity.username)]
        self._end(ended)
        return len(ended)

    def list_sessions(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for session in self.sessions.values():
            idle = self.config.session_idle
            ends = min(session.expires, session.last_seen + idle) if idle else session.expires
            if ends < now:
                continue
            out.append({"sub": session.identity.sub, "username": session.identity.username,
                        "created": session.created, "last_seen": session.last_seen,
                        "expires": session.expires, "idle_expires": session.last_seen + idle if idle else None})
        return sorted(out, key=lambda s: s["created"])

    # -- revocation ------------------------------------------------------------------------------

    async def _revoke_queued(self, tokens: list[str]) -> bool:
        """Revoke queued tokens now; True when all are revoked (else the worker retries)."""
        done = await self._revoke(tokens)
        if self.store is not None:
            self.store.revoked(done)
            self.revocations_pending = max(0, self.revocations_pending - len(done))
        return len(done) == len(tokens)

    async def _background(self) -> None:
        """Expire sessions and retry pending revocations."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(self.config.revoke_retry, 30.0))
            self._wake.clear()
            try:
                self._sweep()
                assert self.store is not None
                pending = await asyncio.to_thread(self.store.pending_revocations)
                if pending:
                    done = await self._revoke(pending)
                    self.store.revoked(done)
                    self.store.failed(pending[len(done):len(done) + 1])
                    self.revocations_pending = len(pending) - len(done)
                    if done and len(done) < len(pending):
                        self._wake.set()  # Globus answers again: the rest right away
            except (sqlite3.Error, OSError):
                self.log.exception("browser sessions: background work failed")

    def _sweep(self) -> None:
        now = time.time()
        idle = self.config.session_idle
        ended = [h for h, s in self.sessions.items() if s.expires < now or (idle and now - s.last_seen > idle)]
        if ended:
            self._end(ended)
