"""relayd TOML blocks that many tests need, built from keyword arguments.

Each function returns one or more tables as text; a test joins the ones it needs with
``config(...)``. Values are written as TOML (strings quoted, lists, inline tables), so a test
says what differs instead of repeating the same hand-written block.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Protocol

FLUSH = 0.2  # a short flush_interval, so counts reach the database within a test's deadline


def value(v: object) -> str:
    """v as a TOML value (a JSON string is a valid TOML basic string)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, Iterable):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def table(header: str, keys: Mapping[str, object]) -> str:
    """[header] with one line per key whose value is not None."""
    lines = [f"[{header}]"] + [f"{k} = {value(v)}" for k, v in keys.items() if v is not None]
    return "\n".join(lines) + "\n"


def config(*blocks: str) -> str:
    return "\n".join(block.strip("\n") for block in blocks if block) + "\n"


def listener(name: str, port: int, **keys: object) -> str:
    """[listeners.NAME] bound to 127.0.0.1:PORT, with any further keys (tls, max_connections...)."""
    return table(f"listeners.{name}", {"bind": f"127.0.0.1:{port}", **keys})


def listeners(**ports: int) -> str:
    """One [listeners.NAME] per keyword, bound to 127.0.0.1:PORT."""
    return "".join(listener(name, port) for name, port in ports.items())


def auth(**methods: str) -> str:
    """One [auth.NAME] per keyword with that method, e.g. auth(users="basic", open="none")."""
    return "".join(table(f"auth.{name}", {"method": method}) for name, method in methods.items())


def state(url: str) -> str:
    return table("state", {"url": url})


def cluster(node: str, redis: str | None = None) -> str:
    return table("cluster", {"redis": redis, "node": node})


def status(name: str = "health", listener: str = "status") -> str:
    return table(f"components.{name}", {"kind": "status", "listener": listener})


def relay(name: str = "relay", listener: str = "relay", auth: str = "open", **keys: object) -> str:
    return table(f"components.{name}", {"kind": "relay", "listener": listener, "auth": auth, **keys})


def stream(name: str = "s2cs", listener: str = "ctl", auth: str = "open", *, ports: tuple[int, int],
           **keys: object) -> str:
    """A stream control server on listener, data sockets on 127.0.0.1 in the range ports."""
    return table(f"components.{name}", {"kind": "stream", "listener": listener, "auth": auth,
                                        "data_bind": "127.0.0.1", "ports": f"{ports[0]}-{ports[1]}", **keys})


def http_proxy(name: str = "web", *, auth: str, flush_interval: float | None = None,
               extra_listeners: list[str] | None = None, management: str | None = None) -> str:
    """An http_proxy component; management: the listener of its management API (no token)."""
    return table(f"components.{name}", {
        "kind": "http_proxy", "auth": auth, "flush_interval": flush_interval, "extra_listeners": extra_listeners,
        "management": {"listener": management, "token": "none"} if management else None})


def service(component: str, name: str, to: str, *, listeners: list[str] | None = None, prefix: str | None = None,
            auth: str | None = None, members_only: bool | None = None, **keys: object) -> str:
    """[components.COMPONENT.services.NAME] from /NAME (or prefix) to the upstream URL to, with
    any further keys (read_timeout, server_names...)."""
    return table(f"components.{component}.services.{name}", {
        "listeners": listeners, "from": prefix or f"/{name}", "to": to, "auth": auth,
        "members_only": members_only, **keys})


def billing_proxy(port: int, mgmt: int, *, auth: str = "users") -> str:
    """What the billing tests share: an http_proxy "web" on listener "web" with basic users,
    its management API on listener "mgmt" without a token, counts flushed every FLUSH seconds."""
    return config(listeners(web=port, mgmt=mgmt), http_proxy("web", auth=auth, flush_interval=FLUSH,
                                                             extra_listeners=["web"], management="mgmt"))


def acme_service(upstream: str, *, members_only: bool = False) -> str:
    """The billing tests' service: /acme on listener "web" (members_only: for its members only)."""
    return service("web", "acme", upstream, listeners=["web"], members_only=members_only or None)



class GlobusAuth(Protocol):
    """Where a globus_login method signs in: tests/fake_globus.py's FakeGlobus."""

    client_id: str
    client_secret: str
    base_url: str


def globus_auth(fake: GlobusAuth, required_scopes: list[str], name: str = "globus") -> str:
    """[auth.NAME]: Globus token introspection against fake, requiring required_scopes."""
    return table(f"auth.{name}", {"method": "globus", "client_id": fake.client_id, "client_secret": fake.client_secret,
                                  "auth_base_url": fake.base_url, "required_scopes": required_scopes})


def globus_login_proxy(tls_port: int, cert: object, key: object, upstream: str, fake: GlobusAuth, *,
                       auth_extra: str = "", proxy_extra: str = "", services: str = "") -> str:
    """An http_proxy behind the globus_login method "browser" on the TLS listener "secure":
    /app signed in, /public open, then services. auth_extra and proxy_extra: lines for
    [auth.browser] and [components.web]."""
    browser = table("auth.browser", {"method": "globus_login", "client_id": fake.client_id,
                                     "client_secret": fake.client_secret, "auth_base_url": fake.base_url.rstrip("/")})
    return config(
        listener("secure", tls_port, tls={"cert": str(cert), "key": str(key)}), browser + auth_extra,
        auth(open="none"), http_proxy("web", auth="browser") + proxy_extra,
        service("web", "app", upstream, listeners=["secure"]),
        service("web", "public", upstream, listeners=["secure"], auth="open"), services)
