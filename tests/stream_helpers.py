"""Helpers shared by the stream tests: configs, a grpcio stub, waiting on the data plane."""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import threading
import time
from pathlib import Path

import grpc

import scistream_pb2_grpc as pb_grpc
from relayd.components.stream.proto import scistream_pb2 as pb
from relayd.testing import free_port, start_relayd, write_config

SCOPE_SUFFIX = "scistream"


def port_range(size: int = 8) -> tuple[int, int]:
    """A range below the ephemeral ports (32768+), so no client socket lands in it."""
    while True:
        first = random.randrange(20000, 32000 - size)
        if all(_bindable(p) for p in range(first, first + size)):
            return first, first + size - 1


def _bindable(port: int) -> bool:
    """Free for a new listener (SO_REUSEADDR: old connections of the port may linger in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_bindable(ports: list[int], timeout: float = 10.0) -> None:
    """Poll (with a deadline) until every port can be bound again: the pool let go of it."""
    deadline = time.monotonic() + timeout
    while not all(_bindable(p) for p in ports):
        if time.monotonic() > deadline:
            raise AssertionError(f"ports {ports} still in use after {timeout}s")
        time.sleep(0.02)


def auth_none() -> str:
    return '[auth.open]\nmethod = "none"\n'


def auth_globus(fake, scope: str) -> str:
    return (
        "[auth.globus]\n"
        'method = "globus"\n'
        f'client_id = "{fake.client_id}"\n'
        f'client_secret = "{fake.client_secret}"\n'
        f'required_scopes = ["{scope}"]\n'
        f'auth_base_url = "{fake.base_url.rstrip("/")}"\n'
        "negative_cache_ttl = 0\n"
        "cache_ttl = 0\n"  # a revoked token is refused at once
    )


# The tests' targets run on this host: list loopback (refused unless listed).
LOOPBACK_TARGETS = 'allowed_targets = ["127.0.0.0/8", "::1/128"]'


def stream_config(ctl_port: int, ports: tuple[int, int], *, auth: str, auth_name: str = "open",
                  extra: str = "", listener_tls: str = "", allowed: str | None = LOOPBACK_TARGETS) -> str:
    return f"""
[listeners.ctl]
bind = "127.0.0.1:{ctl_port}"
{listener_tls}
{auth}
[components.s2cs]
kind = "stream"
listener = "ctl"
auth = "{auth_name}"
data_bind = "127.0.0.1"
ports = "{ports[0]}-{ports[1]}"
{allowed or ""}
{extra}
"""


def start(tmp_path: Path, name: str, config: str):
    base = tmp_path / name
    base.mkdir(parents=True, exist_ok=True)
    return start_relayd(base, write_config(base / "etc", config))


def stub(ctl_port: int, root_cert: bytes | None = None) -> tuple[grpc.Channel, pb_grpc.ControlStub]:
    target = f"127.0.0.1:{ctl_port}"
    if root_cert is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root_cert))
    return channel, pb_grpc.ControlStub(channel)


def md(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", token)] if token is not None else []


def hello_when_registered(control: pb_grpc.ControlStub, uid: str, prod_listeners: list[str],
                          token: str | None = None, role: str = "PROD", timeout: float = 10.0):
    """Send the hello once the req is registered (NOT_FOUND until then), like appctrl's retries."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return control.hello(pb.Hello(uid=uid, prod_listeners=prod_listeners, role=role),
                                 metadata=md(token), timeout=10)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def open_session(control, uid: str, role: str, num_conn: int, targets: list[str], token=None, rate: int = 0):
    """req + hello + update over the grpcio stub; returns (req response, update response)."""
    future = control.req.future(pb.Request(uid=uid, role=role, num_conn=num_conn, rate=rate),
                                metadata=md(token), timeout=30)
    hello_when_registered(control, uid, targets, token, role)
    response = future.result()
    updated = control.update(pb.UpdateTargets(uid=uid, remote_listeners=targets, role=role),
                             metadata=md(token), timeout=10)
    return response, updated


# -- watching a relayd process and moving checked bytes (the data-plane tests) ----------------

CHUNK = 1 << 20


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_listing(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return sorted(out)


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def process_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def back_to(pid: int, fds: int, threads: int) -> None:
    """relayd's descriptors and threads return to a baseline (the listing if they do not)."""
    try:
        poll_until(lambda: open_fds(pid) <= fds and thread_count(pid) <= threads, "descriptors and threads back")
    except AssertionError:
        raise AssertionError(f"{open_fds(pid)} descriptors (was {fds}), {thread_count(pid)} threads (was "
                             f"{threads}): {fd_listing(pid)}") from None


def poll_until(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {timeout}s")
        time.sleep(0.02)


def chunk_stream(seed: int):
    """Distinct 1 MiB chunks (a counter over a random block): a chunk lost, repeated or swapped
    changes the hash. Cheap to make, so 1 GiB costs only the hashing."""
    block = bytearray(os.urandom(CHUNK))
    i = 0
    while True:
        struct.pack_into("<QQ", block, 0, seed, i)
        yield block
        i += 1


def send_stream(sock: socket.socket, total: int, seed: int, digest, *, shutdown: bool = True) -> None:
    chunks = chunk_stream(seed)
    left = total
    while left:
        chunk = memoryview(next(chunks))[:min(CHUNK, left)]
        sock.sendall(chunk)
        digest.update(chunk)
        left -= len(chunk)
    if shutdown:
        sock.shutdown(socket.SHUT_WR)


def flood_both_ways(clients: list[socket.socket], served: list[socket.socket],
                    stop: threading.Event, ends: list[str]) -> list[threading.Thread]:
    """A thread per socket that sends and reads until ``stop`` or the peer closes; each
    appends its name (c0.., a0..) to ``ends`` when its socket saw the end. Started."""

    def pump(sock: socket.socket, name: str) -> None:
        block = b"z" * (1 << 18)
        sock.setblocking(False)
        try:
            while not stop.is_set():
                r, w, _ = select.select([sock], [sock], [], 0.5)
                if r and not sock.recv(1 << 20):
                    break
                if w:
                    sock.send(block)
        except (ConnectionResetError, BrokenPipeError, BlockingIOError):
            pass
        ends.append(name)
        sock.close()

    workers = [threading.Thread(target=pump, args=(s, f"c{i}")) for i, s in enumerate(clients)]
    workers += [threading.Thread(target=pump, args=(s, f"a{i}")) for i, s in enumerate(served)]
    for t in workers:
        t.start()
    return workers


def drain(sock: socket.socket, digest) -> int:
    got = 0
    buf = bytearray(CHUNK)
    while n := sock.recv_into(buf):
        digest.update(memoryview(buf)[:n])
        got += n
    return got


def peer_closed(sock: socket.socket) -> bool:
    """True once the peer has closed (EOF or reset); reads and drops what is still queued."""
    try:
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(1 << 20):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    return False


__all__ = ["free_port", "pb"]
