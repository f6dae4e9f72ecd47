"""The /metrics exposition does not change by accident: every family's name, TYPE and HELP, and
its samples' names, labels and values (those that depend on timing left out), from a real relayd
with every built-in component kind (the relay in a Redis cluster), the auth methods that have
metrics and a listener with max_connections, are compared with tests/metrics_families.json,
captured before the families were built by one helper (relayd.metric_families).

A deliberate change of the exposition rewrites the file:
RELAYD_WRITE_METRICS_FAMILIES=1 python -m pytest tests/test_metrics_families.py
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import websockets
from prometheus_client.parser import text_string_to_metric_families

from relayd.testing import free_port, get_text
from stream_helpers import port_range
from test_http_proxy import Upstream, basic, request

SNAPSHOT = Path(__file__).with_name("metrics_families.json")


def config(ports: dict[str, int], upstream: str, redis_url: str) -> str:
    low, high = port_range(4)
    return f"""
[cluster]
redis = "{redis_url}"
node = "n1"
[listeners.status]
bind = "127.0.0.1:{ports['status']}"
max_connections = 50
[listeners.relay]
bind = "127.0.0.1:{ports['relay']}"
[listeners.stream]
bind = "127.0.0.1:{ports['stream']}"
[listeners.proxy]
bind = "127.0.0.1:{ports['proxy']}"
[auth.open]
method = "none"
[auth.users]
method = "basic"
[auth.globus]
method = "globus"
client_id = "00000000-0000-0000-0000-000000000001"
client_secret = "s"
auth_base_url = "http://127.0.0.1:1"
[components.status]
kind = "status"
listener = "status"
[components.relay]
kind = "relay"
listener = "relay"
auth = "open"
[components.stream]
kind = "stream"
listener = "stream"
auth = "open"
data_bind = "127.0.0.1"
ports = "{low}-{high}"
[components.proxy]
kind = "http_proxy"
auth = "open"
flush_interval = 0.2
[components.proxy.services.open]
listeners = ["proxy"]
from = "/open"
to = "{upstream}"
[components.proxy.services.users]
listeners = ["proxy"]
from = "/users"
to = "{upstream}"
auth = "users"
"""


async def relay_close_4000(port: int) -> None:
    """A registration, then a frame the relay does not know: one close with code 4000."""
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        await ws.send(json.dumps({"name": "x", "uuid": "6f1c8a34-9d0e-4d7e-9a51-2b8f3c1d0e11",
                                  "message_type": "relay_registration"}))
        await ws.recv()
        await ws.send("not json")
        await ws.wait_closed()
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 4000


# Values that depend on timing (open connections, the scrape's own included): labels only.
VOLATILE = {"relayd_uptime_seconds", "relayd_listener_connections", "relayd_relay_connections",
            "relayd_relay_clients"}


def families_of(text: str) -> dict[str, dict]:
    """Each family's TYPE, HELP and its samples' names, labels and values."""
    out = {}
    for family in text_string_to_metric_families(text):
        samples = sorted({json.dumps([s.name, s.labels, None if family.name in VOLATILE else s.value],
                                     sort_keys=True) for s in family.samples})
        out[family.name] = {"type": family.type, "help": family.documentation,
                            "samples": [json.loads(s) for s in samples]}
    return out


def test_metrics_families_match_the_snapshot(relayd, redis_server):
    ports = {name: free_port() for name in ("status", "relay", "stream", "proxy")}
    with Upstream() as up:
        daemon = relayd(config(ports, up.url, redis_server.url))
        assert request(ports["proxy"], "GET", "/open/x")[0] == 200
        assert request(ports["proxy"], "GET", "/users/x", basic("nobody", "pw"))[0] == 401
        asyncio.run(asyncio.wait_for(relay_close_4000(ports["relay"]), 60))
        reload = daemon.ctl("reload")
        assert reload.returncode == 0, reload.stderr
        status, text = get_text(f"http://127.0.0.1:{ports['status']}/metrics")
    assert status == 200
    found = families_of(text)
    if os.environ.get("RELAYD_WRITE_METRICS_FAMILIES") == "1":
        SNAPSHOT.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    expected = json.loads(SNAPSHOT.read_text())
    assert sorted(found) == sorted(expected)
    for name, family in expected.items():
        assert found[name] == family, name
