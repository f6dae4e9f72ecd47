"""Two facilities on 127.0.0.1: a producer relayd and a consumer relayd, driven by `relayctl stream`.

producer app (listens) <- producer relayd (PROD, inbound) <- consumer relayd (CONS, outbound) <- consumer app
Each consumer connection sends its index; the producer answers with a deterministic stream for
that index and closes; both sides hash what they sent/received.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from relayd.testing import BIN
from stream_helpers import auth_none, free_port, port_range, start, stream_config, wait_bindable

GiB = 1 << 30
BLOCK = os.urandom(1 << 20)


@dataclass
class ProducerApp:
    """Listens on `count` ports; connection with index i gets `sizes[i]` bytes, then EOF."""

    count: int
    size: int
    tag: bytes = b"A"
    socks: list[socket.socket] = field(default_factory=list)
    sent: dict[int, str] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        for _ in range(self.count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(16)
            self.socks.append(s)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    @property
    def endpoints(self) -> list[int]:
        return [s.getsockname()[1] for s in self.socks]

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                header = _recv_exact(conn, 4)
                (index,) = struct.unpack("!I", header)
                digest = hashlib.sha256()
                body = memoryview(BLOCK)
                left, j = self.size, 0
                while left:
                    head = self.tag + struct.pack("!IQ", index, j)[: min(13, left) - 1] if left >= 13 else (self.tag + b"\0" * 12)[:left]
                    n = min(left, len(BLOCK))
                    chunk_head, chunk_rest = head[:n], body[len(head):n]
                    conn.sendall(chunk_head)
                    conn.sendall(chunk_rest)
                    digest.update(chunk_head)
                    digest.update(chunk_rest)
                    left -= n
                    j += 1
                conn.shutdown(socket.SHUT_WR)
                self.sent[index] = digest.hexdigest()
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)

    def close(self) -> None:
        for s in self.socks:
            s.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise ConnectionError("closed early")
        data += more
    return data


def consume(listeners: list[str], results: dict[int, tuple[int, str]], errors: list) -> list[threading.Thread]:
    """One connection per listener, in threads; results[i] = (bytes, sha256)."""

    def run(i: int, address: str) -> None:
        try:
            host, port = address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=120) as s:
                s.sendall(struct.pack("!I", i))
                buf = bytearray(1 << 20)
                view = memoryview(buf)
                digest, total = hashlib.sha256(), 0
                while n := s.recv_into(buf):
                    digest.update(view[:n])
                    total += n
                results[i] = (total, digest.hexdigest())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, a), daemon=True) for i, a in enumerate(listeners)]
    for t in threads:
        t.start()
    return threads


def relayctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run([str(BIN / "relayctl"), "stream", *args], capture_output=True, text=True,
                          timeout=120, env=full)


def ok_json(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@dataclass
class Facilities:
    prod: object
    cons: object
    prod_ctl: int
    cons_ctl: int
    client_args: list[str]
    security: str


def facilities(tmp_path: Path, security: str) -> Facilities:
    """Producer and consumer relayd; in tls mode, each facility has its own CA (mutual TLS)."""
    extra = {"prod": "", "cons": ""}
    listener_tls = ""
    client_args = ["--insecure"]
    if security == "tls":
        cas = {"prod": trustme.CA(), "cons": trustme.CA()}
        for side, other in (("prod", "cons"), ("cons", "prod")):
            pem = tmp_path / f"{side}.pem"
            cas[side].issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
            cas[other].cert_pem.write_to_path(str(tmp_path / f"{side}-peer-ca.pem"))
            extra[side] = (f'security = "tls"\n[components.s2cs.tls]\ncert = "{pem}"\nkey = "{pem}"\n'
                           f'ca = "{tmp_path / f"{side}-peer-ca.pem"}"\n')
        # the control channel is TLS too, with the producer's certificate for both (client pins it)
        listener_tls = f'tls = {{ cert = "{tmp_path / "prod.pem"}", key = "{tmp_path / "prod.pem"}" }}'
        cas["prod"].cert_pem.write_to_path(str(tmp_path / "control-ca.pem"))
        client_args = ["--server_cert", str(tmp_path / "control-ca.pem")]
    ports = {"prod": port_range(8), "cons": port_range(8)}
    ctl = {"prod": free_port(), "cons": free_port()}
    daemons = {side: start(tmp_path, side, stream_config(ctl[side], ports[side], auth=auth_none(),
                                                          extra=extra[side], listener_tls=listener_tls))
               for side in ("prod", "cons")}
    return Facilities(daemons["prod"], daemons["cons"], ctl["prod"], ctl["cons"], client_args + ["--no-auth"], security)


def transfer(f: Facilities, num_conn: int, total: int, app_ports: int, tag: bytes = b"A") -> None:
    """inbound-request, outbound-request, move `total` bytes byte-exact, release, ports freed."""
    app = ProducerApp(app_ports, total // num_conn, tag)
    try:
        inbound = ok_json(relayctl(
            "inbound-request", "--s2cs", f"127.0.0.1:{f.prod_ctl}", "--num_conn", str(num_conn),
            "--remote_ip", "127.0.0.1", "--receiver_ports", ",".join(map(str, app.endpoints)),
            "--json", *f.client_args))
        uid = inbound["uid"]
        assert inbound["role"] == "PROD" and len(inbound["listeners"]) == num_conn
        # round robin of the application's ports over the num_conn proxy ports
        assert inbound["targets"] == [f"127.0.0.1:{app.endpoints[i % app_ports]}" for i in range(num_conn)]
        outbound = ok_json(relayctl(
            "outbound-request", "--s2cs", f"127.0.0.1:{f.cons_ctl}", "--num_conn", str(num_conn),
            "--json", *f.client_args, uid, ",".join(inbound["listeners"])))
        assert outbound["uid"] == uid and outbound["targets"] == inbound["listeners"]

        results: dict[int, tuple[int, str]] = {}
        errors: list = []
        for t in consume(outbound["listeners"], results, errors):
            t.join(300)
        assert not errors and not app.errors, (errors, app.errors)
        assert sorted(results) == list(range(num_conn))
        for i, (size, digest) in results.items():
            assert size == total // num_conn
            assert digest == app.sent[i], f"connection {i}: bytes differ"

        if f.security == "tls":
            # the inbound listener speaks only mutual TLS: a plain-text peer gets a TLS alert at
            # most, never the application's data, and the application sees no connection
            host, port = inbound["listeners"][0].rsplit(":", 1)
            served = len(app.sent)
            with socket.create_connection((host, int(port)), timeout=30) as s:
                s.sendall(struct.pack("!I", 0))
                s.shutdown(socket.SHUT_WR)
                got = b""
                try:
                    while more := s.recv(65536):
                        got += more
                except ConnectionResetError:
                    pass
            assert len(got) < 100 and len(app.sent) == served
        for daemon in (f.prod, f.cons):
            rows = json.loads(daemon.ctl("sessions", "s2cs", "--json").stdout)["sessions"]
            (row,) = [r for r in rows if r["uid"] == uid]
            assert row["bytes_from_target"] == total and row["bytes_to_target"] == 4 * num_conn
        ports = {side: [int(l.rsplit(":", 1)[1]) for l in d["listeners"]]
                 for side, d in (("prod", inbound), ("cons", outbound))}
        for ctl in (f.prod_ctl, f.cons_ctl):
            out = relayctl("release", "--s2cs", f"127.0.0.1:{ctl}", *f.client_args, uid)
            assert out.returncode == 0 and out.stdout.strip() == f"released {uid}", out.stderr
        wait_bindable(ports["prod"] + ports["cons"])
        assert "no sessions" in f.prod.ctl("sessions", "s2cs").stdout
    finally:
        app.close()


@pytest.mark.slow
@pytest.mark.parametrize("security", ["plain", "tls"])
@pytest.mark.parametrize("num_conn", [1, 4])
def test_one_gib_byte_exact(tmp_path, security, num_conn):
    f = facilities(tmp_path, security)
    try:
        transfer(f, num_conn, GiB, app_ports=min(num_conn, 2))
    finally:
        f.prod.kill()
        f.cons.kill()


def test_concurrent_sessions_are_isolated(tmp_path):
    """Two sessions at once between the same facilities: each consumer gets its own producer's
    bytes; releasing one leaves the other working."""
    f = facilities(tmp_path, "plain")
    apps = {"A": ProducerApp(1, 64 << 20, b"A"), "B": ProducerApp(1, 64 << 20, b"B")}
    try:
        s2cs = {"prod": f"127.0.0.1:{f.prod_ctl}", "cons": f"127.0.0.1:{f.cons_ctl}"}
        sessions = {}
        for name, app in apps.items():
            inbound = ok_json(relayctl("inbound-request", "--s2cs", s2cs["prod"], "--num_conn", "2",
                                       "--remote_ip", "127.0.0.1", "--receiver_ports", str(app.endpoints[0]),
                                       "--json", *f.client_args))
            outbound = ok_json(relayctl("outbound-request", "--s2cs", s2cs["cons"], "--num_conn", "2", "--json",
                                        *f.client_args, inbound["uid"], ",".join(inbound["listeners"])))
            sessions[name] = (inbound, outbound)
        assert sessions["A"][0]["uid"] != sessions["B"][0]["uid"]
        assert not set(sessions["A"][1]["listeners"]) & set(sessions["B"][1]["listeners"])
        results = {name: {} for name in apps}
        errors: list = []
        threads = [t for name in apps for t in consume(sessions[name][1]["listeners"], results[name], errors)]
        for t in threads:
            t.join(300)
        assert not errors
        for name, app in apps.items():
            assert {i: r[1] for i, r in results[name].items()} == app.sent  # its own producer's data
        assert apps["A"].sent != apps["B"].sent
        # release A on both sides; B still carries data
        uid_a = sessions["A"][0]["uid"]
        for ctl in s2cs.values():
            assert relayctl("release", "--s2cs", ctl, *f.client_args, uid_a).returncode == 0
        more: dict = {}
        for t in consume(sessions["B"][1]["listeners"][:1], more, errors):
            t.join(300)
        assert not errors and more[0][1] == apps["B"].sent[0]
        rows = json.loads(f.cons.ctl("sessions", "s2cs", "--json").stdout)["sessions"]
        assert [r["uid"] for r in rows] == [sessions["B"][0]["uid"]]
        assert rows[0]["bytes_from_target"] == 3 * (64 << 20)
    finally:
        for app in apps.values():
            app.close()
        f.prod.kill()
        f.cons.kill()


def test_globus_owners_scope_maps_and_tokens(tmp_path, fake_globus):
    """Both facilities on Globus (each its own client/scope), relayctl with login tokens and scope
    maps: the creator's session works end to end; another identity cannot update or release it;
    an unmapped server and a missing login are errors that say what to do."""
    import uuid

    import grpc
    from globus_sdk.token_storage import TokenStorageData

    from relayd.auth.client import TokenStore
    from stream_helpers import auth_globus, md, pb, stub

    fake = fake_globus
    cons_id, cons_secret = str(uuid.uuid4()), "cons-secret"
    fake.add_client(cons_id, cons_secret)
    scope = {"prod": f"https://auth.globus.org/scopes/{fake.client_id}/scistream",
             "cons": f"https://auth.globus.org/scopes/{cons_id}/scistream"}
    rs = {"prod": fake.client_id, "cons": cons_id}
    auth = {"prod": auth_globus(fake, scope["prod"]),
            "cons": auth_globus(fake, scope["cons"]).replace(fake.client_id, cons_id)
                                                    .replace(fake.client_secret, cons_secret)}
    ctl = {side: free_port() for side in ("prod", "cons")}
    daemons = {side: start(tmp_path, side, stream_config(ctl[side], port_range(4), auth=auth[side],
                                                          auth_name="globus"))
               for side in ("prod", "cons")}
    server = {side: f"127.0.0.1:{ctl[side]}" for side in ctl}
    client_toml = tmp_path / "client.toml"
    client_toml.write_text("[scope_maps.facilities.servers]\n"
                           + "".join(f'"{server[s]}" = "{scope[s]}"\n' for s in ("prod", "cons")))
    people = {"alice": "a1a1a1a1-0000-0000-0000-00000000000a", "bob": "b2b2b2b2-0000-0000-0000-00000000000b"}
    tokens: dict[tuple[str, str], str] = {}
    env = {}
    for person, sub in people.items():
        store = TokenStore(tmp_path / f"{person}-tokens.json")
        sides = ("prod", "cons") if person == "alice" else ("prod",)  # bob never logged in to cons
        entries = {}
        for side in sides:
            tok = fake.issue_token(sub=sub, username=f"{person}@example.org", scopes=[scope[side]],
                                   audience=rs[side])
            tokens[(person, side)] = tok
            entries[rs[side]] = TokenStorageData(rs[side], sub, scope[side], tok, None,
                                                 int(__import__("time").time()) + 3600, "Bearer")
        store.put(entries)
        env[person] = {"RELAYCTL_CLIENT_CONFIG": str(client_toml), "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
                       "RELAYCTL_TOKEN_FILE": str(tmp_path / f"{person}-tokens.json")}
    app = ProducerApp(1, 8 << 20)
    try:
        inbound = ok_json(relayctl("inbound-request", "--s2cs", server["prod"], "--insecure", "--num_conn", "2",
                                   "--remote_ip", "127.0.0.1", "--receiver_ports", str(app.endpoints[0]), "--json",
                                   env=env["alice"]))
        uid = inbound["uid"]
        outbound = ok_json(relayctl("outbound-request", "--s2cs", server["cons"], "--insecure", "--num_conn", "2",
                                    "--json", uid, ",".join(inbound["listeners"]), env=env["alice"]))
        results: dict = {}
        errors: list = []
        for t in consume(outbound["listeners"], results, errors):
            t.join(120)
        assert not errors and {i: r[1] for i, r in results.items()} == app.sent
        rows = json.loads(daemons["prod"].ctl("sessions", "s2cs", "--json").stdout)["sessions"]
        assert rows[0]["owner"] == "alice@example.org"

        # bob holds a valid token for the producer's scope, but the session is alice's
        out = relayctl("release", "--s2cs", server["prod"], "--insecure", uid, env=env["bob"])
        assert out.returncode == 1
        assert "PERMISSION_DENIED" in out.stderr and "belongs to another identity" in out.stderr
        channel, control = stub(ctl["prod"])
        with pytest.raises(grpc.RpcError) as info:
            control.update(pb.UpdateTargets(uid=uid, remote_listeners=["127.0.0.1:9"]),
                           metadata=md(tokens[("bob", "prod")]), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        channel.close()
        # bob never logged in for the consumer's scope: told how to, nothing sent
        out = relayctl("outbound-request", "--s2cs", server["cons"], "--insecure", uid, inbound["listeners"][0],
                       env=env["bob"])
        assert out.returncode == 1 and f"relayctl login --scope {scope['cons']}" in out.stderr
        # an address the scope maps do not know is an error that says how to map it
        out = relayctl("inbound-request", "--s2cs", f"localhost:{ctl['prod']}", "--insecure", env=env["alice"])
        assert out.returncode == 1
        assert f"no Globus scope is mapped for server 'localhost:{ctl['prod']}'" in out.stderr
        assert "--scope" in out.stderr and str(client_toml) in out.stderr
        # a revoked token: the server's s2cs wording, and relayctl's advice
        fake.revoke(tokens[("alice", "cons")])
        out = relayctl("release", "--s2cs", server["cons"], "--insecure", uid, env=env["alice"])
        assert out.returncode == 1
        assert f"Please obtain new credentials: Authentication token is invalid for scope {cons_id}" in out.stderr
        out = relayctl("release", "--s2cs", server["prod"], "--insecure", uid, env=env["alice"])
        assert out.returncode == 0, out.stderr
    finally:
        app.close()
        for daemon in daemons.values():
            daemon.kill()
