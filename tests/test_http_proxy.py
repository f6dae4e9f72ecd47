"""http_proxy end to end: a real relayd in front of a real aiohttp upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from relayd.cli.control_client import ControlClient
from relayd.testing import free_port

SEED_ACME = {
    "name": "acme-service",
    "description": "ACME service v1.42",
    "serverName": ["service.acme.com", "1.2.3.4"],
    "bindHttps": "0.0.0.0:443",
    "bindHttp": "0.0.0.0:80",
    "from": "/acme",
    "to": "http://127.0.0.1:10000",
    "cert": {"path": "/secure/acme/certs/server.cert", "keyPath": "/secure/acme/certs/server.key"},
}
CHUNK = 1 << 20
PATTERN = (bytes(range(251)) * (CHUNK // 251 + 1))[:CHUNK]  # misplaced bytes change the hash


# -- a real upstream ---------------------------------------------------------------------------

class Upstream:
    """An aiohttp app on 127.0.0.1 in its own thread and event loop."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_get("/big", self.big)
        app.router.add_post("/sink", self.sink)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/ws", self.ws)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"method": request.method, "path": request.path_qs,
                                  "headers": [[k, v] for k, v in request.headers.items()], "length": len(body)})

    async def big(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query["n"])
        response = web.StreamResponse(headers={"Content-Length": str(size)})
        await response.prepare(request)
        block = PATTERN
        sent = 0
        while sent < size:
            piece = block[: min(CHUNK, size - sent)]
            await response.write(piece)
            sent += len(piece)
        return response

    async def sink(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        total = 0
        async for piece in request.content.iter_chunked(CHUNK):
            digest.update(piece)
            total += len(piece)
        return web.json_response({"length": total, "sha256": digest.hexdigest()})

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "5")))  # the behaviour under test
        return web.Response(text="late")

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str("echo:" + message.data)
        return ws

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.runner = web.AppRunner(self.app(), access_log=None)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.ssl_context).start()

        self.loop.run_until_complete(start())
        self.started.set()
        self.loop.run_forever()

    def __enter__(self) -> Upstream:
        self.thread.start()
        assert self.started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            await self.runner.cleanup()  # type: ignore[union-attr]

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None, body=None,
            context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    if context is None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=30, context=context)
    try:
        chunked = any(k.lower() == "transfer-encoding" for k in (headers or {}))
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def echoed_headers(body: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in json.loads(body)["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def control(daemon, method: str, path: str, body=None) -> tuple[int, object]:
    return ControlClient(daemon.control_socket, 30).request(method, "/v1/components/web/" + path, body)


def proxy_config(port: int, to: str, *, auth: str = "open", service_extra: str = "", extra: str = "",
                 listeners: str = '["web"]') -> str:
    return f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [auth.open]
        method = "none"
        [auth.users]
        method = "basic"
        [components.web]
        kind = "http_proxy"
        auth = "{auth}"
        flush_interval = 0.2
        {extra}
        [components.web.services.acme]
        listeners = {listeners}
        from = "/acme"
        to = "{to}"
        {service_extra}
    """


# -- mapping, headers, errors ------------------------------------------------------------------

def test_prefix_mapping_query_and_forwarded_headers(relayd, port, upstream):
    relayd(proxy_config(port, upstream.url + "/base"))
    status, _, body = request(port, "GET", "/acme/register?x=1&y=%20", {
        "X-Forwarded-For": "10.0.0.1", "X-Forwarded-User": "mallory", "X_Forwarded_User": "mallory",
        "X-Forwarded-Email": "m@evil", "X-Forwarded-Host": "evil", "X-Forwarded-Proto": "gopher",
        "Authorization": "Bearer secret", "Connection": "keep-alive, X-Hop", "X-Hop": "1"})
    assert status == 200
    seen = json.loads(body)
    assert seen["path"] == "/base/register?x=1&y=%20"
    headers = echoed_headers(body)
    assert headers["x-forwarded-for"] == ["10.0.0.1, 127.0.0.1"]
    assert headers["x-forwarded-host"] == [f"127.0.0.1:{port}"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["forwarded"] == [f'for=127.0.0.1;host="127.0.0.1:{port}";proto=http']
    assert headers["host"] == [f"127.0.0.1:{upstream.port}"]
    for spoofed in ("x-forwarded-user", "x_forwarded_user", "x-forwarded-email", "authorization", "x-hop"):
        assert spoofed not in headers, spoofed
    assert json.loads(request(port, "GET", "/acme")[2])["path"] == "/base"
    assert json.loads(request(port, "GET", "/acme/")[2])["path"] == "/base/"
    status, headers, body = request(port, "GET", "/acmefoo")
    assert (status, json.loads(body)) == (404, {"message": "no service at this address"})
    assert headers["content-type"] == "application/json"
    status, _, body = request(port, "GET", "/acme/a/../../admin")
    assert status == 400 and "message" in json.loads(body)
    status, _, body = request(port, "GET", "/.well-known/relayd")
    assert status == 200 and json.loads(body)["auth"] == [{"name": "open", "method": "none"}]


def test_smuggling_shapes_are_refused(relayd, port, upstream):
    relayd(proxy_config(port, upstream.url))
    for raw in (
        b"POST /acme/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /acme/x HTTP/1.1\r\nHost: a\r\n folded: yes\r\n\r\n",
        b"GET /acme/x HTTP/1.1\r\nHost a\r\n\r\n",
        b"POST /acme/x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(raw)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 400 "), reply
        assert b'{"message": ' in reply


def test_upstream_refused_timeout_and_body_limit(relayd, port, upstream):
    dead = free_port()
    relayd(proxy_config(port, upstream.url, service_extra="read_timeout = 0.5\nmax_body = 1000", extra=f"""
        [components.web.services.dead]
        listeners = ["web"]
        from = "/dead"
        to = "http://127.0.0.1:{dead}"
    """))
    status, _, body = request(port, "GET", "/dead/x")
    assert status == 502 and "refused" in json.loads(body)["message"]
    status, _, body = request(port, "GET", "/acme/slow?delay=3")
    assert status == 504 and json.loads(body)["message"]
    status, _, body = request(port, "POST", "/acme/x", body=b"a" * 1001)
    assert status == 413 and "1000" in json.loads(body)["message"]

    def chunks():
        for _ in range(20):
            yield b"a" * 100

    status, _, body = request(port, "POST", "/acme/x", body=chunks(), headers={"Transfer-Encoding": "chunked"})
    assert status == 413
    status, _, body = request(port, "POST", "/acme/x", body=b"a" * 1000)
    assert status == 200 and json.loads(body)["length"] == 1000


def test_total_timeout(relayd, port, upstream):
    relayd(proxy_config(port, upstream.url, service_extra="total_timeout = 0.5\nread_timeout = 30"))
    status, _, body = request(port, "GET", "/acme/slow?delay=3")
    assert status == 504 and "in time" in json.loads(body)["message"]


def test_overlapping_prefixes_are_a_config_error(relayd, port, upstream, tmp_path):
    daemon = relayd(proxy_config(port, upstream.url))
    fragment = daemon.config_dir / "conf.d"
    fragment.mkdir(exist_ok=True)
    (fragment / "50-overlap.toml").write_text(f"""
[components.web.services.sub]
listeners = ["web"]
from = "/acme/sub"
to = "{upstream.url}"
""")
    result = daemon.ctl("reload")
    assert result.returncode == 1
    assert "components.web" in result.stderr and "overlap" in result.stderr
    (fragment / "50-overlap.toml").write_text(f"""
[components.web.services.other]
listeners = ["web"]
from = "/acmefoo"
to = "{upstream.url}"
""")
    assert daemon.ctl("reload").returncode == 0
    assert json.loads(request(port, "GET", "/acmefoo/z")[2])["path"] == "/z"


# -- users, auth, counters, management API -----------------------------------------------------

def test_basic_auth_members_counters_and_management_api(relayd, port, upstream):
    daemon = relayd(proxy_config(port, upstream.url, auth="users", service_extra="members_only = true"))
    status, headers, body = request(port, "GET", "/acme/x")
    assert status == 401 and headers["www-authenticate"].startswith('Basic realm="relayd"')
    assert json.loads(body)["message"]

    assert control(daemon, "POST", "services/acme/users", {"username": "alice", "password": "pw1"})[0] == 200
    status, body = control(daemon, "POST", "services/acme/users", {"username": "alice", "password": "pw1"})
    assert status == 409 and "already exists" in body["message"]
    assert control(daemon, "GET", "services/acme/users/nobody")[0] == 404
    assert request(port, "GET", "/acme/x", basic("alice", "wrong"))[0] == 401

    for i in range(5):
        status, _, body = request(port, "GET", f"/acme/p{i % 2}?q={i}", basic("alice", "pw1"))
        assert status == 200
        headers = echoed_headers(body)
        assert headers["x-forwarded-user"] == ["alice"] and "authorization" not in headers
    status, _, _ = request(port, "POST", "/acme/up", basic("alice", "pw1"), body=b"z" * 100)
    assert status == 200

    status, stats = control(daemon, "GET", "services/acme/users/alice/stats")
    assert status == 200 and stats["requests"] == 6 and stats["bytesIn"] == 100
    assert stats["statuses"]["2xx"] == 6 and stats["bytesOut"] > 0
    status, endpoints = control(daemon, "GET", "services/acme/users/alice/endpoints/stats")
    assert endpoints == {"/acme/p0": 3, "/acme/p1": 2, "/acme/up": 1}
    status, users = control(daemon, "GET", "services/acme/users")
    assert [u["username"] for u in users] == ["alice"] and users[0]["createdAt"].endswith("Z")
    status, totals = control(daemon, "GET", "stats")
    assert totals["requests"] == {"requests": 6} and totals["rejected"] >= 2 and totals["services"] == 1

    # A user in the shared store but not a member of this service is refused.
    from relayd.auth.users import UserStore

    UserStore(Path(daemon.env["RELAYD_STATE_DIR"]) / "users-users.sqlite3").add("bob", "pw2")
    assert request(port, "GET", "/acme/x", basic("bob", "pw2"))[0] == 403

    # Removing a user never removes what was counted.
    assert control(daemon, "DELETE", "services/acme/users/alice") == (200, None)
    assert request(port, "GET", "/acme/x", basic("alice", "pw1"))[0] == 401
    assert control(daemon, "GET", "services/acme/users/alice/stats")[1]["requests"] == 6

    result = daemon.ctl("stats", "acme", "alice")
    assert result.returncode == 0, result.stderr
    assert "6 requests" in result.stdout and "/acme/p0" in result.stdout
    metrics = daemon.ctl("metrics").stdout
    assert 'relayd_http_proxy_requests_total{component="web",service="acme"} 6.0' in metrics


def test_counters_survive_reload_sigkill_and_restart(relayd, port, upstream, tmp_path):
    config = proxy_config(port, upstream.url)
    daemon = relayd(config)
    for _ in range(7):
        assert request(port, "GET", "/acme/a")[0] == 200
    # Flushed within the flush interval (0.2 s): poll the database file itself.
    db = tmp_path / "state" / "http_proxy-web.sqlite3"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT requests FROM counters WHERE endpoint = ''").fetchone()
        if row and row[0] == 7:
            break
        time.sleep(0.05)  # polling the file with a deadline
    assert row and row[0] == 7
    daemon.process.kill()
    daemon.process.wait(10)

    daemon = relayd(config)
    assert control(daemon, "GET", "stats")[1]["requests"]["requests"] == 7
    for _ in range(3):
        assert request(port, "GET", "/acme/b")[0] == 200
    # A reload that rebuilds the component keeps counting from the same totals.
    (daemon.config_dir / "conf.d").mkdir(exist_ok=True)
    (daemon.config_dir / "conf.d" / "10-desc.toml").write_text(
        '[components.web.services.acme]\ndescription = "changed"\n')
    result = daemon.ctl("reload")
    assert result.returncode == 0 and "components.web" in result.stdout
    assert request(port, "GET", "/acme/c")[0] == 200
    assert control(daemon, "GET", "stats")[1]["requests"]["requests"] == 11
    # Graceful stop right after requests loses nothing.
    for _ in range(4):
        assert request(port, "GET", "/acme/d")[0] == 200
    assert daemon.stop() == 0
    daemon = relayd(config)
    stats = control(daemon, "GET", "stats")[1]
    assert stats["requests"]["requests"] == 15
    assert control(daemon, "GET", "services/acme/users//endpoints/stats")[0] == 404


def test_endpoint_keys_are_bounded(relayd, port, upstream):
    daemon = relayd(proxy_config(port, upstream.url, extra="max_endpoints_per_user = 3"))
    for i in range(10):
        assert request(port, "GET", f"/acme/r{i}")[0] == 200
    stats = control(daemon, "GET", "stats/acme/(anonymous)")[1]
    assert stats["requests"]["requests"] == 10
    counts = {k: v["requests"] for k, v in stats["endpoints"].items()}
    assert counts == {"/acme/r0": 1, "/acme/r1": 1, "/acme/r2": 1, "(other)": 7}
    body = control(daemon, "GET", "stats")[1]
    assert body["perService"]["acme"]["requests"] == 10


def test_runtime_services_via_token_listener_persist(relayd, port, upstream):
    mgmt = free_port()
    extra_port = free_port()
    config = proxy_config(port, upstream.url, auth="users", extra=f"""
        extra_listeners = ["extra"]
        management = {{ listener = "mgmt", token = "s3cret" }}
        [listeners.mgmt]
        bind = "127.0.0.1:{mgmt}"
        [listeners.extra]
        bind = "127.0.0.1:{extra_port}"
    """)
    daemon = relayd(config)
    assert request(mgmt, "GET", "/services")[0] == 401
    assert request(mgmt, "GET", "/services", {"Authorization": "Bearer wrong"})[0] == 401
    auth = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    definition = {"name": "svc2", "bindHttp": f"127.0.0.1:{extra_port}", "from": "/two", "to": upstream.url + "/t"}
    status, _, body = request(mgmt, "POST", "/services", auth, json.dumps(definition))
    assert status == 200, body
    created = json.loads(body)
    assert created["name"] == "svc2" and created["createdAt"].endswith("Z") and created["origin"] == "runtime"
    status, _, body = request(mgmt, "POST", "/services", auth, json.dumps(definition))
    assert status == 409 and json.loads(body)["message"]
    overlapping = dict(definition, name="svc3", **{"from": "/two/x"})
    assert request(mgmt, "POST", "/services", auth, json.dumps(overlapping))[0] == 409
    unbound = dict(definition, name="svc4", bindHttp="127.0.0.1:1")
    status, _, body = request(mgmt, "POST", "/services", auth, json.dumps(unbound))
    assert status == 400 and "listener" in json.loads(body)["message"]
    status, _, body = request(mgmt, "POST", "/services/svc2/users", auth,
                              json.dumps({"username": "carol", "password": "pw"}))
    assert status == 200
    assert request(extra_port, "GET", "/two/z", basic("carol", "pw"))[0] == 200
    assert request(port, "GET", "/two/z", basic("carol", "pw"))[0] == 404  # other listener
    assert request(mgmt, "DELETE", "/services/acme", auth)[0] == 409  # configured, not runtime
    assert daemon.stop() == 0

    daemon = relayd(config)
    status, _, body = request(extra_port, "GET", "/two/z", basic("carol", "pw"))
    assert status == 200 and json.loads(body)["path"] == "/t/z"
    status, _, body = request(mgmt, "GET", "/services/svc2/users/carol/stats", auth)
    assert json.loads(body)["requests"] == 2
    assert request(mgmt, "DELETE", "/services/svc2", auth)[:1] == (200,)
    assert request(extra_port, "GET", "/two/z", basic("carol", "pw"))[0] == 404


# -- TLS, service info, import -----------------------------------------------------------------

@pytest.fixture
def ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


def test_https_listener_https_upstream_hsts_redirect_and_service_info(relayd, port, ca, tmp_path):
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_pem, key_pem, ca_pem = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    server_cert.cert_chain_pems[0].write_to_path(cert_pem)
    server_cert.private_key_pem.write_to_path(key_pem)
    ca.cert_pem.write_to_path(ca_pem)
    up_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(up_context)
    tls_port = free_port()
    with Upstream(up_context) as up:
        daemon = relayd(proxy_config(port, up.url, listeners='["web", "secure"]', service_extra=f"""
            ca_file = "{ca_pem}"
            hsts = 3600
            redirect_https = true
        """, extra=f"""
        [listeners.secure]
        bind = "127.0.0.1:{tls_port}"
        tls = {{ cert = "{cert_pem}", key = "{key_pem}" }}
        """))
        client = ssl.create_default_context(cafile=str(ca_pem))
        status, headers, body = request(tls_port, "GET", "/acme/x?y=1", context=client)
        assert status == 200 and json.loads(body)["path"] == "/x?y=1"
        assert headers["strict-transport-security"] == "max-age=3600"
        assert echoed_headers(body)["x-forwarded-proto"] == ["https"]
        status, headers, _ = request(port, "GET", "/acme/x?y=1")
        assert status == 308 and headers["location"] == f"https://127.0.0.1:{tls_port}/acme/x?y=1"

        result = daemon.ctl("service", "info", "acme")
        assert result.returncode == 0, result.stderr
        info = json.loads(result.stdout)
        assert info["certHash"] == "sha3:" + hashlib.sha3_256(cert_pem.read_bytes()).hexdigest()
        der = ssl.PEM_cert_to_DER_cert(cert_pem.read_text())
        assert info["sha256Fingerprint"].replace(":", "").lower() == hashlib.sha256(der).hexdigest()
        assert info["portHttps"] == [tls_port] and info["portHttp"] == [port]
        assert info["spkiPin"].startswith("sha256//")

        # Certificates are re-read on reload even when the configuration is unchanged.
        new_cert = ca.issue_cert("127.0.0.1")
        new_cert.cert_chain_pems[0].write_to_path(cert_pem)
        new_cert.private_key_pem.write_to_path(key_pem)
        assert daemon.ctl("reload").returncode == 0
        with socket.create_connection(("127.0.0.1", tls_port)) as raw:
            with client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                seen = tls.getpeercert(binary_form=True)
        assert seen == ssl.PEM_cert_to_DER_cert(cert_pem.read_text())


def test_https_upstream_verification_failure_is_502(relayd, port, ca, tmp_path):
    server_cert = ca.issue_cert("127.0.0.1")
    up_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(up_context)
    with Upstream(up_context) as up:
        relayd(proxy_config(port, up.url))  # no ca_file: the system CAs do not know trustme's
        status, _, body = request(port, "GET", "/acme/x")
        assert status == 502 and "certificate" in json.loads(body)["message"].lower()


def test_import_seed_acme_service(relayd, tmp_path, upstream, ca):
    import subprocess

    from relayd.testing import BIN

    seed = tmp_path / "acme-service.json"
    seed.write_text(json.dumps(SEED_ACME))
    result = subprocess.run([str(BIN / "relayctl"), "--socket", str(tmp_path / "none.sock"), "import",
                             "http-auth", str(seed)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    import tomllib

    parsed = tomllib.loads(text)
    service = parsed["components"]["http"]["services"]["acme-service"]
    assert service["from"] == "/acme" and service["to"] == "http://127.0.0.1:10000"
    assert service["server_names"] == ["service.acme.com", "1.2.3.4"]
    assert parsed["listeners"]["acme-service-https"]["tls"]["cert"] == "/secure/acme/certs/server.cert"
    # Point it at test ports and files, and run it.
    cert = ca.issue_cert("service.acme.com")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "server.cert")
    cert.private_key_pem.write_to_path(tmp_path / "server.key")
    http_port, https_port = free_port(), free_port()
    text = (text.replace("0.0.0.0:443", f"127.0.0.1:{https_port}").replace("0.0.0.0:80", f"127.0.0.1:{http_port}")
            .replace("/secure/acme/certs", str(tmp_path)).replace("http://127.0.0.1:10000", upstream.url))
    daemon = relayd(text + '\n[auth.users]\nmethod = "basic"\n')
    info = json.loads(daemon.ctl("service", "info", "acme-service").stdout)
    assert info["name"] == "acme-service" and info["portHttps"] == [https_port]
    assert info["certHash"] == "sha3:" + hashlib.sha3_256((tmp_path / "server.cert").read_bytes()).hexdigest()
    status = ControlClient(daemon.control_socket).request(
        "POST", "/v1/components/http/services/acme-service/users", {"username": "u1", "password": "p1"})[0]
    assert status == 200
    status, _, body = request(http_port, "GET", "/acme/register", {"Host": "service.acme.com", **basic("u1", "p1")})
    assert status == 200 and json.loads(body)["path"] == "/register"
    assert request(http_port, "GET", "/acme/register", {"Host": "other.example", **basic("u1", "p1")})[0] == 404
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "from": "/x", "to": "http://h"}))
    result = subprocess.run([str(BIN / "relayctl"), "import", "http-auth", str(bad)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "bindHttps" in result.stderr and "Traceback" not in result.stderr


# -- streaming -----------------------------------------------------------------------------------

def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])
def test_large_bodies_stream_with_flat_memory(relayd, port, upstream, use_splice):
    daemon = relayd(proxy_config(port, upstream.url, service_extra="max_body = 0",
                                 extra=f"splice = {str(use_splice).lower()}"))
    size = 1 << 30
    assert request(port, "GET", "/acme/big?n=1000")[0] == 200  # warm up
    # VmHWM is the process's peak resident size: it catches a transient buffer of a whole body.
    before = _rss_kib(daemon.process.pid, "VmHWM")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", f"/acme/big?n={size}")
    response = conn.getresponse()
    assert response.status == 200 and int(response.headers["Content-Length"]) == size
    received = 0
    digest, expected = hashlib.sha256(), hashlib.sha256()
    while piece := response.read(CHUNK):
        received += len(piece)
        digest.update(piece)
    for _ in range(size // CHUNK):
        expected.update(PATTERN)
    assert received == size and digest.hexdigest() == expected.hexdigest()
    # The same client connection (and the pooled upstream one) still work after the body.
    conn.request("GET", "/acme/after")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["path"] == "/after"
    conn.close()

    def upload():
        block = b"u" * CHUNK
        for _ in range(size // CHUNK):
            yield block

    status, _, body = request(port, "POST", "/acme/sink", body=upload(), headers={"Content-Length": str(size)})
    assert status == 200
    expected = hashlib.sha256()
    for _ in range(size // CHUNK):
        expected.update(b"u" * CHUNK)
    assert json.loads(body) == {"length": size, "sha256": expected.hexdigest()}
    peak = _rss_kib(daemon.process.pid, "VmHWM")
    # Flat memory: the relayd process grew by far less than one body (a few write buffers).
    assert peak - before < 48 * 1024, (before, peak)


def test_websocket_passthrough(relayd, port, upstream):
    from websockets.sync.client import connect

    relayd(proxy_config(port, upstream.url))
    with connect(f"ws://127.0.0.1:{port}/acme/ws", open_timeout=10) as ws:
        for i in range(3):
            ws.send(f"hello {i}")
            assert ws.recv(timeout=10) == f"echo:hello {i}"


def test_chunked_request_and_pipelining(relayd, port, upstream):
    relayd(proxy_config(port, upstream.url))
    raw = (b"POST /acme/sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
           b"GET /acme/second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.count(b"HTTP/1.1 200 OK") == 2
    assert hashlib.sha256(b"hello world").hexdigest().encode() in reply
    assert b'"path": "/second"' in reply


def test_early_reply_skips_a_framed_body_and_closes_on_an_unfinished_one(relayd, port, upstream):
    relayd(proxy_config(port, upstream.url))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # 404 for a request whose body arrived whole: llhttp framed the body, so it is skipped
        # (never parsed as a request) and the connection serves the next request.
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 31\r\n\r\n"
                     b"GET /acme/smuggled HTTP/1.1\r\n\r\n"
                     b"GET /acme/next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 404 ") and reply.count(b"HTTP/1.1 ") == 2
    assert b"smuggled" not in reply and b'"path": "/next"' in reply
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # 404 while the body is still arriving: answered at once, then the connection closes.
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                     b"GET /acme/smuggled HTTP/1.1\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 404 ") and b"Connection: close" in reply
    assert b"smuggled" not in reply and reply.count(b"HTTP/1.1") == 1


def test_a_refused_upload_still_reads_its_answer(relayd, port, upstream):
    # RFC 9112 section 9.6: the proxy answers 413 at the head and closes, while the client is
    # still sending its megabyte; closing outright would reset the connection and the client
    # would never see the answer. relayd half-closes and reads what still comes (lingering).
    relayd(proxy_config(port, upstream.url, service_extra="max_body = 1000"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /acme/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
        for _ in range(64):
            sock.sendall(b"a" * 16384)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413 Content Too Large\r\n") and b"Connection: close" in reply


def test_unix_socket_upstream_pass_credentials_and_header_names(relayd, port, tmp_path):
    path = tmp_path / "up.sock"
    loop = asyncio.new_event_loop()
    upstream = Upstream()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            upstream.runner = web.AppRunner(upstream.app(), access_log=None)
            await upstream.runner.setup()
            await web.UnixSite(upstream.runner, str(path)).start()

        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        daemon = relayd(proxy_config(port, "http://app.internal/api", auth="users", service_extra=f"""
            unix_socket = "{path}"
            pass_credentials = true
        """, extra='identity_headers = { user = "Remote-User", email = "Remote-Email" }'))
        from relayd.auth.users import UserStore

        UserStore(Path(daemon.env["RELAYD_STATE_DIR"]) / "users-users.sqlite3").add("dave", "pw")
        status, _, body = request(port, "GET", "/acme/v1?z=2", {**basic("dave", "pw"), "Remote-User": "root"})
        assert status == 200, body
        assert json.loads(body)["path"] == "/api/v1?z=2"
        headers = echoed_headers(body)
        assert headers["host"] == ["app.internal"]
        assert headers["remote-user"] == ["dave"]
        assert headers["authorization"] == [basic("dave", "pw")["Authorization"]]
        assert "x-forwarded-user" not in headers
    finally:
        asyncio.run_coroutine_threadsafe(upstream.runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_connect_timeout_is_504(relayd, port, upstream):
    # A listener whose accept queue is full drops SYNs: connecting hangs until the timeout.
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(stuck.getsockname())
        fillers.append(filler)
    try:
        relayd(proxy_config(port, f"http://127.0.0.1:{stuck.getsockname()[1]}", service_extra="connect_timeout = 0.5"))
        status, _, body = request(port, "GET", "/acme/x")
        assert status == 504 and "connect" in json.loads(body)["message"]
    finally:
        for sock in fillers + [stuck]:
            sock.close()


def test_service_certificates_by_sni(relayd, port, upstream, ca, tmp_path):
    default = ca.issue_cert("127.0.0.1")
    default.cert_chain_pems[0].write_to_path(tmp_path / "default.pem")
    default.private_key_pem.write_to_path(tmp_path / "default.key")
    own = ca.issue_cert("acme.test")
    own.cert_chain_pems[0].write_to_path(tmp_path / "acme.pem")
    own.private_key_pem.write_to_path(tmp_path / "acme.key")
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_pem)
    tls_port = free_port()
    daemon = relayd(proxy_config(port, upstream.url, listeners='["secure"]', service_extra=f"""
        server_names = ["acme.test"]
        cert = "{tmp_path / 'acme.pem'}"
        key = "{tmp_path / 'acme.key'}"
    """, extra=f"""
        [listeners.secure]
        bind = "127.0.0.1:{tls_port}"
        tls = {{ cert = "{tmp_path / 'default.pem'}", key = "{tmp_path / 'default.key'}" }}
    """))

    def served(server_name: str) -> bytes:
        context = ssl.create_default_context(cafile=str(ca_pem))
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=server_name) as tls:
                return tls.getpeercert(binary_form=True)

    assert served("acme.test") == ssl.PEM_cert_to_DER_cert((tmp_path / "acme.pem").read_text())
    assert served("127.0.0.1") == ssl.PEM_cert_to_DER_cert((tmp_path / "default.pem").read_text())
    client = ssl.create_default_context(cafile=str(ca_pem))
    conn = http.client.HTTPSConnection("acme.test", tls_port, context=client, timeout=10)
    conn.sock = client.wrap_socket(socket.create_connection(("127.0.0.1", tls_port)), server_hostname="acme.test")
    conn.request("GET", "/acme/x")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["path"] == "/x"
    conn.close()
    info = json.loads(daemon.ctl("service", "info", "acme").stdout)
    assert info["certHash"] == "sha3:" + hashlib.sha3_256((tmp_path / "acme.pem").read_bytes()).hexdigest()


def test_http10_client_gets_chunked_responses_dechunked(relayd, port):
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for word in (b"one ", b"two ", b"three"):
            await response.write(word)
        await response.write_eof()
        return response

    up = Upstream()
    original = up.app

    def app() -> web.Application:
        application = original()
        application.router.add_get("/chunked", chunked)
        return application

    up.app = app  # type: ignore[method-assign]
    with up:
        relayd(proxy_config(port, up.url))
        for version, expect_chunked in ((b"HTTP/1.0", False), (b"HTTP/1.1", True)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET /acme/chunked " + version + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert (b"Transfer-Encoding: chunked" in head) == expect_chunked
            if not expect_chunked:
                assert body == b"one two three"


class RawUpstream:
    """A hand-written HTTP/1.1 server: answers the first request of each connection, then closes
    the connection when a second request arrives (as an upstream whose keep-alive just expired)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            line = data.split(b"\r\n", 1)[0]
            method, target = line.split(b" ")[:2]
            if target.endswith(b"/empty"):
                conn.sendall(b"HTTP/1.1 204 No Content\r\nX-Kind: empty\r\n\r\n")
            elif method == b"HEAD":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            data = data.split(b"\r\n\r\n", 1)[1]
            while b"\r\n\r\n" not in data:  # the next request: drop the connection unanswered
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk

    def close(self) -> None:
        self.sock.close()


def test_reused_upstream_connection_that_died_is_retried_and_bodyless_responses(relayd, port):
    raw = RawUpstream()
    try:
        relayd(proxy_config(port, f"http://127.0.0.1:{raw.port}"))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(4):
            conn.request("GET", "/acme/x")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"ok")
        conn.request("HEAD", "/acme/x")
        response = conn.getresponse()
        assert response.status == 200 and response.headers["Content-Length"] == "100"
        assert response.read() == b""
        conn.request("GET", "/acme/empty")
        response = conn.getresponse()
        assert response.status == 204 and response.headers["X-Kind"] == "empty" and response.read() == b""
        conn.request("GET", "/acme/x")  # the client connection is still in sync
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"ok")
        conn.close()
        assert raw.connections >= 2
    finally:
        raw.close()


def test_client_leaving_in_the_middle_of_a_large_body(relayd, port, upstream):
    daemon = relayd(proxy_config(port, upstream.url))
    assert request(port, "GET", "/acme/warm")[0] == 200
    fds = lambda: len(os.listdir(f"/proc/{daemon.process.pid}/fd"))
    baseline = fds()
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", f"/acme/big?n={1 << 30}")
        response = conn.getresponse()
        assert response.status == 200
        assert len(response.read(8 * CHUNK)) == 8 * CHUNK
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    assert request(port, "GET", "/acme/still-fine")[0] == 200
    deadline = time.monotonic() + 10
    while fds() > baseline + 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the fd table with a deadline
    assert fds() <= baseline + 2  # the pooled upstream connection may stay


@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])
def test_slow_client_is_not_an_upstream_timeout(relayd, port, upstream, use_splice):
    relayd(proxy_config(port, upstream.url, service_extra="read_timeout = 1",
                        extra=f"splice = {str(use_splice).lower()}"))
    size = 64 * CHUNK
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/acme/big?n={size}")
    response = conn.getresponse()
    assert response.status == 200
    time.sleep(3)  # the client stalls (the behaviour under test), far beyond read_timeout
    received = len(response.read(CHUNK))
    time.sleep(1.5)
    while piece := response.read(CHUNK):
        received += len(piece)
    assert received == size
    conn.close()

