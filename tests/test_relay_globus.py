"""The relay guarded by Globus Auth (the local fake of its introspection API), with RelayClient."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid

import pytest
import websockets
from proxystore.p2p.relay.client import RelayClient
from proxystore.p2p.relay.exceptions import RelayRegistrationError
from proxystore.p2p.relay.messages import PeerConnectionRequest

import configs
from relayd.testing import free_port

ALICE, BOB = str(uuid.uuid4()), str(uuid.uuid4())


@pytest.fixture
def globus_relay(relayd, fake_globus):
    port = free_port()
    scope = f"https://auth.globus.org/scopes/{fake_globus.client_id}/relay_all"
    daemon = relayd(configs.config(configs.globus_auth(fake_globus, [scope]), configs.listeners(relay=port),
                                   configs.relay(auth="globus")))
    daemon.url = f"ws://127.0.0.1:{port}"
    daemon.port = port
    daemon.token = lambda sub=ALICE, **kw: fake_globus.issue_token(sub=sub, scopes=[scope], **kw)
    return daemon


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def refused(address: str, headers: dict[str, str] | None, **kwargs) -> tuple[int, str]:
    """(code, reason) of the close that refused a RelayClient's registration."""
    client = RelayClient(address, extra_headers=headers, reconnect_task=False, **kwargs)
    try:
        await client.connect(retry=False)
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code, exc.rcvd.reason
    except RelayRegistrationError:  # a later close of a known-fatal code
        rcvd = client._websocket.protocol.close_rcvd
        return rcvd.code, rcvd.reason
    raise AssertionError("the registration was accepted")


def test_same_identity_two_tokens_can_talk(globus_relay):
    async def main():
        async with RelayClient(globus_relay.url, client_name="a", extra_headers=bearer(globus_relay.token()),
                               reconnect_task=False) as a, \
                RelayClient(globus_relay.url, client_name="b", extra_headers=bearer(globus_relay.token()),
                            reconnect_task=False) as b:
            await a.send(PeerConnectionRequest(a.uuid, "a", b.uuid, "offer", "hi"))
            assert (await b.recv()).description == "hi"
            rows = json.loads(globus_relay.ctl("clients", "relay", "--json").stdout)["clients"]
            assert {r["identity"] for r in rows} == {"alice@example.org"}

    run(main())


def test_other_identity_is_isolated(globus_relay):
    async def main():
        async with RelayClient(globus_relay.url, client_name="a", extra_headers=bearer(globus_relay.token()),
                               reconnect_task=False) as alice, \
                RelayClient(globus_relay.url, client_name="b",
                            extra_headers=bearer(globus_relay.token(BOB, username="bob@example.org")),
                            reconnect_task=False) as bob:
            await bob.send(PeerConnectionRequest(bob.uuid, "b", alice.uuid, "offer", "psst"))
            echo = await bob.recv()
            assert echo.error == f"The requested peer {alice.uuid} is owned by a different user."
            # Bob cannot evict Alice by registering her UUID
            code, reason = await refused(globus_relay.url, bearer(globus_relay.token(BOB)), client_uuid=alice.uuid)
            assert code == 4002 and "already registered to another user" in reason
            await alice.send(PeerConnectionRequest(alice.uuid, "a", alice.uuid, "offer", "still mine"))
            assert (await alice.recv()).description == "still mine"

    run(main())


def test_inactive_wrong_audience_missing_and_malformed(globus_relay, fake_globus):
    async def main():
        revoked = globus_relay.token()
        fake_globus.revoke(revoked)
        code, reason = await refused(globus_relay.url, bearer(revoked))
        assert code == 4002 and reason.startswith("ForbiddenError: ")
        # the stock relay's reason is too long here and it sends 1011 (retried forever): not us
        code, reason = await refused(globus_relay.url, bearer(globus_relay.token(audience="someone-else")))
        assert code == 4002 and "audience" in reason and len(reason.encode()) <= 123
        code, reason = await refused(globus_relay.url, None)
        assert code == 4001 and reason.startswith("UnauthorizedError: ")
        code, _ = await refused(globus_relay.url, {"Authorization": globus_relay.token()})  # no scheme
        assert code == 4001

    run(main())


def test_globus_outage_is_retryable_1013(globus_relay, fake_globus):
    fake_globus.down = True

    async def main():
        async with websockets.connect(globus_relay.url, additional_headers=bearer(globus_relay.token())) as ws:
            await ws.send(json.dumps({"name": "x", "uuid": str(uuid.uuid4()), "message_type": "relay_registration"}))
            await ws.wait_closed()
            assert ws.protocol.close_rcvd.code == 1013  # not in RelayClient's fatal set: it retries

    run(main())


def test_introspection_does_not_block_other_clients(globus_relay, fake_globus):
    async def main():
        async with RelayClient(globus_relay.url, client_name="a", extra_headers=bearer(globus_relay.token()),
                               reconnect_task=False) as a:
            fake_globus.hold()  # the next introspection hangs
            try:
                slow = await websockets.connect(globus_relay.url, additional_headers=bearer(globus_relay.token()))
                await slow.send(json.dumps({"name": "s", "uuid": str(uuid.uuid4()),
                                            "message_type": "relay_registration"}))
                for i in range(5):  # meanwhile the relay keeps serving
                    await a.send(PeerConnectionRequest(a.uuid, "a", a.uuid, "offer", f"m{i}"))
                    assert (await a.recv()).description == f"m{i}"
            finally:
                fake_globus.release()
            assert json.loads(await slow.recv())["success"] is True
            await slow.close()

    run(main())


def test_discovery_document(globus_relay, fake_globus):
    with urllib.request.urlopen(f"http://127.0.0.1:{globus_relay.port}/.well-known/relayd", timeout=10) as r:
        body = json.loads(r.read())
    [entry] = body["auth"]
    assert entry["method"] == "globus" and fake_globus.client_secret not in json.dumps(body)
