"""http_proxy's sans-I/O pieces: routing/mapping, compat parsing, pooling (no sockets)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from relayd.components.http_proxy.compat import CompatError, parse_service
from relayd.components.http_proxy.config import HttpProxyConfig
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


def test_parse_service_requires_binds_and_cert():
    with pytest.raises(CompatError, match="bindHttps"):
        parse_service({"from": "/a", "to": "http://h"})
    with pytest.raises(CompatError, match="cert"):
        parse_service({"from": "/a", "to": "http://h", "bindHttps": "0.0.0.0:443"})
    parsed = parse_service({"from": "/a", "to": "http://h", "bind": ["1.2.3.4:1", "1.2.3.4:2"],
                            "cert": {"path": "c", "keyPath": "k"}, "responseTimeout": 1500})
    assert parsed["https"] == ["1.2.3.4:1", "1.2.3.4:2"] and parsed["read_timeout"] == 1.5


def test_pooled_upstream_connections_read_again():
    """An upstream connection paused for a slow client just as its response ended must be
    reading when it goes back to the pool (found by the 1 GiB test: the next request hung)."""
    from relayd.auth.none import NoAuth, NoAuthConfig
    from relayd.components.http_proxy.config import ServiceConfig
    from relayd.components.http_proxy.counters import Counters
    from relayd.components.http_proxy.routes import Core, Route
    from relayd.components.http_proxy.upstream import UpstreamConnection

    class Transport:
        reading = False

        def resume_reading(self):
            self.reading = True

        def abort(self):
            pass

    # A real Route, Core and Counters (never started: no database, journal file nor thread): the
    # classes are compiled (mypyc), so a bare instance with attributes set from outside, or
    # None for a Counters, is not possible.
    counters = Counters(SimpleNamespace(path=Path("/nonexistent/test.db"), service_gens={}), 100)  # type: ignore[arg-type]
    core = Core(None, counters, keepalive_timeout=75, auth_cache_ttl=0, upstream_idle=4)  # type: ignore[arg-type]
    config = ServiceConfig.model_validate({"listeners": ["web"], "from": "/", "to": "http://127.0.0.1:9"})
    method = NoAuth("open", NoAuthConfig(method="none"), None)  # type: ignore[arg-type]
    route = Route("r", config, method, core, ("X-Forwarded-User", "X-Forwarded-Email"), None)
    assert route.idle == []
    conn = UpstreamConnection()
    conn.transport = Transport()  # type: ignore[assignment]
    route.pool_put(conn)
    assert route.idle == [conn] and conn.transport.reading


# -- HTTP versions, as the readers tell them without asking llhttp for a formatted string --------

@pytest.mark.parametrize("request_head,http10,keep_alive", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", False, True),
    (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", False, False),
    (b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", True, False),
    (b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", True, True),
    # llhttp reads Proxy-Connection like Connection: keep-alive does not make this HTTP/1.1
    (b"GET / HTTP/1.0\r\nHost: a\r\nProxy-Connection: keep-alive\r\n\r\n", True, True),
])
def test_request_version(request_head, http10, keep_alive):
    from relayd.components.http_proxy.http1 import HEAD, RequestReader

    (kind, head), *_ = RequestReader().feed(request_head)
    assert kind == HEAD and (head.http10, head.keep_alive) == (http10, keep_alive)


@pytest.mark.parametrize("version", [b"2.0", b"0.9"])
def test_request_versions_other_than_1x_refused_with_or_without_keep_alive(version):
    from relayd.components.http_proxy.http1 import ERROR, RequestReader

    for extra in (b"", b"Connection: keep-alive\r\n", b"Proxy-Connection: keep-alive\r\n"):
        (kind, error), = RequestReader().feed(b"GET / HTTP/%s\r\nHost: a\r\n%s\r\n" % (version, extra))
        assert kind == ERROR and error.status == 505


@pytest.mark.parametrize("split", [0, 3, 9, 12])
@pytest.mark.parametrize("version,ok", [(b"1.1", True), (b"1.0", True), (b"2.0", False), (b"0.9", False)])
def test_response_version_in_one_or_two_segments(version, ok, split):
    from relayd.components.http_proxy.http1 import ERROR, HEAD
    from relayd.components.http_proxy.response_reader import ResponseReader

    response = b"HTTP/%s 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n" % version
    reader = ResponseReader().start(False, False)
    events = reader.feed(response[:split]) + reader.feed(response[split:]) if split else reader.feed(response)
    assert events[0][0] == (HEAD if ok else ERROR)
    if ok:  # and the next response on the same parser is read the same way
        reader.start(False, False)
        assert reader.feed(b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n")[0][0] == ERROR
