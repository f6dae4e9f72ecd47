"""The relay cluster when things break: forged bus messages, a SIGKILLed node, Redis restarting
or gone. Real relayd nodes, a real redis-server, a real HAProxy; no sleeps as synchronisation."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import redis
import websockets
from proxystore.p2p.relay.client import RelayClient
from proxystore.p2p.relay.messages import PeerConnectionRequest

import configs
from haproxy_front import HAProxyFront
from relay_cluster_helpers import await_until, start_cluster


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def offer(src: RelayClient, peer: uuid.UUID, text: str = "hello") -> PeerConnectionRequest:
    return PeerConnectionRequest(src.uuid, src.name, peer, "offer", text)


def not_registered(peer) -> str:
    return (f"Cannot forward peer connection message to peer {peer} because this peer is not "
            "registered this relay server.")


@pytest.fixture
def two_nodes(tmp_path, redis_server):
    cluster = start_cluster(tmp_path, redis_server.url, 2, extra="max_message_bytes = 2000")
    yield cluster
    cluster.stop()


# -- hostile messages on the bus ----------------------------------------------------------------------


def deliver(**overrides) -> dict:
    envelope = {"type": "deliver", "from": "node1", "identity": "anonymous",
                "source_uuid": str(uuid.uuid4()), "source_name": "x", "peer_uuid": str(uuid.uuid4()),
                "description_type": "offer", "description": "d", "error": None}
    envelope.update(overrides)
    return envelope


def test_forged_and_malformed_bus_messages_are_dropped_with_a_log(two_nodes, redis_server):
    node0, node1 = two_nodes.nodes

    async def main():
        async with RelayClient(node0.url, client_name="target", reconnect_task=False) as target, \
                RelayClient(node1.url, client_name="sender", reconnect_task=False) as sender:
            channel = "relayd:relay:node:node0"
            bus = redis.Redis(port=redis_server.port)
            aimed = str(target.uuid)
            forged = [
                "node1\n" + json.dumps(deliver(peer_uuid=aimed)),  # addressed to another node
                "node0",  # no body
                "node0\nnot json",
                "node0\n[1, 2]",
                "node0\n" + json.dumps({"type": "teleport", "from": "node1"}),  # unknown type
                "node0\n" + json.dumps(deliver(peer_uuid=aimed, **{"from": "../evil node"})),
                "node0\n" + json.dumps(deliver(peer_uuid=aimed, description="x" * 2001)),  # over max_message_bytes
                "node0\n" + json.dumps(deliver(peer_uuid=aimed, description="x" * (3 * 2**20))),  # over any limit
                "node0\n" + json.dumps(deliver(peer_uuid=aimed, description_type="bogus")),
                "node0\n" + json.dumps(deliver(peer_uuid=aimed.upper())),  # not canonical
                "node0\n" + json.dumps(deliver(peer_uuid=aimed, identity=5)),
                "node0\n" + json.dumps({"type": "evict", "from": "node1", "uuid": aimed}),  # no conn
                "node0\n" + json.dumps({"type": "echo", "from": "node1"}),
                b"node0\n\xff\xfe binary",
            ]
            for data in forged:
                assert bus.publish(channel, data) == 1
            # then a real message from the other node: it arrives, the node survived all of the above
            await sender.send(offer(sender, target.uuid, "real"))
            got = await target.recv()
            assert (got.source_uuid, got.description) == (sender.uuid, "real")
            status = await asyncio.to_thread(node0.relay)
            assert status["cluster"]["dropped"] == len(forged), status
            assert status["cluster"]["received"] == 1
            assert target._websocket.close_code is None  # the forged evict closed nothing
            bus.close()
        assert "cluster: dropped a message" in node0.process.log
        assert "Traceback" not in node0.process.log

    run(main())


# -- identity isolation across nodes (Globus, the local fake) --------------------------------------------


def test_identity_isolation_and_uuid_ownership_across_nodes(tmp_path, redis_server, fake_globus):
    scope = f"https://auth.globus.org/scopes/{fake_globus.client_id}/relay_all"
    auth = configs.globus_auth(fake_globus, [scope])
    cluster = start_cluster(tmp_path, redis_server.url, 2, auth=auth)
    node0, node1 = cluster.nodes
    alice_sub, bob_sub = str(uuid.uuid4()), str(uuid.uuid4())

    def headers(sub: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {fake_globus.issue_token(sub=sub, scopes=[scope])}"}

    async def main():
        async with RelayClient(node0.url, client_name="alice", extra_headers=headers(alice_sub),
                               reconnect_task=False) as alice, \
                RelayClient(node1.url, client_name="alice2", extra_headers=headers(alice_sub),
                            reconnect_task=False) as alice2, \
                RelayClient(node1.url, client_name="bob", extra_headers=headers(bob_sub),
                            reconnect_task=False) as bob:
            # same identity on another node: delivered
            await alice.send(offer(alice, alice2.uuid, "mine"))
            assert (await alice2.recv()).description == "mine"
            # another identity on another node: echoed with the single node's text, never delivered
            await alice.send(offer(alice, bob.uuid, "not yours"))
            echo = await alice.recv()
            assert echo.error == f"The requested peer {bob.uuid} is owned by a different user."
            # bob may not take alice's UUID on any node
            thief = RelayClient(node1.url, client_uuid=alice.uuid, extra_headers=headers(bob_sub),
                                reconnect_task=False)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await thief.connect(retry=False)
            assert closed.value.rcvd.code == 4002
            assert closed.value.rcvd.reason == (
                f"ForbiddenError: The client UUID {alice.uuid} is already registered to another user.")
            # and alice is still reachable
            await alice2.send(offer(alice2, alice.uuid, "still there"))
            assert (await alice.recv()).description == "still there"

    try:
        run(main())
    finally:
        cluster.stop()


# -- a node dies ------------------------------------------------------------------------------------------


def test_sigkilled_node_clients_reconnect_through_haproxy_and_are_reachable(tmp_path, redis_server):
    cluster = start_cluster(tmp_path, redis_server.url, 3)
    front = HAProxyFront(tmp_path, [n.port for n in cluster.nodes])
    address = f"ws://{front.address}"

    def node_of(client: RelayClient):
        for node in cluster.nodes:
            if node.process.process.poll() is None and any(r["uuid"] == str(client.uuid) for r in node.clients()):
                return node
        return None

    async def main():
        # reconnect_task=True: RelayClient's own reconnection, as endpoints use it
        clients = [RelayClient(address, client_name=f"c{i}") for i in range(6)]
        for client in clients:
            await client.connect()
        placement = {c.uuid: await asyncio.to_thread(node_of, c) for c in clients}
        victim_node = placement[clients[0].uuid]
        victims = [c for c in clients if placement[c.uuid] is victim_node]
        survivor = next(c for c in clients if placement[c.uuid] is not victim_node)
        # a client that will not come back: its stale entry must not swallow messages
        stale = RelayClient(victim_node.url, client_name="stale", reconnect_task=False)
        await stale.connect()
        victim_node.kill()  # SIGKILL
        # each victim comes back on a surviving node through HAProxy and is reachable again
        for victim in victims:
            assert await await_until(lambda v=victim: (node_of(v) or victim_node) is not victim_node, 60)
            await survivor.send(offer(survivor, victim.uuid, f"welcome back {victim.name}"))
            got = await asyncio.wait_for(victim.recv(), 20)
            assert got.description == f"welcome back {victim.name}"
        # the stale registration answers "not registered" (PUBLISH finds no subscriber), not silence
        for attempt in range(50):
            await survivor.send(offer(survivor, stale.uuid, f"stale {attempt}"))
            echo = await asyncio.wait_for(survivor.recv(), 20)
            assert echo.description == f"stale {attempt}"
            if echo.error == not_registered(stale.uuid):
                break
        else:
            pytest.fail("messages to a dead node's client never got an answer")
        for client in clients:
            await client.close()

    try:
        run(main())
    finally:
        front.stop()
        cluster.stop()


# -- Redis restarts, or goes away --------------------------------------------------------------------------


def test_redis_restart_loses_no_registration_beyond_the_reconnect(two_nodes, redis_server):
    node0, node1 = two_nodes.nodes

    async def main():
        async with RelayClient(node0.url, client_name="a", reconnect_task=False) as a, \
                RelayClient(node1.url, client_name="b", reconnect_task=False) as b:
            await a.send(offer(a, b.uuid, "before"))
            assert (await b.recv()).description == "before"
            await asyncio.to_thread(redis_server.restart)  # empty again: no persistence
            # both nodes say they are back only after claiming their clients again
            assert await await_until(two_nodes.cluster_up, 30)
            keys = redis_server.command("--raw", "keys", "relayd:relay:uuid:*").split()
            assert sorted(keys) == sorted(f"relayd:relay:uuid:{c.uuid}" for c in (a, b))
            await a.send(offer(a, b.uuid, "after"))
            assert (await b.recv()).description == "after"
            await b.send(offer(b, a.uuid, "and back"))
            assert (await a.recv()).description == "and back"

    run(main())


def test_redis_down_serves_locally_errors_cross_node_and_recovers(two_nodes, redis_server):
    node0, node1 = two_nodes.nodes

    async def main():
        async with RelayClient(node0.url, client_name="a", reconnect_task=False) as a, \
                RelayClient(node0.url, client_name="a2", reconnect_task=False) as a2, \
                RelayClient(node1.url, client_name="b", reconnect_task=False) as b:
            await asyncio.to_thread(redis_server.stop)
            assert await await_until(lambda: not node0.status()["engines"]["cluster"]["up"], 30)
            assert await asyncio.to_thread(node0.healthz) == "degraded: cluster down\n"
            status = await asyncio.to_thread(node0.status)
            assert status["node"] == "node0" and status["degraded"] == ["cluster"]
            text = await asyncio.to_thread(lambda: node0.process.ctl("status").stdout)
            assert "cluster" in text and "redis://127.0.0.1" in text
            # local delivery still works
            await a.send(offer(a, a2.uuid, "local"))
            assert (await a2.recv()).description == "local"
            # a cross-node send gets the documented error at once
            await a.send(offer(a, b.uuid, "far"))
            echo = await a.recv()
            assert echo.description == "far"
            assert echo.error == (f"Cannot forward peer connection message to peer {b.uuid} because this "
                                  "relay node cannot reach the rest of the cluster; try again later.")
            assert 'relayd_relay_cluster_failed_total{component="relay"} 1.0' in node0.metrics()
            await asyncio.to_thread(redis_server.start)
            assert await await_until(two_nodes.cluster_up, 30)
            assert await asyncio.to_thread(node0.healthz) == "ok\n"
            await a.send(offer(a, b.uuid, "far again"))
            assert (await b.recv()).description == "far again"
            metrics = node0.metrics()
            assert 'relayd_relay_cluster_sent_total{component="relay"} 1.0' in metrics
            assert 'relayd_engine_up{' in metrics

    run(main())


# -- reload ------------------------------------------------------------------------------------------------


def test_reload_of_a_clustered_relay_keeps_it_reachable_from_other_nodes(tmp_path, redis_server):
    cluster = start_cluster(tmp_path, redis_server.url, 2, extra="max_message_bytes = 2000")
    node0, node1 = cluster.nodes

    async def main():
        a = RelayClient(node0.url, client_name="a")  # reconnects by itself after the 1001
        await a.connect()
        async with RelayClient(node1.url, client_name="b", reconnect_task=False) as b:
            old = a._websocket
            conf = node0.config_dir / "relayd.toml"
            conf.write_text(conf.read_text().replace("max_message_bytes = 2000", "max_message_bytes = 3000"))
            result = await asyncio.to_thread(node0.process.ctl, "reload")
            assert result.returncode == 0, result.stderr
            await old.wait_closed()
            assert old.protocol.close_rcvd.code == 1001
            assert await await_until(lambda: any(r["uuid"] == str(a.uuid) for r in node0.clients()), 30)
            assert await await_until(cluster.cluster_up, 30)
            await b.send(offer(b, a.uuid, "after reload"))
            got = await asyncio.wait_for(a.recv(), 20)
            assert got.description == "after reload"
        await a.close()

    try:
        run(main())
    finally:
        cluster.stop()
