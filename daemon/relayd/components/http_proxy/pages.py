"""Pages a person reads: the proxy's own answers rendered as HTML for browsers (CPU only, no I/O).

Content negotiation: a request whose ``Accept`` names ``text/html`` gets a small self-contained
page (inline style, no scripts, no external assets); any other client gets exactly the JSON
body it always got. Templates are Jinja2 in its sandbox with autoescaping on: every reflected
value (a path, a username, an error text from Globus) is escaped, never pasted. Operators may
replace any template from ``pages_dir`` (a file of the same name wins over the built-in one).

Templates and what they get (besides ``status``, ``reason``, ``title``, ``message``,
``links``: a list of ``(href, text)``):

- ``error.html``       any error of the proxy (400, 401, 403, 404, 413, 502, 503, 504, ...)
- ``signin.html``      401 of a browser-login service for a request that cannot be redirected
- ``signed_out.html``  after sign-out; ``revoked`` (bool: the Globus tokens are revoked already)
- ``consent.html``     the user declined consent at Globus (or Globus refused the login)
- ``unreachable.html`` Globus Auth could not be reached (at sign-in or sign-out)
- ``base.html``        the layout the others extend
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, DictLoader, FileSystemLoader, StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from .exchange import REASONS

_BASE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} - {{ site }}</title>
<style>
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;background:#f4f6f8}
main{max-width:34rem;margin:12vh auto 2rem;padding:2rem 2.25rem;background:#fff;border:1px solid #d0d7de;border-radius:10px}
h1{font-size:1.5rem;line-height:1.25;margin:0 0 .75rem}
p{margin:.5rem 0}
.status{font-size:.85rem;color:#57606a;margin:0 0 .25rem;letter-spacing:.02em}
.detail{background:#f6f8fa;border-left:4px solid #8c959f;padding:.5rem .75rem;overflow-wrap:anywhere}
.note{border-left-color:#bf8700;background:#fff8c5}
ul.links{list-style:none;padding:0;margin:1.5rem 0 0;display:flex;flex-wrap:wrap;gap:.75rem}
ul.links a{display:inline-block;padding:.5rem 1rem;border-radius:6px;border:1px solid #0969da;color:#0969da;text-decoration:none;font-weight:600}
ul.links li:first-child a{background:#0969da;color:#fff}
a:focus-visible{outline:3px solid #1f6feb;outline-offset:2px}
footer{font-size:.8rem;color:#57606a;margin-top:1.5rem}
@media (prefers-color-scheme: dark){body{background:#0d1117;color:#e6edf3}main{background:#161b22;border-color:#30363d}
.status,footer{color:#8b949e}.detail{background:#21262d}.note{background:#3b2e00}ul.links a{color:#4493f8;border-color:#4493f8}
ul.links li:first-child a{background:#1f6feb;color:#fff}}
</style>
</head>
<body>
<main>
<p class="status">{{ status }} {{ reason }}</p>
<h1>{{ title }}</h1>
{% block content %}<p>{{ message }}</p>{% endblock %}
{% if links %}<ul class="links">{% for href, text in links %}<li><a href="{{ href }}">{{ text }}</a></li>{% endfor %}</ul>{% endif %}
<footer>{{ site }}</footer>
</main>
</body>
</html>
"""

_ERROR = """{% extends "base.html" %}
{% block content %}
<p>{{ explanation }}</p>
{% if message %}<p class="detail">{{ message }}</p>{% endif %}
{% endblock %}
"""

_SIGNIN = """{% extends "base.html" %}
{% block content %}
<p>You need to sign in with Globus to use this page.</p>
{% if message %}<p class="detail">{{ message }}</p>{% endif %}
{% endblock %}
"""

_SIGNED_OUT = """{% extends "base.html" %}
{% block content %}
<p>You are signed out of this service{% if username %} (you were signed in as <strong>{{ username }}</strong>){% endif %}.</p>
{% if revoked %}<p>Your Globus sign-in tokens for this service have been revoked.</p>
{% else %}<p class="detail note">Globus could not be reached to revoke your sign-in tokens. relayd keeps trying
in the background; until then they stay valid at Globus (but this service no longer accepts your session).</p>
{% endif %}
<p>Your Globus session in this browser is not affected: to end it too, sign out at Globus.</p>
{% endblock %}
"""

_CONSENT = """{% extends "base.html" %}
{% block content %}
<p>Globus did not sign you in to this service, so you cannot use it yet.
If you declined the consent, you can try again and allow it.</p>
{% if message %}<p class="detail">{{ message }}</p>{% endif %}
{% endblock %}
"""

_UNREACHABLE = """{% extends "base.html" %}
{% block content %}
<p>{{ explanation }}</p>
{% if message %}<p class="detail">{{ message }}</p>{% endif %}
<p>Please try again in a few minutes.</p>
{% endblock %}
"""

DEFAULTS = {"base.html": _BASE, "error.html": _ERROR, "signin.html": _SIGNIN,
            "signed_out.html": _SIGNED_OUT, "consent.html": _CONSENT, "unreachable.html": _UNREACHABLE}

_TITLES = {
    400: ("Bad request", "The address or the request could not be understood."),
    401: ("Sign-in needed", "This page needs you to sign in first."),
    403: ("Access denied", "You are signed in, but you may not use this page."),
    404: ("Page not found", "There is no page at this address. Check the address for typing errors."),
    413: ("Request too large", "What you sent is larger than this service accepts."),
    500: ("Something went wrong", "The proxy failed while handling this request."),
    501: ("Not supported", "This kind of request is not enabled for this service."),
    502: ("Service unreachable", ("The service behind this address could not be reached. It may be "
                                  "restarting or down.")),
    503: ("Temporarily unavailable", "This service cannot answer right now."),
    504: ("Service too slow", "The service behind this address did not answer in time."),
}

HTML_HEADERS = [
    b"Cache-Control: no-store",
    b"Vary: Accept",
    b"X-Content-Type-Options: nosniff",
    b"Referrer-Policy: no-referrer",
    (b"Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
     b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
]
HTML = b"text/html; charset=utf-8"


_QVALUE = re.compile(rb"(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)\Z")


def wants_html(headers: list[tuple[bytes, bytes, bytes]]) -> bool:
    """Whether a request prefers a page: its ``Accept`` names text/html (browsers' navigations do)."""
    for lname, _, value in headers:
        if lname != b"accept" or b"text/html" not in value.lower():
            continue
        for item in value.lower().split(b","):
            media, *params = item.split(b";")
            if media.strip() != b"text/html":
                continue
            for param in params:
                key, _, q = param.strip().partition(b"=")
                if key.strip() == b"q":
                    # qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ), RFC 9110 12.4.2;
                    # anything else (nan, inf, -1, 1_0) is not a preference for pages.
                    q = q.strip()
                    return _QVALUE.match(q) is not None and q.strip(b"0.") != b""
            return True
    return False


class Pages:
    """The templates of one component: built-in ones, each replaceable from ``directory``."""

    def __init__(self, directory: Path | None = None, site: str = "relayd") -> None:
        loaders: list[Any] = [DictLoader(DEFAULTS)]
        if directory is not None:
            loaders.insert(0, FileSystemLoader(str(directory)))
        self.directory = directory
        self.site = site
        self.env = SandboxedEnvironment(loader=ChoiceLoader(loaders), autoescape=True,
                                        undefined=StrictUndefined if directory is None else _lenient())
        self._cache: dict[str, Any] = {}

    def check(self) -> None:
        """Compile every template now (a broken operator template is a configuration error)."""
        for name in DEFAULTS:
            self.env.get_template(name)

    def render(self, name: str, status: int, **values: Any) -> bytes:
        title, explanation = _TITLES.get(status, (REASONS.get(status, "Error"), ""))
        context = {"status": status, "reason": REASONS.get(status, "Unknown"), "title": title,
                   "explanation": explanation, "message": "", "links": [], "site": self.site,
                   "username": "", "revoked": False}
        context.update(values)
        try:
            template = self._cache.get(name)
            if template is None:
                template = self._cache[name] = self.env.get_template(name)
            return template.render(context).encode()
        except TemplateError:
            # An operator's template failing at render time: the built-in page, never a crash.
            fallback = SandboxedEnvironment(loader=DictLoader(DEFAULTS), autoescape=True)
            return fallback.get_template(name if name in DEFAULTS else "error.html").render(context).encode()

    def error(self, status: int, json_body: bytes, links: list[tuple[str, str]] | None = None) -> bytes:
        """The page for one of the proxy's JSON error bodies (``{"message": ...}``)."""
        try:
            message = json.loads(json_body).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        if links is None:
            links = [("/", "Go to the start page")]
        return self.render("error.html", status, message=message, links=links)


def error_page(pages: Pages, ex: Any, status: int, json_body: bytes) -> bytes:
    """The page for an error of the proxy on exchange ``ex``, with the links that help."""
    route = ex.route
    method = route.auth if route is not None and route.browser else None
    target = ex.target if ex.target.startswith("/") and not ex.target.startswith("//") else "/"
    if status == 401 and method is not None:
        # (The JSON's "log in with a web browser first" is for API clients: this is a browser.)
        return pages.render("signin.html", 401,
                            links=[(method.login_link(target if ex.req.method in (b"GET", b"HEAD")
                                                      else route.prefix.rstrip("/") + "/"),
                                    "Sign in with Globus")])
    links: list[tuple[str, str]] = []
    if status >= 500 and ex.req.method in (b"GET", b"HEAD"):
        links.append((target, "Try again"))
    if status == 403 and method is not None:
        links.append((method.config.logout_path, "Sign out"))
    if target.partition("?")[0] != "/":
        links.append(("/", "Go to the start page"))
    return pages.error(status, json_body, links)


def _lenient() -> Any:
    from jinja2 import ChainableUndefined

    return ChainableUndefined


DEFAULT_PAGES = Pages()
