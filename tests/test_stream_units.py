"""The sans-I/O parts of the stream component: token bucket, mapping, parsing, port pool, config."""

from __future__ import annotations

import socket

import pytest
from grpclib.const import Status
from pydantic import ValidationError

from relayd.components.stream.config import StreamConfig
from relayd.components.stream.model import StreamError, format_hostport, parse_hostport, round_robin
from relayd.components.stream.ports import PortPool
from relayd.components.stream.ratelimit import TokenBucket
from stream_helpers import port_range


def test_token_bucket_keeps_the_average_rate():
    bucket = TokenBucket(rate=1000.0, burst=100.0, now=0.0)
    assert bucket.consume(100, 0.0) == 0.0  # the burst is free
    assert bucket.consume(500, 0.0) == pytest.approx(0.5)  # in debt: pause 0.5 s
    # a reader that honours every pause moves exactly rate bytes per second on average
    bucket, now, moved = TokenBucket(rate=1000.0, burst=100.0, now=0.0), 0.0, 0
    for _ in range(1000):
        now += bucket.consume(256, now)
        moved += 256
    assert moved / now == pytest.approx(1000.0, rel=0.01)
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)


def test_round_robin_and_addresses():
    targets = [("a", 1), ("b", 2)]
    assert round_robin(targets, 5) == [("a", 1), ("b", 2), ("a", 1), ("b", 2), ("a", 1)]
    assert round_robin(targets * 3, 1) == [("a", 1)]
    assert parse_hostport("[::1]:80") == ("::1", 80)
    assert parse_hostport("host.example:5000") == ("host.example", 5000)
    assert format_hostport("::1", 80) == "[::1]:80"
    for bad in ("host", ":80", "h:0", "h:x", "::1:80", "[nothex]:80"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_port_pool_reserves_checks_and_returns():
    first, last = port_range(4)
    pool = PortPool("127.0.0.1", first, last)
    other = socket.socket()
    other.bind(("127.0.0.1", first))
    other.listen()
    try:
        socks = pool.reserve(3)
        ports = [s.getsockname()[1] for s in socks]
        assert first not in ports and len(set(ports)) == 3 and pool.free == 1
        with pytest.raises(StreamError) as info:
            pool.reserve(1)  # the only port left is taken by someone else
        assert info.value.status is Status.RESOURCE_EXHAUSTED and pool.free == 1
        pool.release(ports, socks)
        assert pool.free == 4
        again = pool.reserve(3)
        assert {s.getsockname()[1] for s in again} == set(ports)
        pool.release([s.getsockname()[1] for s in again], again)
    finally:
        other.close()


def _config(**kw):
    base = {"kind": "stream", "listener": "ctl", "auth": "open"}
    return StreamConfig(**{**base, **kw})


def test_config_rules():
    assert _config(data_bind="127.0.0.1").advertised_host == "127.0.0.1"
    assert _config(advertise="gw.example.org").advertised_host == "gw.example.org"
    assert _config(data_bind="127.0.0.1", ports="6000").port_range == (6000, 6000)
    assert _config(data_bind="127.0.0.1").rate_factor is None  # rate not enforced by default
    assert _config(data_bind="127.0.0.1", rate_unit="kB/s").rate_factor == 1000.0
    assert _config(data_bind="127.0.0.1", rate_unit="Mbit/s").rate_factor == 125000.0
    assert _config(data_bind="127.0.0.1", rate_unit="off").rate_factor is None
    for kw, text in [({}, "set 'advertise'"), ({"data_bind": "::"}, "set 'advertise'"),
                     ({"data_bind": "127.0.0.1", "ports": "x"}, "FIRST-LAST"),
                     ({"data_bind": "127.0.0.1", "security": "tls"}, "[tls] table"),
                     ({"data_bind": "127.0.0.1", "bogus": 1}, "Extra inputs")]:
        with pytest.raises(ValidationError) as info:
            _config(**kw)
        assert text in str(info.value)
