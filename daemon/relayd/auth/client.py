"""Client side of Globus auth: login (native app + PKCE), stored tokens, refresh, logout.

Used by ``relayctl login|check-auth|logout`` and by every client command that talks to a
Globus-protected relayd. **Other commands get a token like this**::

    from relayd.auth.client import NeedLogin, authorization_for_server

    try:
        header = authorization_for_server("s2cs.example.org:5000")   # "Bearer <token>"
    except NeedLogin as exc:           # says exactly which scope to log in to
        return die(str(exc))

``token_for_server(server, scope=None)`` returns the bare token (SciStream's gRPC metadata
carries it without "Bearer "). The scope comes from ``scope=`` if given, else from the scope
maps in the client file, else from the server's discovery document (``GET
/.well-known/relayd``); expired access tokens are refreshed with the stored refresh token.

Files (``$XDG_CONFIG_HOME`` defaults to ``~/.config``):

- ``$XDG_CONFIG_HOME/relayd/client.toml`` (or ``$RELAYCTL_CLIENT_CONFIG``)::

      [globus]
      client_id = "<native app client id>"     # or $RELAYD_GLOBUS_CLIENT_ID
      # auth_base_url = "https://auth.globus.org"  (or globus-sdk's $GLOBUS_SDK_SERVICE_URL_AUTH)
      [scope_maps.sites.servers]                 # same syntax as relayd.toml
      "s2cs.example.org:5000" = "https://auth.globus.org/scopes/<id>/scistream"

- ``$XDG_CONFIG_HOME/relayd/tokens.json``: globus-sdk ``JSONTokenStorage`` (mode 0600, directory
  0700), one entry per resource server, with refresh tokens; ``identity_id`` comes from the OIDC
  userinfo endpoint at login, and ``identities.json`` (0600) beside it keeps that identity's
  username, name and email for ``check-auth``.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import globus_sdk
from globus_sdk.token_storage import JSONTokenStorage, TokenStorageData
from globus_sdk.transport import RetryConfig

from relayd.auth import discovery, scopes
from relayd.config.model import ScopeMapConfig

IDENTITY_SCOPES = ["openid", "profile", "email"]
AUTH_RS = "auth.globus.org"
REFRESH_MARGIN = 60.0  # refresh a token that expires within this many seconds


class NeedLogin(Exception):
    """No usable token; ``str()`` names the scope and the command to run."""


class ClientConfigError(Exception):
    pass


def config_home() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "relayd"


@dataclass
class ClientSettings:
    client_id: str | None = None
    auth_base_url: str | None = None
    scope_maps: dict[str, ScopeMapConfig] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, path: Path | None = None) -> ClientSettings:
        path = path or Path(os.environ.get("RELAYCTL_CLIENT_CONFIG") or config_home() / "client.toml")
        data: dict[str, Any] = {}
        if path.exists():
            try:
                data = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ClientConfigError(f"{path}: {exc}") from None
        globus = data.get("globus", {})
        try:
            maps = {name: ScopeMapConfig(**table) for name, table in data.get("scope_maps", {}).items()}
        except (TypeError, ValueError) as exc:
            raise ClientConfigError(f"{path}: scope_maps: {exc}") from None
        return cls(
            client_id=os.environ.get("RELAYD_GLOBUS_CLIENT_ID") or globus.get("client_id"),
            auth_base_url=globus.get("auth_base_url") or None,
            scope_maps=maps,
            path=path,
        )

    def native_client(self) -> globus_sdk.NativeAppAuthClient:
        if not self.client_id:
            raise ClientConfigError(
                f"no Globus native app client id: set [globus] client_id in {self.path} "
                "or $RELAYD_GLOBUS_CLIENT_ID (register a 'thick client' app at app.globus.org)")
        # base_url None lets globus-sdk apply $GLOBUS_SDK_SERVICE_URL_AUTH / $GLOBUS_SDK_ENVIRONMENT.
        return globus_sdk.NativeAppAuthClient(
            self.client_id, base_url=self.auth_base_url,
            retry_config=RetryConfig(max_retries=1))

    def auth_client(self, access_token: str) -> globus_sdk.AuthClient:
        return globus_sdk.AuthClient(base_url=self.auth_base_url,
                                     authorizer=globus_sdk.AccessTokenAuthorizer(access_token),
                                     retry_config=RetryConfig(max_retries=1))


class TokenStore:
    """globus-sdk JSONTokenStorage, kept private to the user (0700 directory, 0600 file)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or Path(os.environ.get("RELAYCTL_TOKEN_FILE") or config_home() / "tokens.json")
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.storage = JSONTokenStorage(self.path)

    @property
    def identities_path(self) -> Path:
        return self.path.with_name("identities.json")

    def identities(self) -> dict[str, dict[str, Any]]:
        """identity id -> username/name/email (globus-sdk's JSON storage drops ``extra``)."""
        try:
            return json.loads(self.identities_path.read_text())
        except (OSError, ValueError):
            return {}

    def remember_identity(self, identity: dict[str, Any]) -> None:
        if not identity.get("sub"):
            return
        known = self.identities()
        known[identity["sub"]] = {k: identity.get(k) for k in ("username", "name", "email")}
        fd = os.open(self.identities_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(known, fh)

    def all(self) -> dict[str, TokenStorageData]:
        if not self.path.exists():
            return {}
        return dict(self.storage.get_token_data_by_resource_server())

    def put(self, entries: dict[str, TokenStorageData]) -> None:
        with self.storage.user_only_umask():
            self.storage.store_token_data_by_resource_server(entries)
        os.chmod(self.path, stat.S_IRUSR | stat.S_IWUSR)

    def remove(self, resource_server: str) -> None:
        self.storage.remove_token_data(resource_server)
        if self.path.exists():
            os.chmod(self.path, stat.S_IRUSR | stat.S_IWUSR)
        if not self.all():
            self.identities_path.unlink(missing_ok=True)

    def for_scope(self, scope: str) -> TokenStorageData | None:
        for data in self.all().values():
            if scope in data.scope.split():
                return data
        return None


def login(settings: ClientSettings, store: TokenStore, wanted: list[str], *,
          open_browser: bool = False, read_code: Callable[[str], str] = input,
          out: Any = sys.stdout) -> dict[str, TokenStorageData]:
    """The native-app flow with PKCE (globus-sdk makes the verifier and S256 challenge)."""
    client = settings.native_client()
    requested = list(dict.fromkeys([*wanted, *IDENTITY_SCOPES]))
    client.oauth2_start_flow(requested_scopes=requested, refresh_tokens=True)
    url = client.oauth2_get_authorize_url()
    print("Log in to Globus at this URL, then paste the authorization code shown:", file=out)
    print(url, file=out, flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    code = read_code("Authorization code: ").strip()
    if not code:
        raise NeedLogin("no authorization code given")
    response = client.oauth2_exchange_code_for_tokens(code)
    by_rs = response.by_resource_server
    identity: dict[str, Any] = {}
    if AUTH_RS in by_rs:
        info = settings.auth_client(by_rs[AUTH_RS]["access_token"]).userinfo()
        identity = {"sub": info.get("sub"), "username": info.get("preferred_username"),
                    "name": info.get("name"), "email": info.get("email")}
    entries = {rs: _storage_data(tok, identity) for rs, tok in by_rs.items()}
    store.put(entries)
    store.remember_identity(identity)
    return entries


def _storage_data(tok: dict[str, Any], identity: dict[str, Any]) -> TokenStorageData:
    return TokenStorageData(
        resource_server=tok["resource_server"], identity_id=identity.get("sub"), scope=tok["scope"],
        access_token=tok["access_token"], refresh_token=tok.get("refresh_token"),
        expires_at_seconds=tok["expires_at_seconds"], token_type=tok.get("token_type"),
    )


def fresh(settings: ClientSettings, store: TokenStore, data: TokenStorageData,
          login_hint: str) -> tuple[TokenStorageData, bool]:
    """The entry itself, or a refreshed copy if it (nearly) expired; (data, refreshed)."""
    if data.expires_at_seconds > time.time() + REFRESH_MARGIN:
        return data, False
    if not data.refresh_token:
        raise NeedLogin(f"the token for {login_hint} has expired and has no refresh token: "
                        f"run `relayctl login {login_hint}`")
    try:
        response = settings.native_client().oauth2_refresh_token(data.refresh_token)
    except globus_sdk.AuthAPIError as exc:
        raise NeedLogin(f"refreshing the token for {login_hint} failed ({exc.http_status} {exc.code}): "
                        f"run `relayctl login {login_hint}`") from None
    tok = dict(response.by_resource_server[data.resource_server])
    tok["refresh_token"] = tok.get("refresh_token") or data.refresh_token  # Globus keeps it valid
    new = _storage_data(tok, {"sub": data.identity_id})
    store.put({data.resource_server: new})
    return new, True


def token_for_scope(scope: str, *, settings: ClientSettings | None = None,
                    store: TokenStore | None = None) -> str:
    settings = settings or ClientSettings.load()
    store = store or TokenStore()
    data = store.for_scope(scope)
    if data is None:
        raise NeedLogin(f"not logged in for scope {scope}: run `relayctl login --scope {scope}`")
    return fresh(settings, store, data, f"--scope {scope}")[0].access_token


def scope_for_server(server: str, settings: ClientSettings, *, cafile: str | None = None,
                     timeout: float = 10.0) -> str:
    """Scope maps first (they override discovery), then the server's discovery document."""
    try:
        return scopes.lookup(settings.scope_maps, server,
                             where=f"[scope_maps.NAME.servers] in {settings.path}")
    except scopes.UnmappedServer as unmapped:
        try:
            found = discover(server, cafile=cafile, timeout=timeout)
        except OSError as exc:
            raise scopes.UnmappedServer(unmapped.address, f"[scope_maps.NAME.servers] in {settings.path}; "
                                        f"the server's discovery document was not available: {exc}") from None
        if not found:
            raise NeedLogin(f"server {unmapped.address} does not use Globus auth "
                            "(its discovery document lists no Globus scope)") from None
        return found[0]


def discover(server: str, *, cafile: str | None = None, timeout: float = 10.0) -> list[str]:
    """Globus scopes from GET <server>/.well-known/relayd (https unless the server says http://)."""
    base = server if "://" in server else f"https://{server}"
    base = base.replace("wss://", "https://").replace("ws://", "http://")
    scheme, _, rest = base.partition("://")
    url = f"{scheme}://{rest.split('/', 1)[0]}{discovery.PATH}"
    context = None
    if scheme == "https":
        import ssl

        context = ssl.create_default_context(cafile=cafile)
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310 - the operator names the server
            doc = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise OSError(f"{url}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise OSError(f"{url}: {exc.reason}") from None
    except ValueError:
        raise OSError(f"{url}: not JSON") from None
    try:
        return discovery.globus_scopes(doc)
    except ValueError as exc:
        raise OSError(f"{url}: {exc}") from None


def token_for_server(server: str, *, scope: str | None = None, cafile: str | None = None) -> str:
    """A valid access token for ``server`` (HOST[:PORT] or URL); raises NeedLogin or UnmappedServer."""
    settings = ClientSettings.load()
    scope = scope or scope_for_server(server, settings, cafile=cafile)
    return token_for_scope(scope, settings=settings)


def authorization_for_server(server: str, *, scope: str | None = None, cafile: str | None = None) -> str:
    return "Bearer " + token_for_server(server, scope=scope, cafile=cafile)


def logout(settings: ClientSettings, store: TokenStore, scope: str | None = None) -> list[str]:
    """Revoke and delete stored tokens (all, or the resource server holding ``scope``).

    Returns messages about tokens that could not be revoked (they are deleted anyway).
    """
    entries = store.all()
    if scope is not None:
        entries = {rs: d for rs, d in entries.items() if scope in d.scope.split()}
        if not entries:
            raise NeedLogin(f"no stored token for scope {scope}")
    problems = []
    client = settings.native_client()
    for rs, data in entries.items():
        for token in (data.access_token, data.refresh_token):
            if not token:
                continue
            try:
                client.oauth2_revoke_token(token)
            except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError) as exc:
                problems.append(f"could not revoke a token of {rs}: {type(exc).__name__}")
        store.remove(rs)
    return problems
