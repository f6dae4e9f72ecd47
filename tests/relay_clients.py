"""Client-side steps the relay tests share, on one node or across a cluster: a peer_connection
offer, a registration by hand over a raw WebSocket, and the echo of a message to an unknown peer."""

from __future__ import annotations

import json
import uuid

from proxystore.p2p.relay.client import RelayClient
from proxystore.p2p.relay.messages import PeerConnectionRequest


def offer(src: RelayClient, peer: uuid.UUID, text: str = "hello", **kw) -> PeerConnectionRequest:
    return PeerConnectionRequest(src.uuid, src.name, peer, "offer", text, **kw)


async def raw_register(ws, name: str = "raw", client_uuid: str | None = None) -> str:
    client_uuid = client_uuid or str(uuid.uuid4())
    await ws.send(json.dumps({"name": name, "uuid": client_uuid, "message_type": "relay_registration"}))
    reply = json.loads(await ws.recv())
    assert reply == {"success": True, "message": None, "error": False, "message_type": "relay_response"}
    return client_uuid


async def unknown_peer_is_echoed_with_error(url: str) -> None:
    """A message to a peer no node knows comes back to its sender with proxystore-relay's error."""
    async with RelayClient(url, client_name="alice", reconnect_task=False) as alice:
        missing = uuid.uuid4()
        await alice.send(offer(alice, missing, "anyone there?"))
        echo = await alice.recv()
        assert echo.peer_uuid == missing and echo.description == "anyone there?"
        assert echo.error == (f"Cannot forward peer connection message to peer {missing} because this "
                              "peer is not registered this relay server.")
