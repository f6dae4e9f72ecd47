"""The relay's messages as text: parsing what clients send, and writing what the relay sends
exactly as proxystore's encoder would (the wire format is described in protocol.py)."""

from __future__ import annotations

import json
import json.scanner
import uuid as uuidlib
from json.encoder import encode_basestring_ascii as _enc  # the C encoder json.dumps uses
from typing import Any

REGISTERED_REPLY = '{"success": true, "message": null, "error": false, "message_type": "relay_response"}'


class BadMessage(Exception):
    """The text is not a message a client may send (close 4000)."""


# json.loads without its Python-level wrapping (about half its time for a 200-byte message):
# the same C scanner, with json.loads's rules for surrounding whitespace (" \t\n\r") and a BOM.
_scan_once = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # typeshed: a context
_JSON_WS = " \t\n\r"


def parse_json(text: str) -> Any:
    """Exactly json.loads(text) for a str, raising ValueError (or RecursionError) on bad input."""
    try:
        obj, end = _scan_once(text, 0)
    except StopIteration:
        stripped = text.lstrip(_JSON_WS)
        if stripped is text or not stripped:
            raise ValueError("not JSON") from None
        text = stripped
        try:
            obj, end = _scan_once(text, 0)
        except StopIteration:
            raise ValueError("not JSON") from None
    if end != len(text) and text[end:].strip(_JSON_WS):
        raise ValueError("extra data")
    return obj


def canonical_uuid(value: Any) -> str:
    """Lower-case hyphenated form of anything Python's uuid.UUID(str) accepts."""
    if type(value) is not str:
        raise BadMessage("uuid must be a string")
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        raise BadMessage("not a UUID") from None


def encode_response(success: bool = True, message: str | None = None, error: bool = False) -> str:
    return json.dumps({"success": success, "message": message, "error": error,
                       "message_type": "relay_response"})


def encode_registration(name: str, uuid: str) -> str:
    """What a client sends (used by tests and the bench)."""
    return json.dumps({"name": name, "uuid": uuid, "message_type": "relay_registration"})


def source_prefix(uuid: str, name: str) -> str:
    return '{"source_uuid": "' + uuid + '", "source_name": ' + _enc(name) + ', "peer_uuid": "'


def encode_peer(prefix: str, peer_uuid: str, description_type: str, description: str,
                error: str | None) -> str:
    """A peer_connection exactly as proxystore's encoder would write it."""
    return (prefix + peer_uuid + '", "description_type": ' + _enc(description_type)
            + ', "description": ' + _enc(description)
            + ', "error": ' + ("null" if error is None else _enc(error))
            + ', "message_type": "peer_connection"}')


def not_registered_error(peer: str) -> str:
    return (f"Cannot forward peer connection message to peer {peer} because this peer is "
            "not registered this relay server.")  # sic: proxystore's clients match this text


def other_user_error(peer: str) -> str:
    return f"The requested peer {peer} is owned by a different user."


def cluster_unreachable_error(peer: str) -> str:
    """A peer not on this node while the cluster bus is down: it may exist elsewhere. Starts like
    the not-registered text, which is what clients match."""
    return (f"Cannot forward peer connection message to peer {peer} because this relay node cannot "
            "reach the rest of the cluster; try again later.")


def other_user_registration(uuid: str) -> str:
    return f"ForbiddenError: The client UUID {uuid} is already registered to another user."
