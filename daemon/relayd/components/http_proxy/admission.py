"""What happens to a request before anything is forwarded: a pure decision, no I/O.

From the parsed head: the request target in origin form (RFC 9112 section 3.2), the path
normalized once (``mapping.normalize_path``), the route, and the checks a route makes before
auth (HTTPS redirect, body limit, WebSocket, browser session). The core acts on the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .exchange import Exchange, json_message
from .http1 import ProtocolError, RequestHead, valid_host
from .mapping import PathError, first_match, normalize_path

if TYPE_CHECKING:
    from relayd.auth.base import Identity

    from .routes import Router


class Admission:
    """One of: ``reply`` (status, body, headers, close), ``browser`` (a login/logout path),
    ``identity`` (known already), or neither (the auth method must be asked)."""

    __slots__ = ("reply", "browser", "identity")

    def __init__(self, reply: tuple[int, bytes, list[bytes], bool] | None = None, browser: Any = None,
                 identity: Identity | None = None) -> None:
        self.reply = reply
        self.browser = browser
        self.identity = identity


def _reply(status: int, body: bytes, headers: list[bytes] | None = None, close: bool = False) -> Admission:
    return Admission(reply=(status, body, headers or [], close))


def admit(router: Router, ex: Exchange, tls: bool) -> Admission:
    """Route ``ex`` (setting its host, target, endpoint and route) and decide what comes next."""
    req = ex.req
    try:
        target, host = origin_form(req)
        path, sep, query = target.partition("?")
        path = normalize_path(path)
    except (ProtocolError, PathError) as exc:
        return _reply(400, json_message(str(exc)), close=True)
    target = path + sep + query
    ex.host = host
    ex.target = target
    ex.endpoint = path
    hostname = (_HOSTNAMES.get(host) or hostname_of(host)) if host else ""
    if path == "/.well-known/relayd" and req.method in (b"GET", b"HEAD"):
        return _reply(200, router.discovery(hostname))
    browser = router.browser_paths.get(path) if router.browser_paths else None
    if browser is not None:
        return Admission(browser=browser)
    route = first_match(router.routes, hostname, target)  # not a method: one call less per request
    if route is None:
        return _reply(404, json_message("no service at this address"))
    ex.route = route
    cfg = route.config
    if not tls and cfg.redirect_https and route.https_port:
        port = "" if route.https_port == 443 else f":{route.https_port}"
        location = f"https://{hostname or route.default_host}{port}{target}".encode()
        return _reply(308, b"", [b"Location: " + location])
    if cfg.max_body and max(req.length or 0, ex.bytes_in) > cfg.max_body:
        return _reply(413, json_message(f"request body larger than {cfg.max_body} bytes"), close=True)
    if req.upgrade is not None and not cfg.websocket:
        return _reply(501, json_message("WebSocket is not enabled for this service"), close=True)
    login = route.browser_login
    if login is None:
        return Admission(None, None, route.cached_identity(req.authorization))  # positional: no kwargs dict
    identity = login.session_identity(req.cookie)
    if identity is not None:
        return Admission(identity=identity)
    if req.method not in (b"GET", b"HEAD"):
        challenge = route.auth.challenge()
        return _reply(401, json_message("log in with a web browser first"),
                      [b"WWW-Authenticate: " + challenge.encode()] if challenge else [])
    # To Globus (after checking it can be reached): a step of the browser flow, in a task.
    return Admission(browser=route.auth)


def origin_form(req: RequestHead) -> tuple[str, bytes | None]:
    """(path and query, host) of a request target in origin or absolute form (RFC 9112 3.2)."""
    try:
        target = req.target.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("request target must be ASCII") from None
    host = req.host
    if target[:1] != "/":
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise ProtocolError("request target must be a path or an http(s) URL")
        end = len(rest)
        for delimiter in "/?":
            position = rest.find(delimiter)
            if 0 <= position < end:
                end = position
        authority, rest = rest[:end], rest[end:]
        if not valid_host(authority.encode()):
            raise ProtocolError("invalid authority in the request target")
        host = authority.encode()  # the target's authority wins over Host (RFC 9112 3.2.2)
        target = rest if rest.startswith("/") else "/" + rest
    if "#" in target:
        raise ProtocolError("a fragment is not allowed in the request target")
    return target, host


_HOSTNAMES: dict[bytes, str] = {}  # Host values seen -> hostnames (clients send few distinct ones)


def hostname_of(host: bytes | None) -> str:
    if not host:
        return ""
    text = host.decode("ascii", "replace").lower()
    if text.startswith("["):
        name = text[1:text.find("]")] if "]" in text else text
    else:
        name = text.rsplit(":", 1)[0] if ":" in text else text
    if len(_HOSTNAMES) >= 1024:  # Host is the client's to choose: keep the cache bounded
        _HOSTNAMES.clear()
    _HOSTNAMES[host] = name
    return name
