"""The receiving side of the relay's cluster bus (relayd.components.relay.cluster): envelopes on
this node's channel are checked, since Redis is a boundary too, and handed to the sans-I/O core
in order; anything malformed is dropped with a log. Also the outbox every publish goes through."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from relayd.components.relay import protocol as p

BATCH_BYTES = 256 * 1024  # envelope bytes per round trip (a subscriber's Redis output buffer is 32 MiB)
OUTBOX_LIMIT = 2048  # queued messages past which senders wait: memory and queueing delay stay bounded
MAX_ENVELOPE = 2 * p.HARD_MAX_BYTES + 4096  # a 1 MiB description may double when JSON-escaped
MAX_PUBLISH = BATCH_BYTES + MAX_ENVELOPE  # one PUBLISH: a batch of envelopes
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_PEER_FIELDS = ("source_uuid", "source_name", "peer_uuid", "description_type", "description")


class ClusterInbox:
    """Part of ClusterBus, which makes these attributes in its constructor."""

    node: str
    core: p.RelayCore
    execute: Callable[[Iterable[p.Action]], None]
    log: logging.Logger
    channel: str
    ignoring: bool  # set while the component stops
    received: int
    dropped: int
    outbox: deque[tuple]
    wakeup: asyncio.Event

    def _queue(self, item: tuple) -> None:
        self.outbox.append(item)
        self.wakeup.set()

    def _drop(self, why: str, data: Any) -> None:
        self.dropped += 1
        if self.dropped <= 20 or self.dropped % 1000 == 0:  # a flood must not flood the journal
            self.log.warning("cluster: dropped a message on %s (%s; %d dropped so far): %.80r",
                             self.channel, why, self.dropped, data)

    def on_envelope(self, raw: Any) -> None:
        """One PUBLISH on our channel, ``DEST\\n`` then envelopes one a line: anything not
        well-formed is dropped with a log, the rest is handled in order."""
        if self.ignoring:
            return None
        if not isinstance(raw, bytes):
            return self._drop("not bytes", raw)
        if len(raw) > MAX_PUBLISH:
            return self._drop("oversize", raw[:80])
        try:
            data = raw.decode()
        except UnicodeDecodeError:
            return self._drop("not UTF-8", raw)
        dest, _, body = data.partition("\n")
        if dest != self.node:
            return self._drop(f"addressed to node {dest!r}", data)
        for line in body.split("\n"):
            self._one_envelope(line)

    def _one_envelope(self, data: str) -> None:
        if len(data) > MAX_ENVELOPE:
            return self._drop("oversize", data[:80])
        try:
            msg = p.parse_json(data)
        except (ValueError, RecursionError):
            return self._drop("not JSON", data)
        if type(msg) is not dict or type(msg.get("from")) is not str or not NODE_NAME.match(msg["from"]):
            return self._drop("no valid sender node", data)
        kind = msg.get("type")
        if kind == "deliver":
            return self._on_deliver(msg, data)
        if kind == "echo":
            return self._on_echo(msg, data)
        if kind == "evict":
            return self._on_evict(msg, data)
        return self._drop("unknown type", data)

    def _peer_fields(self, msg: dict[str, Any]) -> tuple[str, ...] | None:
        """The peer_connection fields of an envelope, if each has the type a client's must have."""
        try:
            values = tuple(msg[name] for name in _PEER_FIELDS)
            if (not all(type(v) is str for v in values) or type(msg["identity"]) is not str
                    or values[3] not in ("offer", "answer")
                    or (msg["error"] is not None and type(msg["error"]) is not str)
                    or p.canonical_uuid(values[0]) != values[0] or p.canonical_uuid(values[2]) != values[2]):
                return None
        except (KeyError, p.BadMessage):
            return None
        limit = self.core.max_message_bytes
        if limit is not None and len(values[4].encode("utf-8", "surrogatepass")) > limit:
            return None  # its sender's node would have refused the message
        return values

    def _on_deliver(self, msg: dict[str, Any], data: str) -> None:
        fields = self._peer_fields(msg)
        if fields is None:
            return self._drop("bad deliver fields", data)
        self.received += 1
        source_uuid, source_name, peer, description_type, description = fields
        result = self.core.deliver_remote(msg["identity"], source_uuid, source_name, peer, description_type,
                                          description, msg["error"])
        if type(result) is p.Send:
            self.execute([result])
            return
        # The peer left between lookup and delivery: the sender gets what one node would say.
        echo = dict(msg, type="echo", **{"from": self.node, "error": result})
        if len(self.outbox) >= OUTBOX_LIMIT:
            # Overloaded: drop the error reply rather than grow (the receive path cannot wait).
            return self._drop("echo not sent, outbox full", data)
        self._queue(("echo", msg["from"], json.dumps(echo)))

    def _on_echo(self, msg: dict[str, Any], data: str) -> None:
        fields = self._peer_fields(msg)
        if fields is None or type(msg["error"]) is not str:
            return self._drop("bad echo fields", data)
        client = self.core.by_uuid.get(fields[0])
        if client is not None and client.identity == msg["identity"]:
            self.execute([self.core.echo(client, fields[2], fields[3], fields[4], msg["error"])])

    def _on_evict(self, msg: dict[str, Any], data: str) -> None:
        uuid, conn = msg.get("uuid"), msg.get("conn")
        if type(uuid) is not str or type(conn) is not str:
            return self._drop("bad evict fields", data)
        client = self.core.by_uuid.get(uuid)
        if client is not None and client.cluster_id == conn and not client.closed:
            self.log.info("cluster: %s registered again on node %s: closing it here with 4004", uuid, msg["from"])
            self.execute([self.core.close(client, p.DUPLICATE, p.REASON_DUPLICATE)])
