"""A browser session as both session stores keep it (SQLite in globus_login, PostgreSQL in
relayd.state.sessions_pg): a module of its own so that neither store imports the other's."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from relayd.auth.base import Identity


@dataclass
class Session:
    identity: Identity
    expires: float
    tokens: list[str] = field(default_factory=list)
    created: float = 0.0
    last_seen: float = 0.0
    written_seen: float = 0.0


def session_row(sid_hash: str, session: Session) -> tuple:
    """The sessions table's row of a session (both stores)."""
    ident = session.identity
    data = {"sub": ident.sub, "username": ident.username, "name": ident.name, "email": ident.email,
            "scopes": sorted(ident.scopes)}
    return (sid_hash, json.dumps(data), json.dumps(session.tokens), session.created, session.last_seen,
            session.expires)


def session_from_row(method: str, row: tuple) -> Session:
    _sid_hash, ident, tokens, created, seen, expires = row
    data = json.loads(ident)
    identity = Identity(sub=data["sub"], method=method, username=data.get("username"),
                        name=data.get("name"), email=data.get("email"), scopes=frozenset(data.get("scopes") or ()))
    return Session(identity, expires, json.loads(tokens), created, seen, seen)
