"""Load generator for bench/cluster/relay.py: bench/relay/load.py's cheap clients, with the sender
and the receiver of each pair on given (possibly different) relayd nodes.

usage:
  relay_load.py flood SECONDS SPORT:RPORT [SPORT:RPORT ...]   one sender->receiver pair per argument;
                                                             prints JSON {"delivered": N, "seconds": S}
  relay_load.py latency COUNT SPORT RPORT                    COUNT sequential messages; JSON one-way us
  relay_load.py idle PORT COUNT                              as load.py idle
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "relay"))
from load import BATCH, Client, client_frame, connect, idle, peer_message, server_frame_len


async def flood(seconds: float, pairs: list[tuple[int, int]]) -> None:
    senders: list[Client] = []
    receivers: list[Client] = []
    for sport, rport in pairs:
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


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "flood":
        pairs = [tuple(int(p) for p in arg.split(":")) for arg in sys.argv[3:]]
        coro = flood(float(sys.argv[2]), pairs)  # type: ignore[arg-type]
    elif mode == "latency":
        coro = latency(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        coro = idle(int(sys.argv[2]), int(sys.argv[3]))
    uvloop.run(coro)
    os._exit(0)
