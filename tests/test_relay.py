"""The relay component end to end: a real relayd, proxystore's own RelayClient, raw WebSockets."""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from pathlib import Path

import pytest
import websockets
from proxystore.p2p.relay.client import RelayClient
from proxystore.p2p.relay.exceptions import RelayRegistrationError
from proxystore.p2p.relay.messages import PeerConnectionRequest

from polling import wait_until
from relay_clients import offer, raw_register, unknown_peer_is_echoed_with_error
from relayd.testing import free_port, start_relayd, write_config

PORTS = {name: free_port() for name in ("open", "limited", "tight", "slow", "keep")}


def relay_config(ports: dict[str, int], extra: str = "") -> str:
    return f"""
        [auth.open]
        method = "none"
        [listeners.open]
        bind = "127.0.0.1:{ports['open']}"
        [listeners.limited]
        bind = "127.0.0.1:{ports['limited']}"
        [listeners.tight]
        bind = "127.0.0.1:{ports['tight']}"
        [listeners.slow]
        bind = "127.0.0.1:{ports['slow']}"
        [listeners.keep]
        bind = "127.0.0.1:{ports.get('keep', 1)}"
        [components.relay]
        kind = "relay"
        listener = "open"
        auth = "open"
        current_clients_interval = "200ms"
        [components.limited]
        kind = "relay"
        listener = "limited"
        auth = "open"
        max_message_bytes = 300
        max_messages_per_second = 5
        [components.tight]
        kind = "relay"
        listener = "tight"
        auth = "open"
        max_clients = 2
        register_timeout = "300ms"
        open_timeout = "300ms"
        [components.slow]
        kind = "relay"
        listener = "slow"
        auth = "open"
        send_buffer_bytes = 65536
        [components.keep]
        kind = "relay"
        listener = "keep"
        auth = "open"
        keepalive_interval = "3s"  # pong window 1.5s: generous on a busy CI box
        {extra}
    """


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("relay")
    proc = start_relayd(tmp, write_config(tmp / "etc", relay_config(PORTS)))
    yield proc
    proc.kill()


def url(name: str = "open") -> str:
    return f"ws://127.0.0.1:{PORTS[name]}"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def closed_with(ws) -> tuple[int | None, str | None]:
    await ws.wait_closed()
    rcvd = ws.protocol.close_rcvd
    return (rcvd.code, rcvd.reason) if rcvd else (None, None)


def registered(daemon, component: str = "relay") -> list[dict]:
    result = daemon.ctl("clients", component, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["clients"]


# -- compatibility with the real RelayClient ------------------------------------------------------


def test_register_and_forward_both_ways(daemon):
    async def main():
        async with RelayClient(url(), client_name="alice", reconnect_task=False) as alice, \
                RelayClient(url(), client_name="bob", reconnect_task=False) as bob:
            await alice.send(offer(alice, bob.uuid, "offer from alice"))
            got = await bob.recv()
            assert (got.source_uuid, got.source_name, got.peer_uuid) == (alice.uuid, "alice", bob.uuid)
            assert (got.description_type, got.description, got.error) == ("offer", "offer from alice", None)
            await bob.send(PeerConnectionRequest(bob.uuid, "bob", alice.uuid, "answer", "answer from bob"))
            got = await alice.recv()
            assert (got.source_uuid, got.description_type, got.description) == (bob.uuid, "answer", "answer from bob")
            rows = {r["uuid"]: r for r in registered(daemon)}
            assert rows[str(alice.uuid)]["name"] == "alice"
            assert rows[str(alice.uuid)]["identity"] == "anonymous"
            assert rows[str(alice.uuid)]["messages_in"] == 2  # registration + offer
            assert rows[str(alice.uuid)]["messages_out"] == 2  # reply + answer
            assert rows[str(bob.uuid)]["connected_since"].endswith("Z")
        assert wait_until(lambda: registered(daemon) == [])

    run(main())


def test_unknown_peer_is_echoed_with_error(daemon):
    run(unknown_peer_is_echoed_with_error(url()))


def test_exact_wire_format_and_no_source_spoofing(daemon):
    async def main():
        async with websockets.connect(url()) as a, websockets.connect(url()) as b:
            a_uuid = await raw_register(a, "alice")
            b_uuid = (await raw_register(b, "bob", str(uuid.uuid4()).upper().replace("-", "")))
            b_canonical = str(uuid.UUID(b_uuid))
            spoofed = str(uuid.uuid4())
            await a.send(json.dumps({"source_uuid": spoofed, "source_name": "mallory", "peer_uuid": b_uuid,
                                     "description_type": "offer", "description": "h\u00e9",
                                     "message_type": "peer_connection"}))
            text = await b.recv()
            assert text == (f'{{"source_uuid": "{a_uuid}", "source_name": "alice", "peer_uuid": '
                            f'"{b_canonical}", "description_type": "offer", "description": "h\\u00e9", '
                            '"error": null, "message_type": "peer_connection"}')

    run(main())


def test_duplicate_uuid_closes_the_old_connection_with_4004(daemon):
    async def main():
        first = RelayClient(url(), client_name="one", reconnect_task=False)
        await first.connect()
        second = RelayClient(url(), client_name="two", client_uuid=first.uuid, reconnect_task=False)
        await second.connect()
        old = first._websocket  # .websocket raises once closed
        await old.wait_closed()
        assert old.protocol.close_rcvd.code == 4004
        assert old.protocol.close_rcvd.reason.startswith("Relay received a registration with the same ID")
        with pytest.raises(RelayRegistrationError):  # RelayClient treats 4004 as fatal
            await first.connect()
        rows = registered(daemon)
        assert [(r["uuid"], r["name"]) for r in rows] == [(str(first.uuid), "two")]
        await second.close()

    run(main())


def test_reregistering_on_the_same_socket_replaces_the_uuid(daemon):
    async def main():
        async with websockets.connect(url()) as ws:
            first = await raw_register(ws, "x")
            second = await raw_register(ws, "y")
            assert [r["uuid"] for r in registered(daemon)] == [second]
            assert first != second
        assert wait_until(lambda: registered(daemon) == [])

    run(main())


@pytest.mark.parametrize("frame", [
    b"\x00binary",
    "not json",
    "[1, 2]",
    "null",
    '{"message_type": "RelayRegistrationRequest", "name": "x", "uuid": "%s"}' % uuid.uuid4(),
    '{"name": "x", "uuid": "%s"}' % uuid.uuid4(),
    '{"name": "x", "uuid": "not-a-uuid", "message_type": "relay_registration"}',
    '{"name": "x", "uuid": "%s", "extra": 1, "message_type": "relay_registration"}' % uuid.uuid4(),
    '{"success": true, "message": null, "error": false, "message_type": "relay_response"}',
])
def test_bad_messages_close_with_4000_and_unregister(daemon, frame):
    async def main():
        async with websockets.connect(url()) as ws:
            await raw_register(ws)
            await ws.send(frame)
            assert await closed_with(ws) == (4000, "Unknown message type.")
        assert wait_until(lambda: registered(daemon) == [])

    run(main())


def test_forward_before_registering_is_4002(daemon):
    async def main():
        async with websockets.connect(url()) as ws:
            await ws.send(json.dumps({"source_uuid": str(uuid.uuid4()), "source_name": "x",
                                      "peer_uuid": str(uuid.uuid4()), "description_type": "offer",
                                      "description": "d", "error": None, "message_type": "peer_connection"}))
            assert await closed_with(ws) == (
                4002, "ForbiddenError: Client has not registered and authenticated with the relay server.")

    run(main())


def test_message_bytes_are_utf8_bytes_and_4003_unregisters(daemon):
    async def main():
        async with websockets.connect(url("limited")) as ws:
            me = await raw_register(ws)
            # 60 characters of 4 UTF-8 bytes each: 240 + JSON overhead > 300 bytes, < 300 characters
            msg = json.dumps({"source_uuid": me, "source_name": "raw", "peer_uuid": me,
                              "description_type": "offer", "description": "\U0001F600" * 60,
                              "message_type": "peer_connection"}, ensure_ascii=False)
            assert len(msg) < 300 < len(msg.encode())
            await ws.send(msg)
            assert await closed_with(ws) == (4003, "Message length exceeds limit.")
        assert wait_until(lambda: registered(daemon, "limited") == [])

    run(main())


def test_message_rate_limit_is_4006(daemon):
    async def main():
        async with websockets.connect(url("limited")) as ws:
            me = await raw_register(ws)
            msg = json.dumps({"source_uuid": me, "source_name": "raw", "peer_uuid": me,
                              "description_type": "offer", "description": "x", "message_type": "peer_connection"})
            for _ in range(50):
                try:
                    await ws.send(msg)
                except websockets.ConnectionClosed:
                    break
            assert (await closed_with(ws))[0] == 4006
        assert wait_until(lambda: registered(daemon, "limited") == [])

    run(main())


def test_client_limit_is_4007_and_unregistered_sockets_time_out_with_4008(daemon):
    async def main():
        a = await websockets.connect(url("tight"))
        b = await websockets.connect(url("tight"))
        await raw_register(b)
        c = await websockets.connect(url("tight"))  # the handshake still succeeds (101)
        assert (await closed_with(c))[0] == 4007
        assert (await closed_with(a))[0] == 4008  # never registered
        assert b.close_code is None  # registered: no timeout
        await b.close()

    run(main())


def test_connections_that_never_handshake_are_dropped(daemon):
    async def main():
        reader, writer = await asyncio.open_connection("127.0.0.1", PORTS["tight"])
        assert await asyncio.wait_for(reader.read(), 20) == b""  # closed by relayd after open_timeout
        writer.close()

    run(main())


def test_slow_receiver_is_closed_with_4005_without_stalling_the_sender(daemon):
    async def main():
        # The receiver never reads: its socket buffers fill, then relayd's send buffer.
        reader, writer = await asyncio.open_connection("127.0.0.1", PORTS["slow"], limit=2**16)
        stalled = str(uuid.uuid4())
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        payload = json.dumps({"name": "stalled", "uuid": stalled, "message_type": "relay_registration"}).encode()
        writer.write(bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)  # zero mask
        await reader.readexactly(2 + len(
            '{"success": true, "message": null, "error": false, "message_type": "relay_response"}'))
        writer.transport.pause_reading()
        # max_queue=None: the sender reads everything, so it never becomes a slow receiver itself
        async with websockets.connect(url("slow"), max_queue=None) as sender:
            me = await raw_register(sender)
            big = json.dumps({"source_uuid": me, "source_name": "raw", "peer_uuid": stalled,
                              "description_type": "offer", "description": "x" * 60000,
                              "message_type": "peer_connection"})
            for sent in range(1, 2001):  # kernel buffers hold a few MB, then the relay's 64 KiB
                await sender.send(big)
                # (in a thread: the loop must keep reading the sender's socket meanwhile)
                if sent % 25 == 0 and not await asyncio.to_thread(registered_uuid, daemon, "slow", stalled):
                    break
            assert not await asyncio.to_thread(registered_uuid, daemon, "slow", stalled)
            # the sender was never stalled and still works: a message to the gone peer is echoed
            await sender.send(json.dumps({"source_uuid": me, "source_name": "raw", "peer_uuid": stalled,
                                          "description_type": "offer", "description": "last",
                                          "message_type": "peer_connection"}))
            async for text in sender:
                if json.loads(text)["description"] == "last":
                    assert "not registered" in json.loads(text)["error"]
                    break
        writer.close()
        status = json.loads(daemon.ctl("status", "--json").stdout)
        assert status["components"]["slow"]["closes"].get("4005") == 1

    run(main())


def test_keepalive_drops_a_client_that_never_answers_pings(daemon):
    async def main():
        async with websockets.connect(url("keep"), ping_interval=None) as alive:  # the library answers pings
            alive_uuid = await raw_register(alive, "alive")
            reader, writer = await asyncio.open_connection("127.0.0.1", PORTS["keep"])
            mute = str(uuid.uuid4())
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            payload = json.dumps({"name": "mute", "uuid": mute, "message_type": "relay_registration"}).encode()
            writer.write(bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            # read everything (the reply, then pings) but never answer: the relay must give up on us
            assert b'"success": true' in await reader.read(4096)
            while await reader.read(4096):
                pass
            writer.close()
            # relayctl runs in a thread: blocking this loop would keep `alive` from answering the
            # relay's pings (websockets answers them from this loop), and a busy machine could
            # then make the relay drop it too (this test flaked that way).
            assert not await asyncio.to_thread(registered_uuid, daemon, "keep", mute)
            # idle as long, but it answered
            assert await asyncio.to_thread(registered_uuid, daemon, "keep", alive_uuid)

    run(main())


def registered_uuid(daemon, component: str, client_uuid: str) -> bool:
    return any(r["uuid"] == client_uuid for r in registered(daemon, component))


def test_status_metrics_and_periodic_log(daemon):
    async def main():
        async with RelayClient(url(), client_name="logged", reconnect_task=False) as c:
            def relay_status():
                return json.loads(daemon.ctl("status", "--json").stdout)["components"]["relay"]

            # The daemon is shared by this module: earlier tests' clients may still be closing.
            def only_this_client():
                status = relay_status()
                return status["clients"] == 1 and status["connections"] == 1

            assert wait_until(only_this_client), relay_status()
            text = daemon.ctl("metrics").stdout
            assert 'relayd_relay_clients{component="relay"} 1.0' in text
            assert 'relayd_relay_forwarded_total{component="relay"}' in text
            assert wait_until(lambda: f"'logged' uuid={c.uuid}" in daemon.log)
            assert "Connected clients: 1" in daemon.log
            table = daemon.ctl("clients", "relay").stdout
            assert "logged" in table and str(c.uuid) in table

    run(main())


def test_plain_http_gets_a_hint_not_a_crash(daemon):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{PORTS['open']}/", timeout=10)
    assert err.value.code == 426


def test_any_path_is_accepted(daemon):
    async def main():
        async with websockets.connect(url() + "/some/path") as ws:
            await raw_register(ws)

    run(main())


# -- TLS, reload, shutdown (own daemons) -----------------------------------------------------------


def test_tls_with_a_certificate_made_here(relayd, tmp_path: Path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    port = free_port()
    relayd(f"""
        [auth.open]
        method = "none"
        [listeners.wss]
        bind = "127.0.0.1:{port}"
        tls = {{ cert = "{tmp_path / 'server.pem'}", key = "{tmp_path / 'server.pem'}" }}
        [components.relay]
        kind = "relay"
        listener = "wss"
        auth = "open"
    """)
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))

    async def main():
        address = f"wss://localhost:{port}"
        async with RelayClient(address, client_name="a", ssl_context=context, reconnect_task=False) as a, \
                RelayClient(address, client_name="b", ssl_context=context, reconnect_task=False) as b:
            await a.send(offer(a, b.uuid, "over tls"))
            assert (await b.recv()).description == "over tls"
        untrusted = RelayClient(address, reconnect_task=False)
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusted.connect(retry=False)

    run(main())


def test_reload_keeps_an_unchanged_relays_connections(relayd, tmp_path: Path):
    ports = {name: free_port() for name in ("open", "limited", "tight", "slow", "keep")}
    daemon = relayd(relay_config(ports))

    async def main():
        a = RelayClient(f"ws://127.0.0.1:{ports['open']}", client_name="a", reconnect_task=False)
        changed = RelayClient(f"ws://127.0.0.1:{ports['limited']}", client_name="c", reconnect_task=False)
        auto = RelayClient(f"ws://127.0.0.1:{ports['limited']}", client_name="auto")  # reconnects by itself
        await a.connect()
        await changed.connect()
        await auto.connect()
        kept = a._websocket
        conf = daemon.config_dir / "relayd.toml"
        conf.write_text(conf.read_text().replace("max_message_bytes = 300", "max_message_bytes = 400"))
        result = daemon.ctl("reload")
        assert result.returncode == 0, result.stderr
        assert "components.limited" in result.stdout and "components.relay" not in result.stdout
        # the unchanged relay kept the very connection; the changed one said 1001 and serves again
        await a.send(offer(a, a.uuid, "still here"))
        assert (await a.recv()).description == "still here"
        await changed._websocket.wait_closed()
        assert changed._websocket.protocol.close_rcvd.code == 1001
        assert a._websocket is kept
        # RelayClient's own reconnect task registers again with the new relay on the same port
        assert await asyncio.to_thread(wait_until, lambda: registered_uuid(daemon, "limited", str(auto.uuid)))
        again = RelayClient(f"ws://127.0.0.1:{ports['limited']}", client_uuid=changed.uuid, reconnect_task=False)
        await again.connect()
        await again.send(offer(again, auto.uuid, "after reload"))
        assert (await auto.recv()).description == "after reload"
        await again.close()
        await auto.close()
        await a.close()

    run(main())


def test_shutdown_closes_with_1001(relayd):
    port = free_port()
    daemon = relayd(f"""
        [auth.open]
        method = "none"
        [listeners.ws]
        bind = "127.0.0.1:{port}"
        [components.relay]
        kind = "relay"
        listener = "ws"
        auth = "open"
    """)

    async def main():
        async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
            await raw_register(ws)
            daemon.process.terminate()
            assert await closed_with(ws) == (1001, "Relay server shutting down.")

    run(main())
    assert daemon.process.wait(30) == 0
