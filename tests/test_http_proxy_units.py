"""http_proxy's sans-I/O pieces: routing/mapping and HTTP/1.1 framing (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.components.http_proxy.compat import CompatError, parse_service
from relayd.components.http_proxy.config import HttpProxyConfig
from relayd.components.http_proxy.h1 import Framer, ProtocolError, body_length, split_head
from relayd.components.http_proxy.mapping import has_dot_segment, map_target, matches, normalize_prefix


@pytest.mark.parametrize("prefix,to_path,request_target,expected", [
    # The cases ya-runtime-http-auth's merge_uri_paths test asserts, and the seed's example.
    ("/", "/", "/eth/v1/node/syncing", "/eth/v1/node/syncing"),
    ("/sub/2", "/to", "/sub/2", "/to"),
    ("/sub/2", "/to", "/sub/2/", "/to/"),
    ("/sub/2", "/to", "/sub/2/test", "/to/test"),
    ("/sub/2", "/to", "/sub/2/resource/", "/to/resource/"),
    ("/", "/to", "/resource", "/to/resource"),
    ("/acme", "", "/acme/register", "/register"),
    ("/acme", "", "/acme/register?x=1&y", "/register?x=1&y"),
    ("/acme", "", "/acme", "/"),
    ("/acme/", "", "/acme?q=1", "/?q=1"),
])
def test_map_target(prefix, to_path, request_target, expected):
    p = normalize_prefix(prefix)
    assert matches(p, request_target)
    assert map_target(p, request_target, to_path) == expected


def test_segment_aware_matching():
    assert matches("/acme", "/acme/x") and matches("/acme", "/acme?x")
    assert not matches("/acme", "/acmefoo") and not matches("/acme", "/acm")
    assert matches("", "/anything")


def test_dot_segments():
    for bad in ("/a/../b", "/a/./b", "/a/%2e%2E/b", "/..", "/a/.%2e"):
        assert has_dot_segment(bad), bad
    for ok in ("/a/b.txt", "/a/..b", "/.well-known/x", "/a?x=/../"):
        assert not has_dot_segment(ok), ok


def _service(listeners, frm, names=()):
    return {"listeners": listeners, "from": frm, "to": "http://127.0.0.1:1", "server_names": list(names)}


def test_overlap_rules():
    def check(*services):
        return HttpProxyConfig.model_validate({"kind": "http_proxy", "auth": "a",
                                               "services": {f"s{i}": s for i, s in enumerate(services)}})

    check(_service(["l"], "/acme"), _service(["l"], "/acmefoo"))
    check(_service(["l"], "/acme"), _service(["m"], "/acme"))  # different listeners
    check(_service(["l"], "/", ["a.example"]), _service(["l"], "/", ["b.example"]))  # virtual hosts
    for pair in ((_service(["l"], "/acme"), _service(["l"], "/acme/x")),
                 (_service(["l"], "/"), _service(["l"], "/x")),
                 (_service(["l"], "/x", ["a.example"]), _service(["l", "m"], "/x"))):
        with pytest.raises(ValueError, match="overlap"):
            check(*pair)


def test_framer_fixed_and_until_close():
    f = Framer(5)
    assert f.feed(b"abc") == 3 and not f.done
    assert f.feed(b"defg") == 2 and f.done
    assert Framer(0).done
    f = Framer(None, until_close=True)
    assert f.feed(b"x" * 10) == 10 and not f.done


def test_chunked_framing_split_anywhere():
    body = b"5\r\nhello\r\n6;ext=v\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    for cut in range(len(body) + 1):
        f = Framer(-1)
        n = f.feed(body[:cut])
        n += f.feed(body[cut:] + b"NEXT")
        assert f.done and n == len(body), cut


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=8), st.integers(1, 7))
def test_chunked_framing_property(chunks, step):
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    f = Framer(-1)
    consumed = 0
    for i in range(0, len(body), step):
        consumed += f.feed(body[i:i + step])
    assert f.done and consumed == len(body)


@pytest.mark.parametrize("bad", [b"zz\r\n", b"-1\r\n", b"0x5\r\n", b"5\nhello"])
def test_chunked_framing_rejects(bad):
    with pytest.raises(ProtocolError):
        Framer(-1).feed(bad)


def test_head_parsing_rejects_smuggling_shapes():
    with pytest.raises(ProtocolError):
        split_head(b"GET / HTTP/1.1\r\n folded: x")
    with pytest.raises(ProtocolError):
        split_head(b"GET / HTTP/1.1\r\nbad name: x")
    _, headers = split_head(b"GET / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked")
    with pytest.raises(ProtocolError):
        body_length(headers)
    _, headers = split_head(b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip")
    with pytest.raises(ProtocolError) as info:
        body_length(headers)
    assert info.value.status == 501
    _, headers = split_head(b"GET / HTTP/1.1\r\nContent-Length: +5")
    with pytest.raises(ProtocolError):
        body_length(headers)


def test_parse_service_requires_binds_and_cert():
    with pytest.raises(CompatError, match="bindHttps"):
        parse_service({"from": "/a", "to": "http://h"})
    with pytest.raises(CompatError, match="cert"):
        parse_service({"from": "/a", "to": "http://h", "bindHttps": "0.0.0.0:443"})
    parsed = parse_service({"from": "/a", "to": "http://h", "bind": ["1.2.3.4:1", "1.2.3.4:2"],
                            "cert": {"path": "c", "keyPath": "k"}, "responseTimeout": 1500})
    assert parsed["https"] == ["1.2.3.4:1", "1.2.3.4:2"] and parsed["read_timeout"] == 1.5


def test_dechunking_for_http10_clients():
    body = b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n"
    for cut in range(len(body) + 1):
        f = Framer(-1, dechunk=True)
        f.feed(body[:cut])
        f.feed(body[cut:])
        assert f.done and b"".join(f.payload) == b"hello world", cut


def test_pooled_upstream_connections_read_again():
    """An upstream connection paused for a slow client just as its response ended must be
    reading when it goes back to the pool (found by the 1 GiB test: the next request hung)."""
    from types import SimpleNamespace

    from relayd.components.http_proxy.proxy import UpstreamConnection
    from relayd.components.http_proxy.routes import Route

    class Transport:
        reading = False

        def resume_reading(self):
            self.reading = True

        def abort(self):
            pass

    route = Route.__new__(Route)
    route.idle = []
    route.core = SimpleNamespace(upstream_idle=4, stopping=False)
    conn = UpstreamConnection()
    conn.transport = Transport()  # type: ignore[assignment]
    route.pool_put(conn)
    assert route.idle == [conn] and conn.transport.reading
