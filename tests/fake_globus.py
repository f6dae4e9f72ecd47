"""A faithful local fake of Globus Auth (aiohttp on 127.0.0.1, in a background thread).

Only the parts relayd talks to, with the wire formats of the real service
(../shared/reference/http-auth-and-globus.md §3):

- ``POST /v2/oauth2/token/introspect``: HTTP Basic credentials of a registered confidential
  client (else 401 ``{"error": "invalid_client"}``); form ``token``, optional ``include``
  (``identity_set``). Unknown, revoked or expired tokens give ``{"active": false}``.
- ``GET /v2/oauth2/authorize``: the native-app/PKCE start. The fake has one logged-in user
  (``fake.login_identity``) who consents at once: 302 to ``redirect_uri?code=...&state=...``.
  The default native redirect ``/v2/web/auth-code`` is served as a page showing the code.
- ``POST /v2/oauth2/token``: ``authorization_code`` (checks client, redirect_uri and the S256
  ``code_verifier``; codes are single use), ``refresh_token``, ``client_credentials``.
  Native clients send ``client_id`` in the form, confidential ones HTTP Basic. A bad code,
  verifier, redirect_uri or refresh token gives 401 ``{"error": "invalid_grant"}`` (the status
  globus-sdk's own ``invalid_grant`` fixture uses).
- ``POST /v2/oauth2/token/revoke``: marks the token (and, for a refresh token, its access
  tokens) revoked.
- ``GET /v2/oauth2/userinfo``: OIDC userinfo for a bearer token with the ``openid`` scope.

Scopes map to resource servers as in Globus: ``https://auth.globus.org/scopes/<RS>/<suffix>``
and ``urn:globus:auth:scope:<RS>:<suffix>`` belong to ``<RS>``; ``openid``, ``profile``,
``email`` to ``auth.globus.org``. One token is issued per resource server (the first in the
response body, the others in ``other_tokens``).

Test API (fixture ``fake_globus`` in tests/conftest.py; one fake per test)::

    fake.base_url                     # "http://127.0.0.1:PORT/"  (also fake.url("/v2/..."))
    fake.client_id, fake.client_secret   # a registered confidential client (the resource server)
    fake.native_client_id             # a registered native app (for relayctl login)
    fake.add_client(client_id, secret=None)   # register another client (secret None: native)
    fake.issue_token(sub=None, username="alice@example.org", scopes=["..."], audience=None,
                     active=True, expires_in=3600, nbf=None, name=..., email=...,
                     identity_set=None, client_id=None, force_active=False) -> str
        # audience: str | list, default [fake.client_id]; force_active reports the token active
        # even after exp (to test relayd's own exp/nbf checks as if clocks disagreed)
    fake.revoke(token)
    fake.calls["introspect"]          # requests seen per endpoint (Counter)
    fake.down = True                  # every endpoint answers 503 (Globus outage)
    fake.hold()/fake.release()        # park introspection requests until released
    fake.login_identity               # dict: sub, username, name, email used by /authorize
    fake.consent_error = "access_denied"   # /authorize sends the browser back with this error
    fake.consent_description = "..."       # ... and error_description (None: consent given)
    fake.expire_access_tokens()       # make every issued access token expired now
    fake.access_token_lifetime = 30   # expires_in of tokens /token issues (default 172800)
    fake.tokens[token]                # the minted record (dict) for assertions
    fake.stop()
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import secrets
import threading
import time
import uuid
from collections import Counter
from typing import Any

from aiohttp import web

AUTH_RS = "auth.globus.org"
AUTH_SCOPES = {"openid", "profile", "email"}


def resource_server_of(scope: str) -> str:
    if scope in AUTH_SCOPES:
        return AUTH_RS
    if scope.startswith("https://auth.globus.org/scopes/"):
        return scope.removeprefix("https://auth.globus.org/scopes/").split("/", 1)[0]
    if scope.startswith("urn:globus:auth:scope:"):
        return scope.removeprefix("urn:globus:auth:scope:").split(":", 1)[0]
    raise ValueError(f"unknown scope {scope!r}")


class FakeGlobus:
    def __init__(self) -> None:
        self.client_id = str(uuid.uuid4())
        self.client_secret = secrets.token_urlsafe(24)
        self.native_client_id = str(uuid.uuid4())
        self.clients: dict[str, str | None] = {self.client_id: self.client_secret,
                                               self.native_client_id: None}
        self.tokens: dict[str, dict[str, Any]] = {}
        self.refresh_tokens: dict[str, dict[str, Any]] = {}
        self.codes: dict[str, dict[str, Any]] = {}
        self.calls: Counter[str] = Counter()
        self.down = False
        self.consent_error: str | None = None
        self.consent_description = "The user declined the consent"
        self.access_token_lifetime = 172800  # seconds, as Globus; lower it to make clients refresh
        self.login_identity = {"sub": str(uuid.uuid4()), "username": "alice@example.org",
                               "name": "Alice Example", "email": "alice@example.org"}
        self._gate = threading.Event()
        self._gate.set()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-globus", daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("fake Globus did not start")

    # -- test API ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def url(self, path: str) -> str:
        return self.base_url + path.lstrip("/")

    def add_client(self, client_id: str, secret: str | None = None) -> None:
        self.clients[client_id] = secret

    def issue_token(self, sub: str | None = None, username: str = "alice@example.org", *,
                    scopes: list[str] | tuple[str, ...] = (), audience: str | list[str] | None = None,
                    active: bool = True, expires_in: float = 3600, nbf: float | None = None,
                    name: str | None = "Alice Example", email: str | None = "alice@example.org",
                    identity_set: list[str] | None = None, client_id: str | None = None,
                    force_active: bool = False) -> str:
        now = time.time()
        sub = sub or str(uuid.uuid4())
        aud = [audience] if isinstance(audience, str) else list(audience or [self.client_id])
        token = "Ag" + secrets.token_urlsafe(48)
        with self._lock:
            self.tokens[token] = {
                "active": active, "revoked": False, "force_active": force_active,
                "scope": " ".join(scopes), "client_id": client_id or self.native_client_id,
                "sub": sub, "username": username, "name": name, "email": email,
                "exp": int(now + expires_in), "iat": int(now), "nbf": int(nbf if nbf is not None else now),
                "aud": aud, "identity_set": identity_set or [sub], "refresh": None,
            }
        return token

    def revoke(self, token: str) -> None:
        with self._lock:
            self._revoke(token)

    def expire_access_tokens(self) -> None:
        with self._lock:
            for record in self.tokens.values():
                record["exp"] = int(time.time()) - 10

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def stop(self) -> None:
        self._gate.set()
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- server --------------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/v2/oauth2/token/introspect", self._introspect)
        app.router.add_get("/v2/oauth2/authorize", self._authorize)
        app.router.add_get("/v2/web/auth-code", self._auth_code_page)
        app.router.add_post("/v2/oauth2/token", self._token)
        app.router.add_post("/v2/oauth2/token/revoke", self._revoke_endpoint)
        app.router.add_get("/v2/oauth2/userinfo", self._userinfo)
        app.router.add_post("/v2/oauth2/userinfo", self._userinfo)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        name = request.path.rstrip("/").rsplit("/", 1)[-1]
        self.calls[name] += 1
        if self.down:
            return web.json_response({"error": "service_unavailable"}, status=503)
        return await handler(request)

    def _client_auth(self, request: web.Request, form: Any) -> str | None:
        """The authenticated client id: Basic for confidential clients, form for native ones."""
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                cid, _, secret = base64.b64decode(header[6:], validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            expected = self.clients.get(cid)
            if expected is not None and secrets.compare_digest(expected, secret):
                return cid
            return None
        cid = form.get("client_id")
        if cid in self.clients and self.clients[cid] is None:
            return cid
        return None

    @staticmethod
    def _error(status: int, error: str, description: str = "") -> web.Response:
        return web.json_response({"error": error, "error_description": description or error}, status=status)

    async def _introspect(self, request: web.Request) -> web.Response:
        form = await request.post()
        if not request.headers.get("Authorization", "").startswith("Basic ") \
                or self._client_auth(request, form) is None:
            return self._error(401, "invalid_client")
        if not self._gate.is_set():
            await asyncio.to_thread(self._gate.wait)
        token = form.get("token")
        if not isinstance(token, str) or not token:
            return self._error(400, "invalid_request", "token is required")
        with self._lock:
            record = self.tokens.get(token)
            if record is None or not self._is_active(record):
                return web.json_response({"active": False})
            body = {k: record[k] for k in ("scope", "client_id", "sub", "username", "name", "email",
                                           "exp", "iat", "nbf", "aud")}
            body.update(active=True, token_type="Bearer", iss="https://auth.globus.org",
                        dependent_tokens_cache_id=hashlib.sha256(token.encode()).hexdigest()[:32])
            if "identity_set" in str(form.get("include", "")).split(","):
                body["identity_set"] = list(record["identity_set"])
        return web.json_response(body)

    def _is_active(self, record: dict[str, Any]) -> bool:
        if not record["active"] or record["revoked"]:
            return False
        return record["force_active"] or record["exp"] > time.time()

    async def _authorize(self, request: web.Request) -> web.Response:
        q = request.query
        client_id = q.get("client_id", "")
        if client_id not in self.clients:
            return web.Response(status=400, text="unknown client_id")
        if q.get("response_type") != "code" or not q.get("redirect_uri") or not q.get("scope"):
            return web.Response(status=400, text="response_type=code, redirect_uri and scope are required")
        challenge, method = q.get("code_challenge"), q.get("code_challenge_method")
        if self.clients[client_id] is None and (not challenge or method != "S256"):
            return web.Response(status=400, text="native apps must use PKCE with S256")
        try:
            scopes = q["scope"].split()
            [resource_server_of(s) for s in scopes]
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        if self.consent_error:
            from urllib.parse import urlencode

            sep = "&" if "?" in q["redirect_uri"] else "?"
            query = urlencode({"error": self.consent_error, "error_description": self.consent_description,
                               "state": q.get("state", "")})
            raise web.HTTPFound(f"{q['redirect_uri']}{sep}{query}")
        code = secrets.token_urlsafe(24)
        with self._lock:
            self.codes[code] = {"client_id": client_id, "redirect_uri": q["redirect_uri"],
                                "challenge": challenge, "scopes": scopes,
                                "offline": q.get("access_type") == "offline",
                                "identity": dict(self.login_identity)}
        sep = "&" if "?" in q["redirect_uri"] else "?"
        state = q.get("state", "")
        raise web.HTTPFound(f"{q['redirect_uri']}{sep}code={code}&state={state}")

    async def _auth_code_page(self, request: web.Request) -> web.Response:
        code = request.query.get("code", "")
        return web.Response(content_type="text/html",
                            text=f"<html><body><p>Native App Authorization Code</p><code>{code}</code></body></html>")

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        client_id = self._client_auth(request, form)
        if client_id is None:
            return self._error(401, "invalid_client")
        grant = form.get("grant_type")
        with self._lock:
            if grant == "authorization_code":
                code = self.codes.pop(str(form.get("code", "")), None)
                if code is None or code["client_id"] != client_id:
                    return self._error(401, "invalid_grant", "unknown or used code")
                if form.get("redirect_uri") != code["redirect_uri"]:
                    return self._error(401, "invalid_grant", "redirect_uri mismatch")
                if code["challenge"] is not None:
                    verifier = str(form.get("code_verifier", ""))
                    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
                    if not secrets.compare_digest(digest.rstrip(b"=").decode(), code["challenge"]):
                        return self._error(401, "invalid_grant", "code_verifier does not match")
                return web.json_response(self._grant(client_id, code["identity"], code["scopes"],
                                                     code["offline"]))
            if grant == "refresh_token":
                refresh = self.refresh_tokens.get(str(form.get("refresh_token", "")))
                if refresh is None or refresh["revoked"] or refresh["client_id"] != client_id:
                    return self._error(401, "invalid_grant", "unknown or revoked refresh token")
                body = self._grant(client_id, refresh["identity"], refresh["scopes"], False)
                body["refresh_token"] = form["refresh_token"]
                for token in self._new_access_tokens(body):
                    self.tokens[token]["refresh"] = form["refresh_token"]
                return web.json_response(body)
            if grant == "client_credentials" and self.clients.get(client_id):
                identity = {"sub": client_id, "username": f"{client_id}@clients.auth.globus.org",
                            "name": None, "email": None}
                return web.json_response(self._grant(client_id, identity, str(form.get("scope", "")).split(),
                                                     False))
        return self._error(400, "unsupported_grant_type")

    @staticmethod
    def _new_access_tokens(body: dict[str, Any]) -> list[str]:
        return [body["access_token"]] + [t["access_token"] for t in body["other_tokens"]]

    def _grant(self, client_id: str, identity: dict[str, Any], scopes: list[str], offline: bool) -> dict:
        by_rs: dict[str, list[str]] = {}
        for scope in scopes:
            by_rs.setdefault(resource_server_of(scope), []).append(scope)
        responses = []
        now = time.time()
        for rs, rs_scopes in by_rs.items():
            token = "Ag" + secrets.token_urlsafe(48)
            self.tokens[token] = {
                "active": True, "revoked": False, "force_active": False, "scope": " ".join(rs_scopes),
                "client_id": client_id, "sub": identity["sub"], "username": identity["username"],
                "name": identity["name"], "email": identity["email"], "exp": int(now + self.access_token_lifetime),
                "iat": int(now), "nbf": int(now), "aud": [rs] if rs == AUTH_RS else [rs, AUTH_RS],
                "identity_set": [identity["sub"]], "refresh": None,
            }
            item = {"access_token": token, "expires_in": self.access_token_lifetime, "resource_server": rs,
                    "scope": " ".join(rs_scopes), "token_type": "Bearer", "state": "_default"}
            if offline:
                refresh = "Ar" + secrets.token_urlsafe(48)
                self.refresh_tokens[refresh] = {"client_id": client_id, "identity": identity,
                                                "scopes": rs_scopes, "revoked": False}
                self.tokens[token]["refresh"] = refresh
                item["refresh_token"] = refresh
            responses.append(item)
        first, *others = responses
        return {**first, "other_tokens": others}

    def _revoke(self, token: str) -> None:
        if token in self.tokens:
            self.tokens[token]["revoked"] = True
        if token in self.refresh_tokens:
            self.refresh_tokens[token]["revoked"] = True
            for record in self.tokens.values():
                if record["refresh"] == token:
                    record["revoked"] = True

    async def _revoke_endpoint(self, request: web.Request) -> web.Response:
        form = await request.post()
        if self._client_auth(request, form) is None:
            return self._error(401, "invalid_client")
        with self._lock:
            self._revoke(str(form.get("token", "")))
        return web.json_response({"active": False})

    async def _userinfo(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        with self._lock:
            record = self.tokens.get(token)
            if record is None or not self._is_active(record) or "openid" not in record["scope"].split():
                return self._error(401, "invalid_token")
            body = {"sub": record["sub"], "preferred_username": record["username"],
                    "identity_set": [{"sub": s} for s in record["identity_set"]],
                    "identity_provider": str(uuid.uuid5(uuid.NAMESPACE_DNS, record["username"].split("@")[-1]))}
            if "profile" in record["scope"].split():
                body["name"] = record["name"]
            if "email" in record["scope"].split():
                body["email"] = record["email"]
        return web.json_response(body)
