"""Pure routing logic: segment-aware prefixes, their overlap, and the from/to path mapping."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Protocol, TypeVar


class Prefixed(Protocol):
    """What ``first_match`` looks at: a normalized ``prefix`` and the ``names`` (server names)
    it is limited to (empty: any host). ``routes.Route`` is one."""

    @property
    def prefix(self) -> str: ...
    @property
    def names(self) -> frozenset[str]: ...


P = TypeVar("P", bound=Prefixed)


class _Bare(NamedTuple):
    prefix: str
    names: frozenset[str] = frozenset()


def normalize_prefix(prefix: str) -> str:
    """'/acme/' and 'acme' -> '/acme'; '/' -> '' (matches everything)."""
    prefix = "/" + prefix.strip("/")
    return "" if prefix == "/" else prefix


def first_match(candidates: Iterable[P], hostname: str, target: str) -> P | None:
    """The first candidate for ``hostname`` whose prefix matches ``target``, segment-aware:
    '/acme' matches '/acme', '/acme/x', '/acme?q', not '/acmefoo'. The one implementation of
    prefix matching; the request path calls it once per request (``admission.admit``), with
    the test written out in the loop, so matching costs no call per candidate."""
    for candidate in candidates:
        if candidate.names and hostname not in candidate.names:
            continue
        prefix = candidate.prefix
        if target.startswith(prefix) and (len(target) == len(prefix) or target[len(prefix)] in "/?"):
            return candidate
    return None


def matches(prefix: str, target: str) -> bool:
    """Whether ``prefix`` matches ``target`` (``first_match``'s rule)."""
    return first_match((_Bare(prefix),), "", target) is not None


def overlap(a: str, b: str) -> bool:
    """Whether two normalized prefixes could both match one path."""
    return matches(a, b) or matches(b, a)


def map_target(prefix: str, target: str, to_path: str) -> str:
    """Upstream request target for ``target`` (which ``prefix`` matches).

    The prefix is stripped and the rest appended to the ``to`` URL's path; the query is
    kept: ``/acme/register?x=1`` with ``from = "/acme"``, ``to = "http://h:1"`` becomes
    ``/register?x=1``; with ``to = "http://h:1/to"``, ``/acme`` -> ``/to``, ``/acme/`` -> ``/to/``.
    """
    rest = target[len(prefix):]
    path, sep, query = rest.partition("?")
    if not path:
        new = to_path or "/"
    else:
        new = to_path.rstrip("/") + path
    return new + sep + query


def has_dot_segment(path: str) -> bool:
    """'.' or '..' segments (also percent-encoded) would let an upstream escape the `to` path."""
    if "." not in path and "%2" not in path:  # "%2e" and "%2E" both contain "%2"
        return False
    for segment in path.split("?", 1)[0].split("/"):
        s = segment.lower().replace("%2e", ".")
        if s in (".", ".."):
            return True
    return False


class PathError(ValueError):
    """A request target the proxy refuses (400)."""


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# Percent-encodings refused outright: they would mean a different path to an upstream that
# decodes them ("/", "\", NUL), or, after one more decoding, a dot segment or a separator.
_REFUSED = {"2F": "an encoded '/'", "5C": "an encoded '\\'", "00": "an encoded NUL"}
_DOUBLE = ("2E", "2F", "5C")


def normalize_path(path: str) -> str:
    """The routed and forwarded form of a request path, or PathError.

    Percent-encoded unreserved characters are decoded once (RFC 3986 section 6.2.2.2), the
    hex of the others upper-cased; then a path is refused if it holds an encoded '/', '\\' or
    NUL, a raw '\\', a '.' or '..' segment, or a '%25' that would decode to one of those. So
    routing sees the path the upstream will see, and no form of '..' leaves the `to` path
    (the policy Envoy calls UNESCAPE_AND_REJECT for slashes, applied to dot segments too).
    """
    if "%" not in path and "\\" not in path and "/." not in path:
        return path  # the common case: nothing to decode or check
    if "\\" in path:
        raise PathError("'\\' is not allowed in paths")
    if "%" in path:
        parts = path.split("%")
        out = [parts[0]]
        for part in parts[1:]:
            code = part[:2]
            if len(code) < 2 or code[0] not in _HEX or code[1] not in _HEX:
                raise PathError("invalid percent-encoding in the path")
            code = code.upper()
            if code in _REFUSED:
                raise PathError(f"{_REFUSED[code]} is not allowed in paths")
            if code == "25" and part[2:4].upper() in _DOUBLE:
                raise PathError("a double-encoded '.', '/' or '\\' is not allowed in paths")
            char = chr(int(code, 16))
            out.append((char if char in _UNRESERVED else "%" + code) + part[2:])
        path = "".join(out)
    for segment in path.split("/"):
        if segment in (".", ".."):
            raise PathError("'.' and '..' path segments are not allowed")
    return path
