"""ya-runtime-http-auth compatibility: its JSON service shapes, cert hashes and RFC 3339 times."""

from __future__ import annotations

import base64
import datetime
import hashlib
import re
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


class CompatError(ValueError):
    """A service definition that cannot be used; the message is for the operator."""


class ApiError(Exception):
    """An answer of the management API other than 200: ``{"message": ...}`` with ``status``,
    as ya-runtime-http-auth answers errors."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def rfc3339(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat().replace("+00:00", "Z")


def _addresses(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise CompatError(f"'{key}' must be an 'ip:port' string or a non-empty list of them")
    return value


def parse_service(data: Any) -> dict[str, Any]:
    """Normalize a ya-runtime-http-auth CreateService / service definition file."""
    if not isinstance(data, dict):
        raise CompatError("a service definition must be a JSON object")
    for key in ("from", "to"):
        if not isinstance(data.get(key), str):
            raise CompatError(f"'{key}' is required (a string)")
    https = _addresses(data.get("bindHttps", data.get("bind")), "bindHttps")
    http = _addresses(data.get("bindHttp"), "bindHttp")
    if not https and not http:
        raise CompatError("'bindHttps' or 'bindHttp' is required")
    cert = data.get("cert") or None
    if https and not (isinstance(cert, dict) and cert.get("path") and cert.get("keyPath")):
        raise CompatError("'bindHttps' needs 'cert': {'path': ..., 'keyPath': ...}")
    auth = data.get("auth")
    if auth is not None and not (isinstance(auth, dict) and auth.get("method") == "basic"):
        raise CompatError("'auth' must be {\"method\": \"basic\"} (the only method) or absent")
    names = data.get("serverName") or []
    if isinstance(names, str):
        names = [names]
    timeout = data.get("responseTimeout") or data.get("requestTimeout")
    return {
        "name": str(data.get("name") or ""),
        "description": str(data.get("description") or ""),
        "server_names": [str(n) for n in names],
        "https": https,
        "http": http,
        "from": data["from"],
        "to": data["to"],
        "cert": cert.get("path") if cert else None,
        "key": cert.get("keyPath") if cert else None,
        "read_timeout": (float(timeout) / 1000.0) if isinstance(timeout, (int, float)) and timeout else None,
    }


def echo_service(request: dict[str, Any], name: str, created_at: float, listeners: list[str], origin: str,
                 cert_hash: Any) -> dict[str, Any]:
    """The ``Service`` answer for a service created with ``request``: the client's fields as it
    sent them (serde's semantics: an absent key stays absent, ``null`` stays ``null``, nothing
    is normalised), plus what the original adds: ``name`` when it was left to the default,
    ``createdAt``, and ``cert.hash`` (output-only, compared by nobody: ya-http-proxy-model's
    CreateServiceCert equality looks at path and keyPath). relayd's ``listeners`` and
    ``origin`` are added unless the client sent keys of those names (serde ignores unknown
    keys, so ya-runtime-http-auth's comparison still holds)."""
    out = dict(request)
    out.setdefault("name", name)
    cert = out.get("cert")
    if isinstance(cert, dict) and isinstance(cert.get("path"), str):
        out["cert"] = {**cert, "hash": cert_hash(cert["path"]) or cert.get("hash", "")}
    out["createdAt"] = rfc3339(created_at)
    out.setdefault("listeners", listeners)
    out.setdefault("origin", origin)
    return out


def listener_name(service: str, kind: str) -> str:
    base = re.sub(r"[^a-z0-9_-]", "-", service.lower()).strip("-_") or "service"
    if not base[0].isalpha():
        base = "s-" + base
    return f"{base[:54]}-{kind}"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(parsed: dict[str, Any], component: str, auth: str) -> str:
    """A configuration fragment (listeners + one service) for conf.d/."""
    name = parsed["name"] or "service"
    out = [f"# converted from a ya-runtime-http-auth service definition ({name});",
           f"# needs an [auth.{auth}] table (method = \"basic\") declared elsewhere.", ""]
    listeners = []
    for kind, binds in (("https", parsed["https"]), ("http", parsed["http"])):
        for i, bind in enumerate(binds):
            lname = listener_name(name, kind if i == 0 else f"{kind}{i + 1}")
            listeners.append(lname)
            out.append(f"[listeners.{lname}]")
            out.append(f"bind = {_toml_str(bind)}")
            if kind == "https":
                out.append(f"tls = {{ cert = {_toml_str(parsed['cert'])}, key = {_toml_str(parsed['key'])} }}")
            out.append("")
    out.append(f"[components.{component}]")
    out.append('kind = "http_proxy"')
    out.append(f"auth = {_toml_str(auth)}")
    out.append("")
    out.append(f"[components.{component}.services.{_toml_str(name)}]")
    if parsed["description"]:
        out.append(f"description = {_toml_str(parsed['description'])}")
    if parsed["server_names"]:
        out.append("server_names = [" + ", ".join(_toml_str(n) for n in parsed["server_names"]) + "]")
    out.append("listeners = [" + ", ".join(_toml_str(n) for n in listeners) + "]")
    out.append(f"from = {_toml_str(parsed['from'])}")
    out.append(f"to = {_toml_str(parsed['to'])}")
    out.append("members_only = true  # ya-runtime-http-auth users belong to one service")
    if parsed["read_timeout"]:
        out.append(f"read_timeout = {parsed['read_timeout']}")
    return "\n".join(out) + "\n"


def cert_info(path: Path) -> dict[str, str]:
    """certHash (sha3: of the PEM file bytes, as ya-runtime-http-auth), DER SHA-256 and SPKI pin."""
    raw = path.read_bytes()
    info = {"certHash": "sha3:" + hashlib.sha3_256(raw).hexdigest()}
    try:
        cert = x509.load_pem_x509_certificate(raw)  # the first certificate: the server's own
    except ValueError:
        return info
    der = cert.public_bytes(Encoding.DER)
    fingerprint = hashlib.sha256(der).hexdigest().upper()
    info["sha256Fingerprint"] = ":".join(fingerprint[i:i + 2] for i in range(0, len(fingerprint), 2))
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    info["spkiPin"] = "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
    return info
