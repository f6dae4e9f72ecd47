"""relayctl commands for auth: users (basic), login / check-auth / logout (Globus).

``relayctl users`` opens the basic method's SQLite user database directly (the daemon reads it
on every check, so changes apply at once, and it works while relayd is stopped). It finds the
file by asking the running relayd for its effective configuration (state_dir, users_db), or,
when relayd is not running, from ``--config``; ``--db PATH`` skips both. Access control is
the file's: run it as the relayd user or root (a root-created database is handed to the state
directory's owner). Passwords come from a prompt or from stdin, never from argv.

login / check-auth / logout need no daemon; see relayd.auth.client for files and the helper
other commands use to get a token (``authorization_for_server``).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path
from typing import Any

from relayd.cli.control_client import ControlClient


def _die(message: str, code: int = 1) -> int:
    print(f"relayctl: {message}", file=sys.stderr)
    return code


# -- users ---------------------------------------------------------------------------------------

def _users_db(args: argparse.Namespace, client: ControlClient | None) -> Path:
    from relayd.auth.basic import default_users_db

    if args.db:
        return Path(args.db)
    if client is not None:
        status, body = client.request("GET", "/v1/config")
        if status != 200:
            raise LookupError(f"cannot read relayd's configuration: HTTP {status}")
        config = body["config"]
    elif args.config:
        from relayd.config import load_config
        from relayd.plugins import Registry

        config = load_config(args.config, registry=Registry.discover()).effective()
    else:
        raise LookupError("relayd is not reachable: give --db PATH, or --config FILE to read it from")
    basics = {n: a for n, a in (config.get("auth") or {}).items() if a.get("method") == "basic"}
    if args.auth:
        if args.auth not in basics:
            raise LookupError(f"no [auth.{args.auth}] with method = \"basic\" in the configuration"
                              + (f" (basic methods: {', '.join(sorted(basics))})" if basics else ""))
        name = args.auth
    elif len(basics) == 1:
        name = next(iter(basics))
    else:
        raise LookupError("no basic auth method configured" if not basics else
                          f"several basic auth methods ({', '.join(sorted(basics))}): pick one with --auth")
    return Path(basics[name].get("users_db") or default_users_db(Path(config["state_dir"]), name))


def _read_password(confirm: bool) -> str:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Password again: ") != password:
            raise ValueError("the passwords differ")
        return password
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def cmd_users(args: argparse.Namespace, client: ControlClient | None) -> int:
    from relayd.auth.users import BadUsername, UnknownUser, UserExists, UserStore

    try:
        db = _users_db(args, client)
    except LookupError as exc:
        return _die(str(exc))
    from relayd.cli.db_commands import user_store_for

    store = user_store_for(args) or UserStore(db)  # [state] url: the users are in PostgreSQL
    db = getattr(store, "where", db)
    try:
        if args.users_command == "list":
            users = store.list()
            if args.json:
                print(json.dumps([{"username": u.username, "created_at": u.created_at} for u in users], indent=2))
            else:
                for user in users:
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(user.created_at))
                    print(f"{user.username}\t{when}")
            return 0
        if args.users_command == "remove":
            store.remove(args.username)
            print(f"removed user {args.username!r}")
            return 0
        password = _read_password(confirm=True)
        if args.users_command == "add":
            store.add(args.username, password)
            print(f"added user {args.username!r} to {db}")
        else:
            store.set_password(args.username, password)
            print(f"changed the password of {args.username!r}")
        return 0
    except UserExists:
        return _die(f"user {args.username!r} already exists (use `relayctl users passwd`)")
    except UnknownUser:
        return _die(f"no user {args.username!r} in {db}")
    except (BadUsername, ValueError) as exc:
        return _die(str(exc))
    except OSError as exc:
        return _die(f"cannot open {db}: {exc}")
    except Exception as exc:  # sqlite3 errors: permission, locked, not a database
        import sqlite3

        if isinstance(exc, sqlite3.Error):
            return _die(f"{db}: {exc}")
        raise


# -- Globus ----------------------------------------------------------------------------------------

def _scopes(args: argparse.Namespace, settings: Any) -> list[str]:
    from relayd.auth.client import scope_for_server

    wanted = list(args.scope or [])
    for server in args.server or []:
        wanted.append(scope_for_server(server, settings, cafile=args.cacert))
    return list(dict.fromkeys(wanted))


def _client_errors() -> tuple[type[BaseException], ...]:
    import globus_sdk

    from relayd.auth.client import ClientConfigError, NeedLogin
    from relayd.auth.scopes import UnmappedServer

    return (NeedLogin, ClientConfigError, UnmappedServer, ValueError, globus_sdk.GlobusError)


def _describe_error(exc: BaseException) -> str:
    import globus_sdk

    if isinstance(exc, globus_sdk.GlobusAPIError):
        return f"Globus Auth refused: HTTP {exc.http_status} {exc.code}"
    if isinstance(exc, globus_sdk.NetworkError):
        return f"cannot reach Globus Auth: {type(exc).__name__}"
    return str(exc)


def cmd_login(args: argparse.Namespace, client: None) -> int:
    from relayd.auth.client import ClientSettings, TokenStore, login

    try:
        settings = ClientSettings.load()
        wanted = _scopes(args, settings)
        if not wanted:
            return _die("name what to log in for: --scope SCOPE or --server HOST[:PORT]", 2)
        entries = login(settings, TokenStore(), wanted, open_browser=not args.no_browser,
                        read_code=_read_code)
    except _client_errors() as exc:
        return _die(_describe_error(exc))
    names = TokenStore().identities()
    for rs, data in sorted(entries.items()):
        who = names.get(data.identity_id or "", {}).get("username") or data.identity_id or "?"
        print(f"logged in as {who} for {rs}: {data.scope}")
    return 0


def _read_code(prompt: str) -> str:
    if sys.stdin.isatty():
        return input(prompt)
    print(prompt, flush=True)
    return sys.stdin.readline()


def cmd_check_auth(args: argparse.Namespace, client: None) -> int:
    from relayd.auth.client import ClientSettings, NeedLogin, TokenStore, fresh

    try:
        settings = ClientSettings.load()
        store = TokenStore()
        if args.scope or args.server:
            scope = args.scope or _scopes(argparse.Namespace(scope=[], server=[args.server],
                                                             cacert=args.cacert), settings)[0]
            data = store.for_scope(scope)
            if data is None:
                raise NeedLogin(f"not logged in for scope {scope}: run `relayctl login --scope {scope}`")
            selected = {data.resource_server: data}
            hint = {data.resource_server: f"--scope {scope}"}
        else:
            selected = store.all()
            hint = {rs: f"--scope {d.scope.split()[0]}" for rs, d in selected.items()}
            if not selected:
                raise NeedLogin("not logged in: run `relayctl login --scope SCOPE` or `--server HOST[:PORT]`")
        rows = []
        for rs, data in sorted(selected.items()):
            data, refreshed = fresh(settings, store, data, hint[rs])
            extra = store.identities().get(data.identity_id or "", {})
            row: dict[str, Any] = {"resource_server": rs, "identity_id": data.identity_id, "username": extra.get("username"),
                   "name": extra.get("name"), "email": extra.get("email"), "scopes": data.scope.split(),
                   "expires_at": data.expires_at_seconds, "refreshed": refreshed,
                   "has_refresh_token": bool(data.refresh_token)}
            if args.show_token:
                row["access_token"] = data.access_token
            rows.append(row)
    except _client_errors() as exc:
        return _die(_describe_error(exc))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        left = row["expires_at"] - time.time()
        print(f"{row['resource_server']}:")
        print(f"  identity: {row['username'] or '?'} ({row['identity_id'] or 'unknown id'})"
              + (f", {row['name']}" if row["name"] else ""))
        print(f"  scopes:   {' '.join(row['scopes'])}")
        print(f"  expires:  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row['expires_at']))} "
              f"(in {int(left // 3600)}h{int(left % 3600 // 60):02d}m)"
              + (", just refreshed" if row["refreshed"] else "")
              + ("" if row["has_refresh_token"] else ", no refresh token"))
        if args.show_token:
            print(f"  token:    {row['access_token']}")
    return 0


def cmd_logout(args: argparse.Namespace, client: None) -> int:
    from relayd.auth.client import ClientSettings, TokenStore, logout

    try:
        problems = logout(ClientSettings.load(), TokenStore(), args.scope)
    except _client_errors() as exc:
        return _die(_describe_error(exc))
    for problem in problems:
        print(f"relayctl: warning: {problem} (deleted locally anyway)", file=sys.stderr)
    print("logged out" + (f" of {args.scope}" if args.scope else ""))
    return 1 if problems else 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("users", help="manage the users of a basic auth method (database opened directly)")
    s.add_argument("--auth", metavar="NAME", help="the [auth.NAME] basic method (default: the only one)")
    s.add_argument("--db", metavar="PATH", help="user database file (default: from relayd's configuration)")
    users = s.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    u = users.add_parser("add", help="add a user; password from a prompt or stdin")
    u.add_argument("username")
    u = users.add_parser("remove", help="remove a user")
    u.add_argument("username")
    u = users.add_parser("passwd", help="change a password; password from a prompt or stdin")
    u.add_argument("username")
    u = users.add_parser("list", help="list users and when they were added")
    u.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_users, offline_ok=True)

    s = sub.add_parser("login", help="log in to Globus (native app, PKCE) for scopes or servers")
    s.add_argument("--scope", action="append", help="Globus scope string (repeatable)")
    s.add_argument("--server", action="append", metavar="HOST[:PORT]",
                   help="server whose scope comes from the scope maps or its discovery document (repeatable)")
    s.add_argument("--no-browser", action="store_true", help="only print the URL")
    s.add_argument("--cacert", help="CA bundle for the servers' discovery documents")
    s.set_defaults(func=cmd_login, no_daemon=True)

    s = sub.add_parser("check-auth", help="show stored Globus tokens: identity, scopes, expiry")
    group = s.add_mutually_exclusive_group()
    group.add_argument("--scope")
    group.add_argument("--server", metavar="HOST[:PORT]")
    s.add_argument("--show-token", action="store_true", help="also print the access token itself")
    s.add_argument("--cacert", help="CA bundle for the server's discovery document")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_check_auth, no_daemon=True)

    s = sub.add_parser("logout", help="revoke and delete stored Globus tokens")
    s.add_argument("--scope", help="only the tokens holding this scope")
    s.set_defaults(func=cmd_logout, no_daemon=True)
