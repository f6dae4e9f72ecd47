"""/metrics is valid Prometheus text exposition with two components of every kind (and two auth
methods of every method): one HELP and one TYPE line per family, the components' samples told
apart by their `component` (auth methods': `auth`) label, checked with prometheus_client's parser."""

from __future__ import annotations

import collections
import re

from prometheus_client.parser import text_string_to_metric_families

from relayd.testing import free_port, get_text
from stream_helpers import port_range
from test_http_proxy import Upstream, basic, request

KINDS = ("status", "relay", "stream", "http_proxy")


def config(ports: dict[str, int], upstream: str) -> str:
    streams = [port_range(4), port_range(4)]
    while set(range(streams[0][0], streams[0][1] + 1)) & set(range(streams[1][0], streams[1][1] + 1)):
        streams[1] = port_range(4)
    text = ""
    for name, port in ports.items():
        text += f'[listeners.{name}]\nbind = "127.0.0.1:{port}"\n'
    for n in (1, 2):
        text += f"""
[auth.open{n}]
method = "none"
[auth.users{n}]
method = "basic"
[auth.globus{n}]
method = "globus"
client_id = "00000000-0000-0000-0000-00000000000{n}"
client_secret = "s"
auth_base_url = "http://127.0.0.1:1"
[components.status{n}]
kind = "status"
listener = "status{n}"
[components.relay{n}]
kind = "relay"
listener = "relay{n}"
auth = "open{n}"
[components.stream{n}]
kind = "stream"
listener = "stream{n}"
auth = "open{n}"
data_bind = "127.0.0.1"
ports = "{streams[n - 1][0]}-{streams[n - 1][1]}"
[components.proxy{n}]
kind = "http_proxy"
auth = "open{n}"
flush_interval = 0.2
[components.proxy{n}.services.open]
listeners = ["proxy{n}"]
from = "/open"
to = "{upstream}"
[components.proxy{n}.services.users]
listeners = ["proxy{n}"]
from = "/users"
to = "{upstream}"
auth = "users{n}"
"""
    return text


def test_two_components_of_every_kind_expose_one_family_per_metric(relayd):
    ports = {f"{kind}{n}": free_port() for kind in ("status", "relay", "stream", "proxy") for n in (1, 2)}
    with Upstream() as up:
        daemon = relayd(config(ports, up.url))
        for n in (1, 2):  # samples in every http_proxy and basic auth family
            assert request(ports[f"proxy{n}"], "GET", "/open/x")[0] == 200
            assert request(ports[f"proxy{n}"], "GET", "/users/x", basic("nobody", "pw"))[0] == 401
        status, text = get_text(f"http://127.0.0.1:{ports['status1']}/metrics")
    assert status == 200
    assert daemon.ctl("metrics").stdout.count("# TYPE ") == text.count("# TYPE ")

    # The text format: exactly one TYPE and one HELP line per family, before its samples.
    types = collections.Counter(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    helps = collections.Counter(re.findall(r"^# HELP (\S+) ", text, re.MULTILINE))
    assert types and all(count == 1 for count in types.values()), [n for n, c in types.items() if c > 1]
    assert helps == types

    families = list(text_string_to_metric_families(text))  # raises on malformed exposition
    names = [f.name for f in families]
    assert len(names) == len(set(names)) == len(types), names
    samples = collections.Counter(
        (s.name, tuple(sorted(s.labels.items()))) for f in families for s in f.samples)
    assert all(count == 1 for count in samples.values()), [k for k, c in samples.items() if c > 1]

    by_name = {f.name: f for f in families}
    # Every family of a component kind holds both components, told apart by `component`.
    for prefix, names_ in (("relayd_relay_", {"relay1", "relay2"}), ("relayd_stream_", {"stream1", "stream2"}),
                           ("relayd_http_proxy_", {"proxy1", "proxy2"})):
        kind_families = [f for n, f in by_name.items() if n.startswith(prefix)]
        assert kind_families, prefix
        for family in kind_families:  # (families of events that did not happen have no samples)
            owners = {s.labels.get("component") for s in family.samples}
            assert owners in (set(), names_), (family.name, owners)
        assert sum(1 for f in kind_families if f.samples) >= 3, prefix
    for prefix, names_ in (("relayd_auth_basic_", {"users1", "users2"}),
                           ("relayd_auth_globus_", {"globus1", "globus2"})):
        auth_families = [f for n, f in by_name.items() if n.startswith(prefix)]
        assert auth_families, prefix
        for family in auth_families:
            assert {s.labels.get("auth") for s in family.samples} == names_, family.name
    up_ = {s.labels["component"]: s.labels["kind"] for s in by_name["relayd_component_up"].samples}
    assert up_ == {f"{k}{n}": ("http_proxy" if k == "proxy" else k)
                   for k in ("status", "relay", "stream", "proxy") for n in (1, 2)}
    requests = {(s.labels["component"], s.labels["service"]): s.value
                for s in by_name["relayd_http_proxy_requests"].samples if s.name.endswith("_total")}
    assert requests[("proxy1", "open")] == 1 and requests[("proxy2", "open")] == 1
    # The second status component serves the same exposition.
    assert get_text(f"http://127.0.0.1:{ports['status2']}/metrics")[1].count("# TYPE ") == len(types)
