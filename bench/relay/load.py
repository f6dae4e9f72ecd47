"""Load generator for the relay benches (bench_relay.py, bench/cluster/relay.py): cheap hand-rolled
WebSocket clients, so the relay is the bottleneck.

usage:
  load.py flood PORT PAIRS SECONDS   PAIRS sender->receiver pairs; senders write pre-masked
                                     peer_connection frames in batches under flow control;
                                     receivers only count bytes. Prints JSON {"delivered": N, "seconds": S}.
  load.py flood-across SECONDS SPORT:RPORT [SPORT:RPORT ...]
                                     the same flood, one pair per argument, the sender on relayd
                                     port SPORT and its receiver on RPORT (possibly other nodes)
  load.py latency PORT COUNT [RPORT] one pair (its receiver on RPORT if given), COUNT sequential
                                     messages; prints JSON one-way latencies (us)
  load.py idle PORT COUNT            COUNT registered clients that stay idle (answering pings, so the
                                     relay's keepalive keeps them); prints "ready" when all are
                                     registered, then waits for stdin to close.
Every client registers like proxystore's RelayClient (relay_registration, waits for relay_response).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid

import uvloop

MASK = b"\x11\x22\x33\x44"
REPLY_LEN = 2 + len('{"success": true, "message": null, "error": false, "message_type": "relay_response"}')
HIGH = 256 * 1024
BATCH = 64


def client_frame(text: str) -> bytes:
    data = text.encode()
    n = len(data)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(data))
    return head + MASK + masked


def server_frame_len(text: str) -> int:
    n = len(text.encode())
    return n + (2 if n < 126 else 4)


def peer_message(src: str, dst: str, description: str) -> str:
    # exactly what relayd and proxystore-relay forward (canonical encoding), so sizes match
    return json.dumps({"source_uuid": src, "source_name": "bench", "peer_uuid": dst, "description_type": "offer",
                       "description": description, "error": None, "message_type": "peer_connection"})


class Client(asyncio.Protocol):
    def __init__(self, port: int) -> None:
        self.port = port
        self.uuid = str(uuid.uuid4())
        loop = asyncio.get_running_loop()
        self.handshaken = loop.create_future()
        self.registered = loop.create_future()
        self.buf = b""
        self.count = 0
        self.waiter: asyncio.Future | None = None
        self.expect = 0
        self.drained = asyncio.Event()
        self.drained.set()
        self.answer_pings = False  # idle clients answer the relay's keepalive pings, like RelayClient
        self.inbox = b""

    def pong(self, data: bytes) -> None:
        """Answer every ping frame with a pong (server frames are unmasked; control frames carry
        at most 125 bytes, RFC 6455 5.5)."""
        self.inbox += data
        while len(self.inbox) >= 2:
            n = self.inbox[1] & 0x7F
            head = 2 if n < 126 else 4 if n == 126 else 10
            if n >= 126:
                if len(self.inbox) < head:
                    return
                n = int.from_bytes(self.inbox[2:head], "big")
            if len(self.inbox) < head + n:
                return
            opcode, payload = self.inbox[0] & 0x0F, self.inbox[head:head + n]
            self.inbox = self.inbox[head + n:]
            if opcode == 0x9:
                self.t.write(bytes([0x8A, 0x80 | n]) + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload)))

    def connection_made(self, transport) -> None:
        self.t = transport
        transport.set_write_buffer_limits(high=HIGH)
        transport.write((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        if not self.registered.done():
            self.buf += data
            if not self.handshaken.done():
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    return
                assert self.buf.startswith(b"HTTP/1.1 101"), self.buf[:100]
                self.buf = self.buf[i + 4:]
                self.handshaken.set_result(None)
            if len(self.buf) >= REPLY_LEN:
                assert b'"success": true' in self.buf[:REPLY_LEN], self.buf
                self.count += len(self.buf) - REPLY_LEN
                self.buf = b""
                self.registered.set_result(None)
            return
        self.count += len(data)
        if self.answer_pings:
            self.pong(data)
        if self.waiter is not None and self.count >= self.expect and not self.waiter.done():
            self.waiter.set_result(time.perf_counter())

    def connection_lost(self, exc) -> None:
        for fut in (self.handshaken, self.registered):
            if not fut.done():
                fut.set_exception(ConnectionError("closed"))
        self.drained.set()

    def pause_writing(self) -> None:
        self.drained.clear()

    def resume_writing(self) -> None:
        self.drained.set()

    async def register(self) -> None:
        await self.handshaken
        self.t.write(client_frame(json.dumps({"name": "bench", "uuid": self.uuid,
                                              "message_type": "relay_registration"})))
        await self.registered


async def connect(port: int, answer_pings: bool = False) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: Client(port), "127.0.0.1", port)
    await client.register()
    client.answer_pings = answer_pings  # (flood receivers only count bytes: they never idle)
    return client


async def flood(seconds: float, ports: list[tuple[int, int]]) -> None:
    """One sender->receiver pair per (sender port, receiver port)."""
    senders: list[Client] = []
    receivers: list[Client] = []
    for sport, rport in ports:
        senders.append(await connect(sport))
        receivers.append(await connect(rport))
    text = peer_message(senders[0].uuid, receivers[0].uuid, "x" * 60)
    size = server_frame_len(text)
    batches = [client_frame(peer_message(s.uuid, r.uuid, "x" * 60)) * BATCH for s, r in zip(senders, receivers)]
    start_counts = [r.count for r in receivers]
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()

    async def pump(sender: Client, batch: bytes) -> None:
        while time.perf_counter() < end and not sender.t.is_closing():
            sender.t.write(batch)
            if not sender.drained.is_set():
                try:
                    await asyncio.wait_for(sender.drained.wait(), max(0.0, end - time.perf_counter()))
                except TimeoutError:
                    break
            else:
                await asyncio.sleep(0)

    await asyncio.gather(*(pump(s, b) for s, b in zip(senders, batches)))
    elapsed = time.perf_counter() - t0
    delivered = sum((r.count - c0) // size for r, c0 in zip(receivers, start_counts))
    for c in senders + receivers:
        c.t.abort()
    print(json.dumps({"delivered": delivered, "seconds": elapsed}), flush=True)


async def latency(count: int, sport: int, rport: int) -> None:
    a, b = await connect(sport), await connect(rport)
    text = peer_message(a.uuid, b.uuid, "x" * 60)
    frame, size = client_frame(text), server_frame_len(text)
    loop = asyncio.get_running_loop()
    samples = []
    for _ in range(count):
        b.waiter = loop.create_future()
        b.expect = b.count + size
        t0 = time.perf_counter()
        a.t.write(frame)
        t1 = await b.waiter
        samples.append((t1 - t0) * 1e6)
    a.t.abort()
    b.t.abort()
    print(json.dumps({"latency_us": samples}), flush=True)


async def idle(port: int, count: int) -> None:
    clients: list[Client] = []
    wave = 500  # stay under the listen backlog
    for start in range(0, count, wave):
        clients += await asyncio.gather(*(connect(port, True) for _ in range(min(wave, count - start))))
    print("ready", len(clients), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for c in clients:
        c.t.abort()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "flood":
        port, pairs = int(args[0]), int(args[1])
        coro = flood(float(args[2]), [(port, port)] * pairs)
    elif mode == "flood-across":
        coro = flood(float(args[0]), [(int(s), int(r)) for s, r in (arg.split(":") for arg in args[1:])])
    elif mode == "latency":
        port = int(args[0])
        coro = latency(int(args[1]), port, int(args[2]) if len(args) > 2 else port)
    else:
        coro = idle(int(args[0]), int(args[1]))
    uvloop.run(coro)
    os._exit(0)
