"""Where durable state lives: SQLite files in state_dir (the embedded default) or PostgreSQL.

Every store (http_proxy services, members and counters; ``basic`` users; browser sessions) has
one interface and two implementations. ``[state] url`` unset keeps the SQLite files; set, the
same tables live in one PostgreSQL database, one schema per component or auth method
(``http_proxy:NAME``, ``basic:NAME``, ``globus_login:NAME``), and the nodes sharing it learn each
other's changes through LISTEN/NOTIFY (relayd.state.pg).
"""

from __future__ import annotations

from typing import Any


def postgres_url(context: Any) -> str | None:
    """The ``[state] url`` of a component/auth Context, or None for the SQLite default."""
    state = getattr(context, "state", None)
    url = getattr(state, "url", None) if state is not None else None
    if url is None:
        return None
    value = url.get_secret_value() if hasattr(url, "get_secret_value") else str(url)
    return value or None


def node_name(context: Any) -> str:
    cluster = getattr(context, "cluster", None)
    if cluster is not None and getattr(cluster, "node", None):
        return str(cluster.node)
    import socket

    return socket.gethostname()


def health(context: Any, url: str) -> Any:
    """The shared 'state' engine health record (None in unit tests without engines)."""
    engines = getattr(context, "engines", None)
    return engines.register("state", "postgresql", url) if engines is not None else None
