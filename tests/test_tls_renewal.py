"""Certificate renewal by reload for every component kind: with the configuration unchanged,
replacing cert and key then reloading serves the new certificate to new connections, and a
connection opened before keeps working (the listener pool owns the TLS contexts)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl

import grpc
import pytest
import trustme
import websockets

import configs
import scistream_pb2_grpc as pb_grpc
from relayd.testing import free_port, start_relayd, write_config
from stream_helpers import pb, port_range
from test_http_proxy import Upstream

KINDS = ("relay", "status", "web", "ctl")


def _common_name(context: ssl.SSLContext, port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return dict(item[0] for item in tls.getpeercert()["subject"])["commonName"]


def _client(ca: trustme.CA, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


@pytest.fixture
def ca():
    return trustme.CA()


def _issue(ca: trustme.CA, name: str, cert, key) -> None:
    issued = ca.issue_cert("127.0.0.1", common_name=name)
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))


def test_every_component_serves_the_renewed_certificate_after_reload(tmp_path, ca):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    _issue(ca, "first", cert, key)
    ports = {k: free_port() for k in KINDS}
    s2cs = port_range(4)
    with Upstream() as upstream:
        tls = {"cert": str(cert), "key": str(key)}
        config = configs.config(
            configs.auth(open="none"), *(configs.listener(k, ports[k], tls=tls) for k in KINDS),
            configs.relay(), configs.status(), configs.http_proxy("proxy", auth="open"),
            configs.service("proxy", "acme", upstream.url, listeners=["web"]), configs.stream("s2cs", ports=s2cs))
        daemon = start_relayd(tmp_path, write_config(tmp_path / "etc", config))
        client = _client(ca)
        h2 = _client(ca, ["h2"])
        try:
            for kind in KINDS:
                assert _common_name(h2 if kind == "ctl" else client, ports[kind]) == "first", kind

            # connections opened before the renewal
            status_conn = http.client.HTTPSConnection("127.0.0.1", ports["status"], timeout=10, context=client)
            status_conn.request("GET", "/healthz")
            assert status_conn.getresponse().read()
            web_conn = http.client.HTTPSConnection("127.0.0.1", ports["web"], timeout=10, context=client)
            web_conn.request("GET", "/acme/before")
            response = web_conn.getresponse()
            assert response.status == 200 and response.read()
            channel = grpc.secure_channel(f"127.0.0.1:{ports['ctl']}",
                                          grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes()))
            control = pb_grpc.ControlStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                control.release(pb.Release(uid="none-yet"), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            async def relay_session() -> None:
                async with websockets.connect(f"wss://127.0.0.1:{ports['relay']}", ssl=client) as ws:
                    peer = ws.transport.get_extra_info("peercert")
                    assert dict(i[0] for i in peer["subject"])["commonName"] == "first"
                    await asyncio.to_thread(renew)
                    await ws.send(json.dumps({"name": "a", "uuid": "22222222-2222-2222-2222-222222222222",
                                              "message_type": "relay_registration"}))
                    assert json.loads(await ws.recv())["success"] is True

            def renew() -> None:
                _issue(ca, "second", cert, key)
                result = daemon.ctl("reload")
                assert result.returncode == 0, result.stderr + result.stdout
                assert "no changes" in daemon.log  # the configuration did not change

            asyncio.run(asyncio.wait_for(relay_session(), 60))  # renews while the relay connection is open

            for kind in KINDS:
                assert _common_name(h2 if kind == "ctl" else client, ports[kind]) == "second", kind
            # the connections opened before still work, with the certificate they had
            status_conn.request("GET", "/healthz")
            assert status_conn.getresponse().read()
            assert dict(i[0] for i in status_conn.sock.getpeercert()["subject"])["commonName"] == "first"
            web_conn.request("GET", "/acme/after")
            response = web_conn.getresponse()
            assert response.status == 200 and response.read()
            assert dict(i[0] for i in web_conn.sock.getpeercert()["subject"])["commonName"] == "first"
            with pytest.raises(grpc.RpcError) as info:
                control.release(pb.Release(uid="still-none"), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            channel.close()
            status_conn.close()
            web_conn.close()
        finally:
            daemon.kill()


def test_a_broken_renewal_is_rejected_and_the_old_certificate_kept(tmp_path, ca):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    _issue(ca, "first", cert, key)
    port = free_port()
    config = configs.config(configs.listener("status", port, tls={"cert": str(cert), "key": str(key)}),
                            configs.status())
    daemon = start_relayd(tmp_path, write_config(tmp_path / "etc", config))
    try:
        other = trustme.CA().issue_cert("127.0.0.1", common_name="mismatch")
        other.cert_chain_pems[0].write_to_path(str(cert))  # the key no longer matches
        result = daemon.ctl("reload")
        assert result.returncode != 0 and "cannot load TLS certificate/key" in result.stdout + result.stderr
        assert _common_name(_client(ca), port) == "first"
        _issue(ca, "second", cert, key)
        assert daemon.ctl("reload").returncode == 0
        assert _common_name(_client(ca), port) == "second"
    finally:
        daemon.kill()
