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
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
from pydantic import Field, model_validator

from relayd import state
from relayd.auth.base import AuthConfig, AuthError, AuthFailure, AuthMethod, Identity
from relayd.auth.browser_session import Session, session_from_row, session_row
from relayd.auth.globus import AuthBaseUrl, _default_base_url
from relayd.config.types import Seconds, Secret

_MAX_PENDING = 10000
_PENDING_TTL = 600.0
_SEEN_EVERY = 60.0  # last-seen times are written at most this often per session
_REACHABLE_TTL = 30.0  # a successful contact with Globus Auth is trusted this long
_UNREACHABLE_TTL = 2.0  # a failed check is believed this long


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


@dataclass
class BrowserAnswer:
    """What a browser step answers: a redirect, or a message (JSON) with its page (HTML)."""

    status: int
    message: str = ""
    headers: list[bytes] = field(default_factory=list)
    location: str | None = None
    page: str = "error.html"
    values: dict[str, Any] = field(default_factory=dict)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hash(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def cookies(header: bytes | str | None) -> dict[str, str]:
    if not header:
        return {}
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    out: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out.setdefault(name, value)
    return out


def safe_return(rd: str | None, scheme: str, host: str) -> str | None:
    """``rd`` as a path on this origin, or None: never a redirect to anywhere else."""
    if not rd or len(rd) > 2048 or any(c in rd for c in "\\\r\n\t\0") or any(ord(c) < 32 or ord(c) == 127 for c in rd):
        return None
    if rd.startswith("/"):
        if rd.startswith("//"):
            return None  # a network-path reference: another host
        return rd
    try:
        parts = urlsplit(rd)
    except ValueError:
        return None
    if parts.scheme.lower() != scheme or parts.netloc.lower() != host.lower() or parts.username or parts.password:
        return None
    path = parts.path or "/"
    if path.startswith("//"):
        return None
    return path + ("?" + parts.query if parts.query else "")


class SessionStore:
    """Browser sessions and pending token revocations in SQLite (only hashes of session ids)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self.conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS sessions (
                sid_hash TEXT PRIMARY KEY, identity TEXT NOT NULL, tokens TEXT NOT NULL,
                created REAL NOT NULL, last_seen REAL NOT NULL, expires REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS revocations (
                token TEXT PRIMARY KEY, added REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0);
        """)

    def key(self) -> bytes:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'cookie_key'").fetchone()
        if row:
            return bytes.fromhex(row[0])
        key = secrets.token_bytes(32)
        self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('cookie_key', ?)", (key.hex(),))
        return bytes.fromhex(self.conn.execute("SELECT value FROM meta WHERE key = 'cookie_key'").fetchone()[0])

    def load(self, method: str) -> dict[str, Session]:
        return {row[0]: session_from_row(method, row) for row in self.conn.execute(
            "SELECT sid_hash, identity, tokens, created, last_seen, expires FROM sessions")}

    def add(self, sid_hash: str, session: Session) -> None:
        self.conn.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?)", session_row(sid_hash, session))

    def seen(self, sid_hash: str, when: float) -> None:
        self.conn.execute("UPDATE sessions SET last_seen = ? WHERE sid_hash = ?", (when, sid_hash))

    def end(self, sid_hashes: list[str], tokens: list[str]) -> None:
        """Delete sessions and queue their tokens for revocation, in one transaction."""
        now = time.time()
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany("DELETE FROM sessions WHERE sid_hash = ?", [(h,) for h in sid_hashes])
            self.conn.executemany("INSERT OR IGNORE INTO revocations (token, added) VALUES (?, ?)",
                                  [(t, now) for t in tokens])

    def pending_revocations(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT token FROM revocations ORDER BY added")]

    def revoked(self, tokens: list[str]) -> None:
        self.conn.executemany("DELETE FROM revocations WHERE token = ?", [(t,) for t in tokens])

    def failed(self, tokens: list[str]) -> None:
        self.conn.executemany("UPDATE revocations SET attempts = attempts + 1 WHERE token = ?",
                              [(t,) for t in tokens])

    def close(self) -> None:
        self.conn.close()


def default_sessions_db(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / f"browser-sessions-{name}.sqlite3"


class GlobusLogin(AuthMethod):
    Config = GlobusLoginConfig
    config: GlobusLoginConfig
    browser = True  # the http_proxy drives the login flow for this method

    def __init__(self, name: str, config: GlobusLoginConfig, context: Any) -> None:
        super().__init__(name, config, context)
        self.db_path = config.sessions_db or default_sessions_db(context.state_dir, name)
        self.store: SessionStore | None = None
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
        store: Any
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
        store = self.store
        if store is None:
            return
        rows = await asyncio.to_thread(store.rows)  # type: ignore[attr-defined]
        current = {row[0]: row for row in rows}
        unwritten = set(getattr(store, "unwritten", ()))
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

    def _session_of(self, cookie_header: bytes | None) -> tuple[str, Session] | None:
        raw = cookies(cookie_header).get(self.config.cookie_name)
        if not raw:
            return None
        value = self._unsign(raw)
        if value is None:
            return None
        sid_hash = _hash(value.partition(".")[0])
        session = self.sessions.get(sid_hash)
        return (sid_hash, session) if session is not None else None

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

    def login_link(self, target: str) -> str:
        return f"{self.config.login_path}?rd={quote(target, safe='/')}"

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
            "code_challenge": _b64(hashlib.sha256(verifier.encode()).digest()), "code_challenge_method": "S256",
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
        sid_hash = _hash(sid)
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

    async def _post(self, path: str, form: dict[str, str]) -> dict[str, Any]:
        assert self.http is not None
        auth = aiohttp.BasicAuth(self.config.client_id, self.config.client_secret.get_secret_value())
        async with self.http.post(self.config.auth_base_url + path, data=form, auth=auth) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                raise ValueError(f"Globus Auth answered {response.status}: {body.get('error')}")
            self.reachable_at = time.time()
            return body
