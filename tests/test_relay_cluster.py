"""The relay across nodes: real relayd nodes sharing a real redis-server, behind a real HAProxy.

proxystore's own RelayClient on different nodes; every reply, error text and close code must be
what one node gives. The same tests also run against a single node ("single"), so a difference
between one node and a cluster shows as one parameter failing.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import websockets
from proxystore.p2p.relay.client import RelayClient
from proxystore.p2p.relay.exceptions import RelayRegistrationError
from proxystore.p2p.relay.messages import PeerConnectionRequest

from haproxy_front import HAProxyFront
from redis_server import RedisServer
from relay_clients import offer, raw_register, unknown_peer_is_echoed_with_error
from relay_cluster_helpers import start_cluster


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """Three nodes on one redis-server, behind one HAProxy (round robin)."""
    tmp = tmp_path_factory.mktemp("cluster")
    redis = RedisServer(tmp / "redis")
    redis.start()
    cluster = start_cluster(tmp, redis.url, 3, extra="max_message_bytes = 2000")
    front = HAProxyFront(tmp, [n.port for n in cluster.nodes])
    cluster.front = front
    cluster.redis = redis
    yield cluster
    front.stop()
    cluster.stop()
    redis.stop()


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    cluster = start_cluster(tmp, None, 1, extra="max_message_bytes = 2000")
    yield cluster
    cluster.stop()


@pytest.fixture(params=["single node", "3 nodes, one per client", "3 nodes behind HAProxy"])
def relay(request):
    """The URLs the first, second and third client of a test connect to: one node; each client on
    its own node (every exchange is cross-node); or all through the HAProxy front (round robin)."""
    if request.param == "single node":
        cluster = request.getfixturevalue("one_node")
        return [cluster.nodes[0].url] * 3
    cluster = request.getfixturevalue("three_nodes")
    if request.param == "3 nodes behind HAProxy":
        return [f"ws://{cluster.front.address}"] * 3
    return [node.url for node in cluster.nodes]


# -- the same behaviour on one node and across nodes ------------------------------------------------


def test_peer_connection_both_ways_across_nodes(relay):
    async def main():
        async with RelayClient(relay[0], client_name="alice", reconnect_task=False) as alice, \
                RelayClient(relay[1], client_name="bob", reconnect_task=False) as bob:
            for i in range(20):  # in order, both ways
                await alice.send(offer(alice, bob.uuid, f"offer {i}"))
            for i in range(20):
                got = await bob.recv()
                assert (got.source_uuid, got.source_name, got.peer_uuid) == (alice.uuid, "alice", bob.uuid)
                assert (got.description_type, got.description, got.error) == ("offer", f"offer {i}", None)
            await bob.send(PeerConnectionRequest(bob.uuid, "bob", alice.uuid, "answer", "answer from bob"))
            got = await alice.recv()
            assert (got.source_uuid, got.description_type, got.description) == (bob.uuid, "answer", "answer from bob")

    run(main())


def test_unknown_peer_gets_the_single_node_error(relay):
    run(unknown_peer_is_echoed_with_error(relay[2]))


def test_exact_wire_format_across_nodes(relay):
    async def main():
        async with websockets.connect(relay[0]) as a, websockets.connect(relay[1]) as b:
            a_uuid = await raw_register(a, "alice")
            b_uuid = await raw_register(b, "bob", str(uuid.uuid4()).upper().replace("-", ""))
            b_canonical = str(uuid.UUID(b_uuid))
            await a.send(json.dumps({"source_uuid": str(uuid.uuid4()), "source_name": "mallory",
                                     "peer_uuid": b_uuid, "description_type": "offer",
                                     "description": "h\u00e9 \"q\"", "message_type": "peer_connection"}))
            assert await b.recv() == (
                f'{{"source_uuid": "{a_uuid}", "source_name": "alice", "peer_uuid": "{b_canonical}", '
                '"description_type": "offer", "description": "h\\u00e9 \\"q\\"", "error": null, '
                '"message_type": "peer_connection"}')

    run(main())


def test_duplicate_uuid_across_nodes_closes_the_old_connection_with_4004(relay):
    async def main():
        first = RelayClient(relay[0], client_name="one", reconnect_task=False)
        await first.connect()
        second = RelayClient(relay[1], client_name="two", client_uuid=first.uuid, reconnect_task=False)
        await second.connect()
        old = first._websocket
        await old.wait_closed()
        assert old.protocol.close_rcvd.code == 4004
        assert old.protocol.close_rcvd.reason.startswith("Relay received a registration with the same ID")
        with pytest.raises(RelayRegistrationError):  # RelayClient treats 4004 as fatal
            await first.connect()
        # the UUID now reaches the second connection, from a third node
        async with RelayClient(relay[2], client_name="three", reconnect_task=False) as third:
            await third.send(offer(third, second.uuid, "to the new holder"))
            assert (await second.recv()).description == "to the new holder"
        await second.close()

    run(main())


def test_oversize_message_is_4003_on_any_node(relay):
    async def main():
        async with websockets.connect(relay[0]) as a:
            me = await raw_register(a)
            await a.send(json.dumps({"source_uuid": me, "source_name": "raw", "peer_uuid": str(uuid.uuid4()),
                                     "description_type": "offer", "description": "x" * 3000,
                                     "message_type": "peer_connection"}))
            await a.wait_closed()
            assert (a.close_code, a.close_reason) == (4003, "Message length exceeds limit.")

    run(main())


def test_real_relay_clients_through_haproxy(three_nodes):
    """Clients connecting to the one HAProxy address land on different nodes and still meet."""
    front = f"ws://{three_nodes.front.address}"

    async def main():
        clients = [RelayClient(front, client_name=f"c{i}", reconnect_task=False) for i in range(6)]
        for client in clients:
            await client.connect()
        try:
            placed = await asyncio.to_thread(lambda: {n.name: len(n.clients()) for n in three_nodes.nodes})
            assert all(count >= 1 for count in placed.values()), placed  # round robin: spread
            for src, dst in [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 0)]:
                await clients[src].send(offer(clients[src], clients[dst].uuid, f"{src}->{dst}"))
                got = await clients[dst].recv()
                assert (got.source_uuid, got.description) == (clients[src].uuid, f"{src}->{dst}")
        finally:
            for client in clients:
                await client.close()

    run(main())


@pytest.mark.parametrize("frame", [
    b"\x00binary",
    "not json",
    "[1, 2]",
    '{"name": "x", "uuid": "not-a-uuid", "message_type": "relay_registration"}',
    '{"success": true, "message": null, "error": false, "message_type": "relay_response"}',
])
def test_bad_messages_close_with_4000_and_the_uuid_is_gone_everywhere(relay, frame):
    async def main():
        async with websockets.connect(relay[0]) as ws, websockets.connect(relay[1]) as other:
            gone = await raw_register(ws)
            me = await raw_register(other)
            await ws.send(frame)
            await ws.wait_closed()
            assert (ws.close_code, ws.close_reason) == (4000, "Unknown message type.")
            # its registration is released on every node: others get "not registered"
            for attempt in range(100):
                await other.send(json.dumps({"source_uuid": me, "source_name": "raw", "peer_uuid": gone,
                                             "description_type": "offer", "description": str(attempt),
                                             "message_type": "peer_connection"}))
                echo = json.loads(await other.recv())
                if echo["error"] and "not registered" in echo["error"]:
                    break
            else:
                pytest.fail("the closed client's UUID still looked registered")

    run(main())


def test_forward_before_registering_is_4002(relay):
    async def main():
        async with websockets.connect(relay[1]) as ws:
            await ws.send(json.dumps({"source_uuid": str(uuid.uuid4()), "source_name": "x",
                                      "peer_uuid": str(uuid.uuid4()), "description_type": "offer",
                                      "description": "d", "error": None, "message_type": "peer_connection"}))
            await ws.wait_closed()
            assert (ws.close_code, ws.close_reason) == (
                4002, "ForbiddenError: Client has not registered and authenticated with the relay server.")

    run(main())


def test_reregistering_on_the_same_socket_releases_the_old_uuid_everywhere(relay):
    async def main():
        async with websockets.connect(relay[0]) as ws, websockets.connect(relay[1]) as other:
            first = await raw_register(ws, "x")
            second = await raw_register(ws, "y")
            me = await raw_register(other)
            for peer, expected in ((second, None), (first, "not registered")):
                await other.send(json.dumps({"source_uuid": me, "source_name": "raw", "peer_uuid": peer,
                                             "description_type": "offer", "description": "hi",
                                             "message_type": "peer_connection"}))
                if expected is None:
                    assert json.loads(await ws.recv())["peer_uuid"] == second
                else:
                    assert expected in json.loads(await other.recv())["error"]

    run(main())
