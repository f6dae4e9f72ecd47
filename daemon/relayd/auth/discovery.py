"""The unauthenticated discovery document: what a client must present to a relayd listener.

Every component that speaks HTTP answers ``GET /.well-known/relayd`` (no auth, before any auth
check) with::

    from relayd.auth import discovery

    if request.method == "GET" and request.path == discovery.PATH:
        return web.json_response(discovery.document([method] if method else []))

where ``method`` is the component's AuthMethod (``self.context.auth_method(name)``), or several
if it accepts several. The body looks like::

    {"service": "relayd", "version": "0.1.0",
     "auth": [{"name": "globus", "method": "globus",
               "scope": "https://auth.globus.org/scopes/<id>/relay",
               "audience": "<id>", "auth_base_url": "https://auth.globus.org"}]}

``auth`` is empty when the component needs no credentials. Only ``AuthMethod.describe()`` goes
in, which by contract holds no secrets (client secrets, users, allowlists stay out).
``relayctl login --server HOST:PORT`` reads ``scope`` from it unless a scope map names the server.
"""

from __future__ import annotations

from typing import Any

from relayd import __version__
from relayd.auth.base import AuthMethod

PATH = "/.well-known/relayd"


def document(methods: list[AuthMethod]) -> dict[str, Any]:
    entries = []
    for method in methods:
        if method.allows_anonymous:
            entries.append({"name": method.name, "method": "none"})
            continue
        entries.append({"name": method.name, **method.describe()})
    return {"service": "relayd", "version": __version__, "auth": entries}


def globus_scopes(doc: dict[str, Any]) -> list[str]:
    """The scope strings a discovery document asks for (client side)."""
    if not isinstance(doc, dict) or doc.get("service") != "relayd":
        raise ValueError("not a relayd discovery document")
    scopes = []
    for entry in doc.get("auth") or []:
        if isinstance(entry, dict) and entry.get("method") == "globus" and entry.get("scope"):
            scopes.append(str(entry["scope"]))
    return scopes
