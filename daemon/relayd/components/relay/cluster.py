"""The relay across nodes on Redis PUB/SUB ([cluster] redis): a registry and one channel per node.

Like Centrifugo's Redis engine, Redis is only a directory and a bus; every relay decision stays in
the sans-I/O core (protocol.py). Design (docs/scaling.md tells why):

* **Registry**: ``relayd:COMPONENT:uuid:UUID`` -> ``"NODE\\nCONN\\nIDENTITY"`` with a TTL that a
  per-node heartbeat refreshes; claimed at registration, deleted (if still ours) at disconnect.
* **Bus**: node N subscribes to ``relayd:COMPONENT:node:N``. A peer_connection for a peer not on
  this node runs FORWARD, a Lua script doing lookup, identity check and PUBLISH in one round trip;
  PUBLISH reaching no subscriber means the owner node is dead: the entry is deleted and the sender
  gets the single node's "not registered" echo, so a SIGKILLed node never black-holes messages.
* **Order**: every publish of a node goes through one FIFO outbox, sent in pipelined batches on one
  connection; the receiving node handles its channel in order: A -> B messages stay in order.
* **Envelopes** are ``DEST_NODE\\n{json}``; a node drops (and logs) any envelope not addressed to
  it, too big, not JSON, of an unknown type or with bad fields: Redis is a boundary too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from relayd.components.relay import protocol as p
from relayd.components.relay.cluster_inbox import (
    BATCH_BYTES,
    OUTBOX_LIMIT,
    ClusterInbox,
)
from relayd.components.relay.cluster_scripts import CLAIM, FORWARD, REFRESH, RELEASE
from relayd.engines import EngineHealth

HEARTBEAT = 5.0  # seconds between pings on the subscription (a half-open one is found within 3)
REFRESH_EVERY = 12  # heartbeats between registry refreshes: one GET+SET per client, so not often
# Seconds a registration outlives its node's last refresh. Only garbage collection: a dead node is
# found at once by the PUBLISH that reaches nobody, and a moved client's CLAIM replaces its entry.
TTL = 300
BACKOFF_FIRST, BACKOFF_CAP = 0.1, 5.0  # reconnect delays, doubled per failure, jittered
BATCH = 512  # outbox items per round trip


class ClusterBus(ClusterInbox):
    """One relay component's link to the other nodes; I/O only, decisions in ``core``."""

    def __init__(self, url: str, node: str, component: str, core: p.RelayCore,
                 execute: Callable[[Iterable[p.Action]], None], health: EngineHealth,
                 log: logging.Logger) -> None:
        self.node, self.core, self.execute, self.health, self.log = node, core, execute, health, log
        self.prefix = f"relayd:{component}:"
        self.channel_prefix = f"{self.prefix}node:"
        self.channel = self.channel_prefix + node
        # No retries inside redis-py: a failure must reach us, so that we resubscribe and resync.
        options: dict[str, Any] = {"retry": Retry(NoBackoff(), 0), "socket_connect_timeout": 3}
        self.redis = aioredis.from_url(url, socket_timeout=5, decode_responses=True, **options)
        # Blocking reads: no socket_timeout. Bytes: anyone may publish anything, even invalid
        # UTF-8, and redis-py's decoding error would cost us the subscription.
        self.subscriber = aioredis.from_url(url, **options)
        self.scripts = {name: self.redis.register_script(src) for name, src in
                        (("forward", FORWARD), ("claim", CLAIM), ("refresh", REFRESH), ("release", RELEASE))}
        self.outbox: deque[tuple] = deque()
        self.wakeup = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.up = False
        self.ignoring = False  # set while the component stops (see closing)
        self.shas: dict[str, str] = {}
        self.sent = self.received = self.failed = self.dropped = self.batches = 0
        self.tasks: list[asyncio.Task] = []

    def key(self, uuid: str) -> str:
        return f"{self.prefix}uuid:{uuid}"

    def value(self, client: p.Client, identity: str | None = None) -> str:
        """The registry entry of a connection: node, connection id, identity."""
        if not client.cluster_id:
            client.cluster_id = secrets.token_hex(8)
        # JSON-quoted: an identity never breaks the newline-separated formats
        return f"{self.node}\n{client.cluster_id}\n{json.dumps(identity or client.identity)}"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._connect_forever()), loop.create_task(self._send_forever())]

    def closing(self) -> None:
        """The component is being replaced (reload) or stopped: from now on ignore deliveries.
        Its successor subscribes to the same channel and has the clients; answering "not
        registered" here as well would give senders an error for a message that arrived."""
        self.ignoring = True

    async def stop(self, timeout: float = 2.0) -> None:
        """Send what is queued (the releases of the clients just closed), then disconnect."""
        self.ignoring = True
        if self.up and self.outbox:
            self.wakeup.set()
            try:
                await asyncio.wait_for(self._drained(), timeout)
            except TimeoutError:
                pass
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client in (self.redis, self.subscriber):
            try:
                await client.aclose()
            except Exception:  # closing a dead connection
                pass

    async def _drained(self) -> None:
        while self.outbox:
            await asyncio.sleep(0.01)

    # -- what the shell calls ----------------------------------------------------------------

    def forward(self, action: p.Remote) -> None:
        client = action.client
        if not self.up:
            self.failed += 1
            self.execute([self.core.echo(client, action.peer, action.description_type, action.description,
                                         p.cluster_unreachable_error(action.peer))])
            return
        envelope = json.dumps({"type": "deliver", "from": self.node, "identity": client.identity,
                               "source_uuid": client.uuid, "source_name": client.name,
                               "peer_uuid": action.peer, "description_type": action.description_type,
                               "description": action.description, "error": action.error})
        self._queue(("forward", action, envelope))

    async def wait_for_room(self) -> None:
        """Senders wait here while the outbox is full (Redis slower than they are)."""
        if len(self.outbox) >= OUTBOX_LIMIT:
            self.room.clear()
            await self.room.wait()

    async def claim(self, client: p.Client, identity: str, uuid: str) -> bool:
        """Take ``uuid`` for this connection; False if another identity holds it on any node.
        With Redis down the registration is local only, and claimed again on reconnection."""
        if not self.up:
            return True
        evict = json.dumps({"type": "evict", "from": self.node, "uuid": uuid})[:-1] + ', "conn": "'
        value = self.value(client, identity)
        try:
            result = await self.scripts["claim"](keys=[self.key(uuid)],
                                                 args=[value, json.dumps(identity), self.channel_prefix, TTL, self.node, evict])
        except (aioredis.RedisError, OSError) as exc:
            self.log.warning("cluster: could not claim %s (%s); registered on this node only", uuid, exc)
            return True
        return result != -1

    def release(self, client: p.Client, uuid: str) -> None:
        """The connection no longer holds ``uuid``: delete the entry unless another took it."""
        if self.up and client.cluster_id:
            self._queue(("release", self.key(uuid), self.value(client)))

    # -- sending ------------------------------------------------------------------------------

    async def _send_forever(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.outbox:
                batch: list[tuple] = []
                size = 0
                while self.outbox and len(batch) < BATCH and size < BATCH_BYTES:
                    item = self.outbox.popleft()
                    batch.append(item)
                    size += len(item[2])
                if len(self.outbox) < OUTBOX_LIMIT // 2:
                    self.room.set()
                await self._send_batch(batch)

    async def _send_batch(self, batch: list[tuple]) -> None:
        """One round trip: every forward of the batch in one FORWARD call (redis-py costs about
        100 us per command, more than the relay's whole work on a message), the rest after it."""
        self.batches += 1
        forwards = [item[1] for item in batch if item[0] == "forward"]
        results: list[Any]
        if not self.up:
            results = [ConnectionError("cluster down")] * len(forwards)
        else:
            pipe = self.redis.pipeline(transaction=False)
            if forwards:
                pipe.execute_command("EVALSHA", self.shas["forward"], 0, self.channel_prefix, self.node,
                                     f"{self.prefix}uuid:", "\n".join(a.peer for a in forwards),
                                     "\n".join(json.dumps(a.client.identity) for a in forwards),
                                     "\n".join(item[2] for item in batch if item[0] == "forward"))
            echoes: dict[str, list[str]] = {}  # per node, in order: one PUBLISH each, like FORWARD's
            for item in batch:
                if item[0] == "release":
                    pipe.execute_command("EVALSHA", self.shas["release"], 1, item[1], item[2])
                elif item[0] == "echo":
                    echoes.setdefault(item[1], []).append(item[2])
            for node, envelopes in echoes.items():
                pipe.publish(self.channel_prefix + node, node + "\n" + "\n".join(envelopes))
            try:
                replies = await pipe.execute(raise_on_error=False)
                results = replies[0] if forwards else []
                if isinstance(results, Exception):
                    if "NOSCRIPT" in str(results):  # Redis restarted since we loaded the scripts
                        await self._load_scripts()
                    raise results
            except (aioredis.RedisError, OSError) as exc:
                results = [exc] * len(forwards)
        actions: list[p.Action] = []
        for action, result in zip(forwards, results):
            if result == 1:
                self.sent += 1
                continue
            if result == -1:
                error = p.other_user_error(action.peer)
            elif result == 0:
                error = p.not_registered_error(action.peer)
            else:
                self.failed += 1
                error = p.cluster_unreachable_error(action.peer)
            if not action.client.closed:
                actions.append(self.core.echo(action.client, action.peer, action.description_type,
                                              action.description, error))
        if actions:
            self.execute(actions)

    # -- connection, subscription, heartbeat --------------------------------------------------

    async def _connect_forever(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            try:
                await self._serve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # anything from Redis: report, back off, start again
                detail = f"{type(exc).__name__}: {exc}"
            else:
                detail = "connection closed"
            if self.up:
                delay = BACKOFF_FIRST  # it worked for a while: retry quickly
            self.up = False
            self.health.report(False, detail)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret
            delay = min(delay * 2, BACKOFF_CAP)

    async def _serve(self) -> None:
        pubsub = self.subscriber.pubsub()
        tasks: list[asyncio.Task] = []
        try:
            await pubsub.subscribe(self.channel)
            await self._load_scripts()
            loop = asyncio.get_running_loop()
            self.last_pong = loop.time()
            listener = loop.create_task(self._listen(pubsub))
            tasks.append(listener)
            # Claim every local client again: Redis may have restarted empty, or other nodes have
            # deleted our entries while our channel was gone.
            await self._resync()
            subscribers = (await self.redis.pubsub_numsub(self.channel))[0][1]
            self.up = True
            self.health.report(True, f"node {self.node}" + (
                f"; {subscribers} subscribers on its channel: is the node name unique?" if subscribers > 1 else ""))
            heartbeat = loop.create_task(self._heartbeat(pubsub))
            tasks.append(heartbeat)
            done, pending = await asyncio.wait({listener, heartbeat}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                task.result()  # raises what ended it
        finally:
            self.up = False
            for task in tasks:  # also when the resync failed: no listener left on a dead pubsub
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await pubsub.aclose()
            except Exception:
                pass

    async def _load_scripts(self) -> None:
        """The hot path calls EVALSHA itself (redis-py's Script in a pipeline costs a SCRIPT
        EXISTS round trip per batch): load the scripts into this Redis first."""
        self.shas = {name: await self.redis.script_load(script.script) for name, script in self.scripts.items()}

    async def _listen(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind = message.get("type")
            if kind == "message":
                self.on_envelope(message.get("data"))
            elif kind not in ("subscribe", "unsubscribe"):
                # our PING's answer (redis-py parses a decoded "PONG" into odd types: any will do)
                self.last_pong = loop.time()

    async def _heartbeat(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        beats = 0
        while True:
            await asyncio.sleep(HEARTBEAT)
            await pubsub.ping()  # answered on the subscription: proves our channel still works
            beats += 1
            if beats % REFRESH_EVERY == 0:
                await self._refresh()
            if loop.time() - self.last_pong > 3 * HEARTBEAT:
                raise ConnectionError("no answer on the subscription connection")

    def _local(self) -> list[p.Client]:
        return [c for c in self.core.by_uuid.values() if not c.closed]

    async def _resync(self) -> None:
        clients = self._local()
        if not clients:
            return
        pipe = self.redis.pipeline(transaction=False)
        for client in clients:
            evict = json.dumps({"type": "evict", "from": self.node, "uuid": client.uuid})[:-1] + ', "conn": "'
            await self.scripts["claim"](keys=[self.key(client.uuid or "")], client=pipe, args=[
                self.value(client), json.dumps(client.identity), self.channel_prefix, TTL, self.node, evict])
        results = await pipe.execute()
        refused = [c for c, r in zip(clients, results) if r == -1]
        self.execute([self.core.close(c, p.FORBIDDEN, p.other_user_registration(c.uuid or "")) for c in refused])
        self.log.info("cluster: %d registrations of this node claimed again", len(clients) - len(refused))

    async def _refresh(self) -> None:
        clients = self._local()
        for start in range(0, len(clients), 1000):
            chunk = clients[start:start + 1000]
            lost = await self.scripts["refresh"](keys=[self.key(c.uuid or "") for c in chunk],
                                                 args=[TTL] + [self.value(c) for c in chunk])
            victims = [chunk[i - 1] for i in lost if not chunk[i - 1].closed]
            if victims:
                self.log.info("cluster: %d UUIDs were registered again on other nodes", len(victims))
                self.execute([self.core.close(c, p.DUPLICATE, p.REASON_DUPLICATE) for c in victims])

    # -- views -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {"node": self.node, "up": self.up, "sent": self.sent, "received": self.received,
                "failed": self.failed, "dropped": self.dropped, "outbox": len(self.outbox), "round_trips": self.batches}
