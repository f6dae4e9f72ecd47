"""Turn a proxystore-relay TOML configuration into an equivalent relayd conf.d fragment.

Pure functions (no I/O beyond reading the given text); ``relayctl import proxystore-relay``
(relayd/cli/relay_commands.py) writes the result. The key names are proxystore's real ones
(``RelayServingConfig``); the names its documentation used by mistake are reported, since
proxystore-relay silently ignores them.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

# proxystore.globus.scopes: the hosted relay's resource server, its default audience
PROXYSTORE_RELAY_AUDIENCE = "ebd5bbed-95e2-47cf-9c80-39e2064274bd"

_TOP = {"host", "port", "certfile", "keyfile", "max_message_bytes", "auth", "logging"}
_LOGGING = {"log_dir", "default_level", "websockets_level", "current_client_interval", "current_client_limit"}
_DOC_TYPOS = {
    "default_log_level": "default_level",
    "websockets_log_level": "websockets_level",
    "connected_client_logging_interval": "current_client_interval",
    "connected_client_logging_limit": "current_client_limit",
}
_LEVELS = {10: "debug", 20: "info", 30: "warning", 40: "error", 50: "critical"}
_GETSIZEOF_ASCII_OVERHEAD = 49  # sys.getsizeof("") on CPython 3.11-3.13 (64-bit)
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class ConversionError(Exception):
    """The input is not a usable proxystore-relay configuration."""


@dataclass
class Imported:
    fragment: str
    not_carried: list[str] = field(default_factory=list)


def _q(value: Any) -> str:
    return json.dumps(value)  # TOML basic strings and numbers are JSON-compatible


def _typed(data: dict[str, Any], key: str, types: tuple[type, ...], where: str = "") -> Any:
    value = data.get(key)
    if value is None:
        return None
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types)
        raise ConversionError(f"{where}{key} = {value!r}: expected {expected} (proxystore-relay reads it strictly)")
    return value


def convert(text: str, name: str = "relay") -> Imported:
    if not _NAME.match(name):
        raise ConversionError(f"name {name!r} must match {_NAME.pattern}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConversionError(f"not valid TOML: {exc}") from None
    notes: list[str] = []
    for key in sorted(set(data) - _TOP):
        hint = f" (a documentation typo for {_DOC_TYPOS[key]!r}, and only valid under [logging])" \
            if key in _DOC_TYPOS else ""
        notes.append(f"{key}: unknown key, ignored by proxystore-relay too{hint}")

    host = _typed(data, "host", (str,))
    port = _typed(data, "port", (int,))
    port = 8700 if port is None else port
    certfile = _typed(data, "certfile", (str,))
    keyfile = _typed(data, "keyfile", (str,))
    max_bytes = _typed(data, "max_message_bytes", (int,))
    auth = data.get("auth") or {}
    logging_ = data.get("logging") or {}
    if not isinstance(auth, dict) or not isinstance(logging_, dict):
        raise ConversionError("[auth] and [logging] must be tables")

    out = ["# Imported from a proxystore-relay configuration by `relayctl import proxystore-relay`.", ""]
    out += [f"[listeners.{name}]"]
    if host is None:
        out.append(f"bind = {_q(str(port))}  # proxystore-relay's default: every interface")
        notes.append("host: not set, so proxystore-relay listened on every interface; so does this "
                     "listener (set bind = \"127.0.0.1:PORT\" to narrow it)")
    else:
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        out.append(f"bind = {_q(bind)}")
    if certfile:
        out.append(f"tls = {{ cert = {_q(certfile)}, key = {_q(keyfile or certfile)} }}")
    elif keyfile:
        notes.append("keyfile: ignored without certfile (as proxystore-relay does)")
    out.append("")

    method = _typed(auth, "method", (str,), "auth.")
    auth_name = f"{name}_globus" if method == "globus" else f"{name}_open"
    extra_auth = sorted(set(auth) - {"method", "kwargs"})
    if extra_auth:
        raise ConversionError(f"[auth] has unknown keys {', '.join(extra_auth)} (proxystore-relay rejects them too)")
    out.append(f"[auth.{auth_name}]")
    if method is None:
        out.append('method = "none"  # proxystore-relay\'s null authenticator: one shared identity')
        notes.append("auth: none, as before: anyone can register any UUID and reach everyone; "
                     "consider a Globus or basic auth method")
    elif method == "globus":
        kwargs = auth.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ConversionError("[auth.kwargs] must be a table")
        unknown = sorted(set(kwargs) - {"client_id", "client_secret", "audience"})
        if unknown:
            raise ConversionError(f"[auth.kwargs] has keys GlobusAuthenticator does not take: {', '.join(unknown)}")
        out.append('method = "globus"')
        client_id = kwargs.get("client_id")
        if client_id:
            out.append(f"client_id = {_q(client_id)}")
        else:
            out.append('client_id = "SET-ME"  # proxystore-relay read $PROXYSTORE_GLOBUS_CLIENT_ID')
            notes.append("auth.kwargs.client_id: not set (proxystore-relay read $PROXYSTORE_GLOBUS_CLIENT_ID); "
                         "fill in client_id")
        if kwargs.get("client_secret"):
            out.append(f"client_secret = {_q(kwargs['client_secret'])}  # better: \"credential:NAME\"")
        else:
            out.append('client_secret = "credential:relay-globus-secret"')
            notes.append("auth.kwargs.client_secret: not set (proxystore-relay read "
                         "$PROXYSTORE_GLOBUS_CLIENT_SECRET); provide it as systemd credential "
                         "'relay-globus-secret' or edit client_secret")
        out.append(f"audience = {_q(kwargs.get('audience') or PROXYSTORE_RELAY_AUDIENCE)}")
    else:
        raise ConversionError(f"auth.method = {method!r}: proxystore-relay knows only \"globus\" (or no method)")
    out.append("")

    out += [f"[components.{name}]", 'kind = "relay"', f"listener = {_q(name)}", f"auth = {_q(auth_name)}"]
    if max_bytes is not None:
        # proxystore-relay compared sys.getsizeof(str): 49 + the length for the ASCII text its
        # clients send (ensure_ascii JSON). The same cut-off in UTF-8 bytes is 49 less.
        equivalent = max(1, max_bytes - _GETSIZEOF_ASCII_OVERHEAD)
        out.append(f"max_message_bytes = {equivalent}  # proxystore-relay: {max_bytes} (sys.getsizeof)")
        notes.append(f"max_message_bytes: {max_bytes} by sys.getsizeof in proxystore-relay is {equivalent} "
                     "UTF-8 bytes for the ASCII JSON clients send; relayd counts UTF-8 bytes")
    for key in sorted(set(logging_) - _LOGGING):
        hint = f" (did you mean {_DOC_TYPOS[key]!r}? proxystore-relay silently ignored it)" \
            if key in _DOC_TYPOS else " (ignored by proxystore-relay)"
        notes.append(f"logging.{key}: unknown key{hint}")
    if "current_client_interval" in logging_:
        interval = _typed(logging_, "current_client_interval", (int,), "logging.")
        if interval is not None:
            out.append(f"current_clients_interval = {interval}")
    if "current_client_limit" in logging_:
        limit = _typed(logging_, "current_client_limit", (int,), "logging.")
        if limit is not None:
            out.append(f"current_clients_limit = {limit}")
    out.append("")

    level = logging_.get("default_level")
    if level is not None:
        if isinstance(level, int) and level in _LEVELS:
            level = _LEVELS[level]
        if not isinstance(level, str) or level.lower() not in _LEVELS.values():
            raise ConversionError(f"logging.default_level = {level!r}: not a logging level")
        out += ["[logging.loggers]", f"{_q(f'relayd.relay.{name}')} = {_q(level.lower())}", ""]
    if logging_.get("log_dir") is not None:
        notes.append("logging.log_dir: not carried over; relayd logs to the journal (journalctl -u relayd)")
    if logging_.get("websockets_level") is not None:
        notes.append("logging.websockets_level: not carried over; relayd does not use the websockets library "
                     "for the relay")
    body = "\n".join(out).rstrip() + "\n"
    if notes:
        body += "\n# Not carried over / changed:\n" + "".join(f"#   - {n}\n" for n in notes)
    return Imported(body, notes)
