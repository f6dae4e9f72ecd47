"""The HTTP side of a browser login, independent of the identity provider: what one step answers,
the Cookie header, signed-value encoding and where a browser may be sent back to."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class BrowserAnswer:
    """What a browser step answers: a redirect, or a message (JSON) with its page (HTML)."""

    status: int
    message: str = ""
    headers: list[bytes] = field(default_factory=list)
    location: str | None = None
    page: str = "error.html"
    values: dict[str, Any] = field(default_factory=dict)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hash_session_id(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def cookies(header: bytes | str | None) -> dict[str, str]:
    if not header:
        return {}
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    out: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out.setdefault(name, value)
    return out


def safe_return(rd: str | None, scheme: str, host: str) -> str | None:
    """``rd`` as a path on this origin, or None: never a redirect to anywhere else."""
    if not rd or len(rd) > 2048 or any(c in rd for c in "\\\r\n\t\0") or any(ord(c) < 32 or ord(c) == 127 for c in rd):
        return None
    if rd.startswith("/"):
        if rd.startswith("//"):
            return None  # a network-path reference: another host
        return rd
    try:
        parts = urlsplit(rd)
    except ValueError:
        return None
    if parts.scheme.lower() != scheme or parts.netloc.lower() != host.lower() or parts.username or parts.password:
        return None
    path = parts.path or "/"
    if path.startswith("//"):
        return None
    return path + ("?" + parts.query if parts.query else "")
