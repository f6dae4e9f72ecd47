"""Sans-I/O core of the ProxyStore-compatible relay: messages, registry, routing, close codes.

Nothing here touches a socket. The shell (``server.py``) feeds every text message of a
connection to :meth:`RelayCore.receive` and carries out the returned actions: ``Send`` a text
message to a client, or ``Close`` a client with a code and reason. A registration needs the
auth method's verdict first, so ``receive`` answers it with :class:`Register`; the shell
authenticates (asynchronously) and calls :meth:`RelayCore.register`.

The wire format is proxystore-relay's (``proxystore.p2p.relay.messages``): one JSON object
per text frame, ``message_type`` holding the enum member name, UUIDs parsed leniently and
emitted canonical, JSON encoded with Python's default separators and ``ensure_ascii``. The
stock server's bugs are deliberately not copied: every close unregisters, non-objects get
4000, reasons are cut to 123 bytes, forwarded sources are the sender's registered ones, and
another identity's UUID cannot be taken over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

# The messages as text; imported from here (``protocol as p``) by the shell, the cluster and tests.
from relayd.components.relay.messages import (
    REGISTERED_REPLY,
    BadMessage,
    canonical_uuid,
    encode_peer,
    not_registered_error,
    other_user_error,
    other_user_registration,
    parse_json,
    source_prefix,
)
from relayd.components.relay.messages import (
    cluster_unreachable_error as cluster_unreachable_error,
)
from relayd.components.relay.messages import (
    encode_registration as encode_registration,
)
from relayd.components.relay.messages import (
    encode_response as encode_response,
)

# -- close codes ---------------------------------------------------------------------------

BAD_MESSAGE = 4000
UNAUTHORIZED = 4001
FORBIDDEN = 4002
TOO_LONG = 4003
DUPLICATE = 4004
SLOW_RECEIVER = 4005
RATE_LIMITED = 4006
TOO_MANY_CLIENTS = 4007
REGISTER_TIMEOUT = 4008
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002  # sent by the WebSocket layer: a frame breaking RFC 6455
INVALID_DATA = 1007  # sent by the WebSocket layer: a text frame that is not UTF-8
MESSAGE_TOO_BIG = 1009  # sent by the WebSocket layer for messages over HARD_MAX_BYTES
INTERNAL_ERROR = 1011  # a bug in relayd (logged with a traceback); the client may retry
TRY_AGAIN_LATER = 1013  # the auth authority could not be asked

HARD_MAX_BYTES = 2**20  # proxystore-relay's websockets default, kept for compatibility

REASON_BAD_MESSAGE = "Unknown message type."
REASON_TOO_LONG = "Message length exceeds limit."
REASON_DUPLICATE = (
    "Relay received a registration with the same ID. This might mean that the endpoint is "
    "running in multiple locations."
)
REASON_NOT_REGISTERED = "ForbiddenError: Client has not registered and authenticated with the relay server."
REASON_SLOW_RECEIVER = "Send buffer full: the client does not read fast enough."
REASON_RATE_LIMITED = "Message rate limit exceeded."
REASON_TOO_MANY_CLIENTS = "Relay is at its client limit; try again later."
REASON_REGISTER_TIMEOUT = "No registration received in time."
REASON_GOING_AWAY = "Relay server shutting down."
REASON_INTERNAL_ERROR = "Internal relay error."

# Every code a relayd relay can close a connection with (the fuzz tests check this).
DOCUMENTED_CODES = frozenset({
    BAD_MESSAGE, UNAUTHORIZED, FORBIDDEN, TOO_LONG, DUPLICATE, SLOW_RECEIVER, RATE_LIMITED,
    TOO_MANY_CLIENTS, REGISTER_TIMEOUT, GOING_AWAY, PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG,
    INTERNAL_ERROR, TRY_AGAIN_LATER,
})

MAX_REASON_BYTES = 123  # RFC 6455: a control frame payload is at most 125 bytes, 2 are the code


def truncate_reason(reason: str) -> str:
    """Cut a close reason to 123 UTF-8 bytes without splitting a character."""
    raw = reason.encode("utf-8")
    if len(raw) <= MAX_REASON_BYTES:
        return reason
    return raw[:MAX_REASON_BYTES].decode("utf-8", "ignore")


# -- what a client may send (messages.py parses and writes the text) ----------------------

_REGISTRATION_KEYS = frozenset({"name", "uuid", "message_type"})
_PEER_REQUIRED = frozenset({"source_uuid", "source_name", "peer_uuid", "description_type",
                            "description", "message_type"})
_PEER_ALL = _PEER_REQUIRED | {"error"}
_DESCRIPTION_TYPES = frozenset({"offer", "answer"})


# -- actions ----------------------------------------------------------------------------------

class Send(NamedTuple):
    client: Client
    text: str


class Close(NamedTuple):
    client: Client
    code: int
    reason: str


class Remote(NamedTuple):
    """No local client has the peer: the shell asks the cluster (relay/cluster.py), which
    delivers it on the node holding the peer or has the core echo it back with an error."""

    client: Client
    peer: str
    description_type: str
    description: str
    error: str | None


class Register(NamedTuple):
    """The shell must authenticate the connection, then call RelayCore.register."""

    name: str
    uuid: str


Action = Send | Close | Remote


@dataclass(eq=False)
class Client:
    """One WebSocket connection; registered once it has a uuid."""

    conn: Any  # the shell's handle
    address: str
    connected_at: float  # wall clock, for display
    authorization: str | None = None  # the handshake's Authorization header
    identity: str | None = None  # Identity.sub once authenticated
    identity_label: str | None = None  # for display: username or sub
    name: str | None = None
    uuid: str | None = None
    cluster_id: str = ""  # names this connection in the cluster registry (relay/cluster.py)
    prefix: str = ""
    messages_in: int = 0
    messages_out: int = 0
    closed: bool = False
    tokens: float = 0.0
    refilled_at: float = 0.0

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "uuid": self.uuid, "identity": self.identity_label,
                "address": self.address, "connected_since": self.connected_at,
                "messages_in": self.messages_in, "messages_out": self.messages_out}


class RelayCore:
    """Registry of clients and every routing decision of one relay."""

    def __init__(self, *, max_message_bytes: int | None = None, max_clients: int | None = None,
                 max_messages_per_second: float | None = None, clustered: bool = False) -> None:
        self.max_message_bytes = max_message_bytes
        self.clustered = clustered  # a peer not found here may be on another node
        self.max_clients = max_clients
        self.rate = max_messages_per_second
        self.burst = max(1.0, max_messages_per_second or 0.0)
        self.connections: set[Client] = set()
        self.by_uuid: dict[str, Client] = {}
        self.forwarded = 0
        self.echoed = 0
        self.registrations = 0
        self.closes: dict[int, int] = {}

    # -- connection lifecycle ---------------------------------------------------------------

    def open(self, client: Client, now: float = 0.0) -> Close | None:
        """Admit a new connection, or say how to close it."""
        if self.max_clients is not None and len(self.connections) >= self.max_clients:
            client.closed = True
            self.count_close(TOO_MANY_CLIENTS)
            return Close(client, TOO_MANY_CLIENTS, REASON_TOO_MANY_CLIENTS)
        client.tokens, client.refilled_at = self.burst, now
        self.connections.add(client)
        return None

    def close(self, client: Client, code: int, reason: str) -> Close:
        """Unregister now and return the Close for the shell to carry out."""
        self.disconnect(client)
        self.count_close(code)
        return Close(client, code, truncate_reason(reason))

    def disconnect(self, client: Client) -> None:
        """The connection is gone (or going): forget it. Idempotent."""
        client.closed = True
        self.connections.discard(client)
        if client.uuid is not None and self.by_uuid.get(client.uuid) is client:
            del self.by_uuid[client.uuid]

    def count_close(self, code: int) -> None:
        self.closes[code] = self.closes.get(code, 0) + 1

    # -- messages --------------------------------------------------------------------------------

    def receive_binary(self, client: Client) -> list[Action]:
        client.messages_in += 1
        return [self.close(client, BAD_MESSAGE, REASON_BAD_MESSAGE)]

    def receive(self, client: Client, text: str, now: float = 0.0) -> list[Action] | Register:
        """Decide what one text message from ``client`` causes."""
        if client.closed:
            return []
        client.messages_in += 1
        if self.rate is not None and not self._take_token(client, now, self.rate):
            return [self.close(client, RATE_LIMITED, REASON_RATE_LIMITED)]
        limit = self.max_message_bytes
        # UTF-8 is 1 to 4 bytes a character: encode only when the length alone cannot tell.
        if limit is not None and len(text) * 4 > limit and (
                len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit):
            return [self.close(client, TOO_LONG, REASON_TOO_LONG)]
        try:
            obj = parse_json(text)
        except (ValueError, RecursionError):
            return [self.close(client, BAD_MESSAGE, REASON_BAD_MESSAGE)]
        if type(obj) is not dict:
            return [self.close(client, BAD_MESSAGE, REASON_BAD_MESSAGE)]
        kind = obj.get("message_type")
        try:
            if kind == "peer_connection":
                return self._peer_connection(client, obj)
            if kind == "relay_registration":
                if obj.keys() != _REGISTRATION_KEYS or type(obj["name"]) is not str:
                    raise BadMessage("bad registration")
                return Register(obj["name"], canonical_uuid(obj["uuid"]))
        except BadMessage:
            pass
        # relay_response (servers send it, clients don't), unknown or missing types
        return [self.close(client, BAD_MESSAGE, REASON_BAD_MESSAGE)]

    def _take_token(self, client: Client, now: float, rate: float) -> bool:
        tokens = client.tokens + (now - client.refilled_at) * rate
        client.refilled_at = now
        if tokens < 1.0:
            client.tokens = tokens
            return False
        client.tokens = min(tokens, self.burst) - 1.0
        return True

    def _peer_connection(self, client: Client, obj: dict[str, Any]) -> list[Action]:
        keys = obj.keys()
        if not (keys >= _PEER_REQUIRED and keys <= _PEER_ALL):
            raise BadMessage("bad field set")
        source, peer = obj["source_uuid"], obj["peer_uuid"]
        if source != client.uuid:
            canonical_uuid(source)  # validated like the stock relay, then ignored: no spoofing
        target = self.by_uuid.get(peer) if type(peer) is str else None
        if target is None:
            peer = canonical_uuid(peer)
            target = self.by_uuid.get(peer)
        description_type, description = obj["description_type"], obj["description"]
        error = obj.get("error")
        if (type(description_type) is not str or description_type not in _DESCRIPTION_TYPES
                or type(description) is not str
                or (error is not None and type(error) is not str)):
            raise BadMessage("bad field type")
        if client.uuid is None:
            return [self.close(client, FORBIDDEN, REASON_NOT_REGISTERED)]
        if target is None and self.clustered:
            return [Remote(client, peer, description_type, description, error)]
        if target is None:
            error = not_registered_error(peer)
        elif target.identity != client.identity:
            target, error = None, other_user_error(peer)
        if target is None:
            assert error is not None  # set by both branches above
            return [self.echo(client, peer, description_type, description, error)]
        self.forwarded += 1
        target.messages_out += 1
        return [Send(target, encode_peer(client.prefix, peer, description_type, description, error))]

    def echo(self, client: Client, peer: str, description_type: str, description: str,
             error: str) -> Send:
        """The request back to its sender with ``error`` set (proxystore-relay's way to fail)."""
        self.echoed += 1
        client.messages_out += 1
        return Send(client, encode_peer(client.prefix, peer, description_type, description, error))

    def deliver_remote(self, identity: str, source_uuid: str, source_name: str, peer: str,
                       description_type: str, description: str, error: str | None) -> Send | str:
        """A request another node forwarded here: the Send to the local peer, or the error text
        the sender must get back (the peer left meanwhile, or belongs to someone else)."""
        target = self.by_uuid.get(peer)
        if target is None:
            return not_registered_error(peer)
        if target.identity != identity:
            return other_user_error(peer)
        self.forwarded += 1
        target.messages_out += 1
        return Send(target, encode_peer(source_prefix(source_uuid, source_name), peer, description_type,
                                        description, error))

    # -- registration ------------------------------------------------------------------------

    def register(self, client: Client, identity: str, label: str | None, name: str,
                 uuid: str) -> list[Action]:
        """Commit an authenticated registration (the shell has awaited the auth method)."""
        if client.closed:
            return []
        if client.identity is not None and client.identity != identity:
            # Same handshake headers, different verdict: never let a socket change owner.
            return [self.close(client, FORBIDDEN, "ForbiddenError: The client identity changed.")]
        actions: list[Action] = []
        holder = self.by_uuid.get(uuid)
        if holder is not None and holder is not client:
            if holder.identity != identity:
                return [self.close(client, FORBIDDEN, other_user_registration(uuid))]
            actions.append(self.close(holder, DUPLICATE, REASON_DUPLICATE))
        if client.uuid is not None and client.uuid != uuid and self.by_uuid.get(client.uuid) is client:
            del self.by_uuid[client.uuid]  # one UUID per socket: re-registering replaces it
        client.identity, client.identity_label = identity, label or identity
        client.name, client.uuid = name, uuid
        client.prefix = source_prefix(uuid, name)
        self.by_uuid[uuid] = client
        self.registrations += 1
        client.messages_out += 1
        actions.append(Send(client, REGISTERED_REPLY))
        return actions

    def auth_failed(self, client: Client, code: int, reason: str) -> list[Action]:
        return [self.close(client, code, reason)]

    # -- views ---------------------------------------------------------------------------------

    @property
    def registered(self) -> int:
        return len(self.by_uuid)

    def clients(self) -> list[Client]:
        return sorted(self.by_uuid.values(), key=lambda c: (c.name or "", c.uuid or ""))
