"""max_connections per listener (relayd.accept_gate): at the limit relayd stops accepting on that
listener, connections wait in the kernel backlog and are served once others close; the other
listeners and the control socket keep working when one listener is flooded."""

from __future__ import annotations

import asyncio
import json
import re
import select
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import uvloop

import configs
from polling import wait_for
from relayd.accept_gate import RESERVED_FDS, GatedServer, backlog_length, plan_limits, serve_gated
from relayd.config.model import ListenerConfig
from relayd.listeners import Listener, bind_socket, make_server_ssl_context
from relayd.testing import RelaydProcess, free_port, get_text

DEADLINE = 20.0
LIMIT_WARNING = re.compile(r"listener (\S+): \d+ connections open, its max_connections \((\d+)\)")


# -- the default formula --------------------------------------------------------------------------

def test_default_limits_share_what_the_file_limit_leaves() -> None:
    plan = plan_limits({"web": None, "status": None}, 65536)
    assert plan.reserved == RESERVED_FDS + 65536 // 8
    assert plan.limits == {"web": 14320, "status": 14320}
    assert plan.warning() is None
    assert plan_limits({"web": None, "status": None}, 1024).limits == {"web": 208, "status": 208}
    assert plan_limits({"web": None, "status": None}, 256).limits == {"web": 40, "status": 40}
    # An explicit value is taken off the capacity before the others share it.
    plan = plan_limits({"web": 10000, "status": None, "mgmt": None}, 65536)
    assert plan.limits == {"web": 10000, "status": 9320, "mgmt": 9320}
    assert plan.warning() is None


def test_explicit_limits_beyond_the_file_limit_are_warned_about() -> None:
    plan = plan_limits({"web": 50000, "status": None}, 65536)
    assert plan.limits == {"web": 50000, "status": 1}
    warning = plan.warning()
    assert warning and "web (50000)" in warning and "RLIMIT_NOFILE 65536" in warning and "LimitNOFILE=" in warning
    assert plan_limits({"web": 28640}, 65536).warning() is None  # exactly the capacity fits


# -- the gate, in process on uvloop ---------------------------------------------------------------

class Idle(asyncio.Protocol):
    """Holds its connection; reports its close through on_closed as the gate expects."""

    instances: ClassVar[list[Idle]] = []

    def __init__(self) -> None:
        self.on_closed: Callable[[], None] | None = None
        self.transport: asyncio.Transport | None = None
        Idle.instances.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(b"hello\n")  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_closed is not None:
            self.on_closed()


def make_listener(limit: int, tls: ssl.SSLContext | None = None) -> Listener:
    port = free_port()
    config = ListenerConfig(bind=f"127.0.0.1:{port}", max_connections=limit)
    return Listener("test", config, [bind_socket(config.bind, config.backlog)], tls, False)  # type: ignore[arg-type]


async def until(predicate: Callable[[], object], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)  # poll


def still_open_unanswered(sock: socket.socket) -> bool:
    """Not accepted (nothing was written to it) and neither closed nor reset: not readable."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def test_gate_stops_at_the_limit_and_takes_waiting_connections_in_turn() -> None:
    async def main() -> None:
        Idle.instances = []
        listener = make_listener(5)
        gate = listener.gate
        server = await serve_gated(listener, Idle)
        port = listener.sockets[0].getsockname()[1]
        # The kernel completes these handshakes on its own; they queue in the listen backlog.
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
        await until(lambda: gate.open == 5 and backlog_length(listener.sockets) == 45, "5 accepted, 45 waiting")
        for _ in range(50):  # many loop iterations: nothing more is accepted
            await asyncio.sleep(0)
        assert gate.open == 5 and gate.paused and not server.servers
        assert len(Idle.instances) == 5
        waiting = [c for c in clients if still_open_unanswered(c)]
        assert len(waiting) == 45  # neither accepted-and-closed nor refused
        assert gate.reached == 1

        Idle.instances[0].transport.close()  # type: ignore[union-attr]
        await until(lambda: len(Idle.instances) == 6 and backlog_length(listener.sockets) == 44,
                    "one more accepted")
        for _ in range(50):
            await asyncio.sleep(0)
        assert gate.open == 5 and len(Idle.instances) == 6
        assert gate.reached == 1  # still the same episode

        def close_accepted() -> bool:
            for conn in Idle.instances:
                if not conn.transport.is_closing():  # type: ignore[union-attr]
                    conn.transport.close()  # type: ignore[union-attr]
            return len(Idle.instances) == 50

        # Every waiting connection gets its turn, in slots freed by the ones before it.
        await until(close_accepted, "all 50 accepted")
        await until(lambda: gate.open == 0, "all closed")
        assert not gate.paused and server.servers
        server.close()
        assert listener.sockets[0].fileno() >= 0  # closing the servers never closes the listener
        for client in clients:
            client.close()
        listener.sockets[0].close()

    uvloop.run(main())


def test_raising_the_limit_resumes_and_lowering_it_pauses() -> None:
    async def main() -> None:
        Idle.instances = []
        listener = make_listener(2)
        gate = listener.gate
        server = await serve_gated(listener, Idle)
        port = listener.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(6)]
        await until(lambda: gate.open == 2 and backlog_length(listener.sockets) == 4, "2 accepted")
        gate.set_limit(4)
        await until(lambda: gate.open == 4 and backlog_length(listener.sockets) == 2, "4 accepted")
        gate.set_limit(1)
        assert gate.paused
        Idle.instances[0].transport.close()  # type: ignore[union-attr]
        await until(lambda: gate.open == 3, "one closed")
        for _ in range(50):
            await asyncio.sleep(0)
        assert gate.open == 3 and not server.servers and backlog_length(listener.sockets) == 2
        server.close()
        for client in clients:
            client.close()
        listener.sockets[0].close()

    uvloop.run(main())


def test_a_failed_tls_handshake_frees_its_slot(tmp_path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "chain.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    from relayd.config.model import TLSConfig

    server_context = make_server_ssl_context(TLSConfig(cert=tmp_path / "chain.pem", key=tmp_path / "key.pem"))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def main() -> None:
        Idle.instances = []
        listener = make_listener(1, server_context)
        gate = listener.gate
        server = await serve_gated(listener, Idle, ssl=server_context)
        port = listener.sockets[0].getsockname()[1]
        # Not TLS at all: the component's protocol never sees this connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        assert await reader.read() == b""
        writer.close()
        await until(lambda: gate.open == 0, "the failed handshake's slot freed")
        assert not Idle.instances[0].transport  # never connected
        # The only slot is free again: a real TLS client gets served.
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context,
                                                       server_hostname="localhost")
        assert await reader.readline() == b"hello\n"
        assert gate.open == 1
        writer.close()
        await until(lambda: gate.open == 0, "the TLS connection's slot freed")
        server.close()
        listener.sockets[0].close()

    uvloop.run(main())


def test_gated_server_closed_while_paused_never_serves_again() -> None:
    async def main() -> None:
        Idle.instances = []
        listener = make_listener(1)
        gate = listener.gate
        first = await serve_gated(listener, Idle)
        port = listener.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        await until(lambda: gate.open == 1 and backlog_length(listener.sockets) == 1, "1 accepted")
        # A reload: the old component stops accepting, a new one starts while at the limit.
        first.close()
        second = GatedServer(listener, Idle)
        await second.start()
        assert not second.servers and gate.servers == {second}
        Idle.instances[0].transport.close()  # type: ignore[union-attr]
        await until(lambda: len(Idle.instances) == 2, "the waiting connection accepted by the new server")
        assert gate.open == 1 and gate.paused  # at the limit again: neither serves
        Idle.instances[1].transport.close()  # type: ignore[union-attr]
        await until(lambda: gate.open == 0 and second.servers, "the new server accepting")
        assert not first.servers
        second.close()
        for client in clients:
            client.close()
        listener.sockets[0].close()

    uvloop.run(main())


def test_a_failure_to_accept_again_is_retried(monkeypatch, caplog) -> None:
    import errno

    from relayd import accept_gate

    monkeypatch.setattr(accept_gate, "RETRY_DELAY", 0.05)

    async def main() -> None:
        Idle.instances = []
        listener = make_listener(1)
        gate = listener.gate
        server = await serve_gated(listener, Idle)
        port = listener.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        await until(lambda: gate.open == 1 and backlog_length(listener.sockets) == 1, "1 accepted")
        real, failures = listener.serving_sockets, []

        def out_of_descriptors() -> list[socket.socket]:
            if len(failures) < 3:
                failures.append(1)
                raise OSError(errno.EMFILE, "Too many open files")
            return real()

        monkeypatch.setattr(listener, "serving_sockets", out_of_descriptors)
        Idle.instances[0].transport.close()  # type: ignore[union-attr]
        await until(lambda: len(Idle.instances) == 2, "the waiting connection accepted after retries")
        assert len(failures) == 3
        errors = [r for r in caplog.records if "cannot accept again" in r.getMessage()]
        assert [r.levelname for r in errors] == ["ERROR", "DEBUG", "DEBUG"]
        assert any("accepting again after the error" in r.getMessage() for r in caplog.records)
        server.close()
        for client in clients:
            client.close()
        listener.sockets[0].close()

    caplog.set_level("DEBUG", logger="relayd.listeners")
    uvloop.run(main())


def test_aiohttp_components_count_their_connections_too() -> None:
    from aiohttp import web

    from relayd.httpserve import HttpService

    async def handle(request: web.BaseRequest) -> web.Response:
        return web.Response(text="ok\n")

    async def main() -> None:
        listener = make_listener(2)
        gate = listener.gate
        service = HttpService(handle)
        await service.serve(listener)
        port = listener.sockets[0].getsockname()[1]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await until(lambda: gate.open == 2 and gate.paused, "2 idle connections at the limit")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await until(lambda: backlog_length(listener.sockets) == 1, "the request waiting in the backlog")
        assert gate.open == 2
        idle[0][1].close()
        response = await asyncio.wait_for(reader.read(), DEADLINE)
        assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"ok\n")
        writer.close()
        await until(lambda: gate.open == 1, "the served connection uncounted")
        await service.stop(0)
        assert gate.open == 0 and not gate.servers
        idle[1][1].close()
        listener.sockets[0].close()

    uvloop.run(main())


# -- a real relayd: a flood of idle connections under a small RLIMIT_NOFILE -----------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"upstream ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def nofile_wrapper(limit: int) -> list[str]:
    """Run relayd with RLIMIT_NOFILE soft = hard = limit (what `prlimit --nofile=N:N` does)."""
    shim = ("import os, resource, sys; n = int(sys.argv[1]); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])")
    return [sys.executable, "-c", shim, str(limit)]


def config(web: int, status: int, upstream: str, max_connections: int | None = None) -> str:
    return configs.config(
        configs.listener("web", web, max_connections=max_connections or None), configs.listeners(status=status),
        configs.auth(open="none"), configs.http_proxy("web", auth="open", flush_interval=0.2),
        configs.service("web", "acme", upstream, listeners=["web"]), configs.status("status"))


def proxy_get(port: int, timeout: float = 10) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/acme/x")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def listener_status(daemon: RelaydProcess, name: str) -> dict:
    result = daemon.ctl("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["listeners"][name]


def limit_warnings(daemon: RelaydProcess) -> list[tuple[str, str]]:
    return LIMIT_WARNING.findall(daemon.log)


def test_idle_flood_leaves_status_and_control_socket_alive(relayd, tmp_path, upstream) -> None:
    nofile = 256
    web, status = free_port(), free_port()
    daemon = relayd(config(web, status, upstream), wrapper=nofile_wrapper(nofile))
    limit = plan_limits({"web": None, "status": None}, nofile).limits["web"]
    assert listener_status(daemon, "web")["max_connections"] == limit

    flood = [socket.create_connection(("127.0.0.1", web), timeout=5) for _ in range(2 * nofile)]
    try:
        wait_for(lambda: limit_warnings(daemon), "the limit-reached warning")
        wait_for(lambda: listener_status(daemon, "web")["connections"] == limit, "web at its limit")
        assert get_text(f"http://127.0.0.1:{status}/healthz") == (200, "ok\n")
        result = daemon.ctl("status")
        assert result.returncode == 0, result.stderr
        assert f"connections {limit}/{limit} (AT LIMIT: not accepting)" in result.stdout
        info = listener_status(daemon, "web")
        assert info == {**info, "connections": limit, "max_connections": limit, "accepting": False}
        _, metrics = get_text(f"http://127.0.0.1:{status}/metrics")
        assert 'relayd_listener_limit_reached_total{listener="web"} 1.0' in metrics
        assert f'relayd_listener_connections{{listener="web"}} {float(limit)}' in metrics
        # Waiting connections were neither closed nor refused: nothing came on any of them.
        assert all(still_open_unanswered(sock) for sock in flood)
    finally:
        for sock in flood:
            sock.close()

    # The backlog drains (those clients are gone: accepted, found closed) and the proxy serves.
    def served() -> bool:
        try:
            return proxy_get(web, timeout=2) == (200, b"upstream ok\n")
        except OSError:
            return False

    wait_for(served, "a proxied request after the flood")
    wait_for(lambda: "listener web: accepting again" in daemon.log, "the accepting-again line")
    assert limit_warnings(daemon) == [("web", str(limit))]  # exactly one per episode
    assert "Traceback" not in daemon.log
    assert "EMFILE" not in daemon.log and "Too many open files" not in daemon.log


def test_connections_waiting_at_the_limit_are_served_when_slots_free(relayd, upstream) -> None:
    web, status = free_port(), free_port()
    daemon = relayd(config(web, status, upstream, max_connections=2))
    idle = [socket.create_connection(("127.0.0.1", web), timeout=5) for _ in range(2)]
    wait_for(lambda: not listener_status(daemon, "web")["accepting"], "web at its limit of 2")
    waiting = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", web), timeout=10)
        sock.sendall(b"GET /acme/x HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        waiting.append(sock)
    info = listener_status(daemon, "web")
    assert info["connections"] == 2 and not info["accepting"]
    assert all(still_open_unanswered(sock) for sock in waiting)

    for sock in idle:
        sock.close()
    for sock in waiting:  # served in turn as slots free, none dropped
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
        sock.close()
        assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(b"upstream ok\n"), response
    wait_for(lambda: "listener web: accepting again" in daemon.log, "the accepting-again line")
    assert limit_warnings(daemon) == [("web", "2")]

    # A new max_connections applies on reload without restarting the component.
    (daemon.config_dir / "relayd.toml").write_text(
        (daemon.config_dir / "relayd.toml").read_text().replace("max_connections = 2", "max_connections = 3"))
    result = daemon.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert "components.web" not in result.stdout
    assert listener_status(daemon, "web")["max_connections"] == 3
    assert proxy_get(web) == (200, b"upstream ok\n")
    assert "Traceback" not in daemon.log


def test_a_max_connections_beyond_the_file_limit_is_warned_about_at_start(relayd, upstream) -> None:
    web, status = free_port(), free_port()
    daemon = relayd(config(web, status, upstream, max_connections=100000), wrapper=nofile_wrapper(1024))
    assert "max_connections of listener(s) web (100000)" in daemon.log
    assert listener_status(daemon, "web")["max_connections"] == 100000
    assert listener_status(daemon, "status")["max_connections"] == 1  # what is left


def test_the_soft_file_limit_is_raised_to_the_hard_limit(relayd, upstream) -> None:
    web, status = free_port(), free_port()
    shim = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048)); "
            "os.execv(sys.argv[1], sys.argv[1:])")
    daemon = relayd(config(web, status, upstream), wrapper=[sys.executable, "-c", shim])
    assert "raised the open file limit (RLIMIT_NOFILE) from 256 to 2048" in daemon.log
    limits = plan_limits({"web": None, "status": None}, 2048).limits
    assert listener_status(daemon, "web")["max_connections"] == limits["web"]
    with open(f"/proc/{daemon.process.pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    assert line.split()[3:5] == ["2048", "2048"]
