"""The http_proxy's exchange core, playbook style: events in, actions out, no sockets.

``ClientCore`` is driven exactly as the asyncio shell drives it (client bytes, auth results,
upstream ready, upstream bytes, upstream lost) and every action it asks of its ``io`` is
recorded. Each test states the rule it checks (RFC 9110/9112).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from relayd.auth.base import AuthConfig, AuthMethod, Identity
from relayd.auth.none import NoAuth, NoAuthConfig
from relayd.components.http_proxy.config import ServiceConfig
from relayd.components.http_proxy.core import MAX_QUEUE, ClientCore
from relayd.components.http_proxy.counters import Counters
from relayd.components.http_proxy.routes import Core, Route, Router


class PasswordAuth(AuthMethod):
    """An auth method with no anonymous access: the core must ask the shell to authenticate."""

    async def authenticate(self, authorization: str | None) -> Identity:  # pragma: no cover
        raise AssertionError("the playbook answers auth itself")


class IO:
    """Records what the core asks, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.clock = 100.0
        self.wakes: list[float] = []

    def now(self) -> float:
        return self.clock

    def send(self, *parts: bytes) -> None:
        self.log.append(("send", b"".join(parts)))

    def close(self, linger: bool = False) -> None:
        self.log.append(("close",))

    def abort(self) -> None:
        self.log.append(("abort",))

    def set_reading(self, on: bool) -> None:
        self.log.append(("reading", on))

    def wake_at(self, when: float) -> None:
        self.wakes.append(when)

    def authenticate(self, ex) -> None:
        self.log.append(("authenticate", ex.req.authorization))

    def browser_endpoint(self, ex, method, target) -> None:  # pragma: no cover
        self.log.append(("browser", target))

    def connect(self, ex, pooled: bool) -> None:
        self.log.append(("connect", pooled))

    def send_upstream(self, ex, *parts: bytes) -> None:
        self.log.append(("upstream", b"".join(parts)))

    def release_upstream(self, ex, reusable: bool) -> None:
        self.log.append(("release", reusable))

    def splice(self, ex, length: int) -> bool:
        return False

    def record(self, ex) -> None:
        self.log.append(("record", ex.user, ex.endpoint, ex.status, ex.bytes_in, ex.bytes_out))

    def take(self) -> list[tuple[Any, ...]]:
        out, self.log = self.log, []
        return out

    def sent(self) -> bytes:
        return b"".join(entry[1] for entry in self.log if entry[0] == "send")


def make_core(auth: str = "none", **service: Any) -> tuple[ClientCore, IO]:
    # Counters is compiled too (mypyc checks the type): a real one, never started.
    counters = Counters(SimpleNamespace(path=Path("/nonexistent/test.db"), service_gens={}), 100)  # type: ignore[arg-type]
    core = Core(None, counters, keepalive_timeout=75, auth_cache_ttl=0, upstream_idle=4)  # type: ignore[arg-type]
    core.protected_headers = frozenset({b"x-forwarded-user", b"x-forwarded-email"})
    method: AuthMethod
    if auth == "none":
        method = NoAuth("open", NoAuthConfig(method="none"), None)  # type: ignore[arg-type]
    else:
        method = PasswordAuth("users", AuthConfig.model_construct(method="basic"), None)  # type: ignore[arg-type]
    config = ServiceConfig.model_validate({"listeners": ["web"], "from": "/acme", "to": "http://up:8080/base",
                                           **service})
    route = Route("acme", config, method, core, ("X-Forwarded-User", "X-Forwarded-Email"), None)
    router = Router(core, "web", lambda methods: {})
    router.set_routes([route])
    io = IO()
    return ClientCore(router, io, tls=False, peer="192.0.2.7"), io


def serve_ok(state: ClientCore, io: IO, body: bytes = b"ok", reused: bool = False) -> None:
    """The upstream side of one exchange: connected, answered with ``body``."""
    ex = state.ex
    assert ex is not None
    state.upstream_ready(ex, object(), reused=reused)
    state.upstream_data(ex, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


# -- the happy path ------------------------------------------------------------------------------

def test_get_is_forwarded_with_our_framing_and_headers_and_the_connection_pooled():
    state, io = make_core()
    state.client_data(b"GET /acme/x?q=1 HTTP/1.1\r\nHost: pub.example\r\nAccept: */*\r\n"
                      b"X-Forwarded-For: 10.0.0.1\r\n\r\n")
    assert io.take() == [("connect", True)]
    ex = state.ex
    state.upstream_ready(ex, object(), reused=False)
    (kind, head), = io.take()
    assert kind == "upstream"
    assert head == (b"GET /base/x?q=1 HTTP/1.1\r\nAccept: */*\r\nHost: up:8080\r\n"
                    b"X-Forwarded-For: 10.0.0.1, 192.0.2.7\r\nX-Forwarded-Host: pub.example\r\n"
                    b"X-Forwarded-Proto: http\r\n"
                    b"Forwarded: for=192.0.2.7;host=\"pub.example\";proto=http\r\n\r\n")
    state.upstream_data(ex, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok")
    assert io.take() == [("send", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
                         ("record", "(anonymous)", "/acme/x", 200, 0, 2), ("release", True)]
    assert state.ex is None and not state.closed


# -- RFC 9112 section 6 and 11.2: the proxy frames what it forwards ------------------------------

@pytest.mark.parametrize("connection", [b"content-length", b"Transfer-Encoding", b"close, host",
                                        b"X-Forwarded-User"])
def test_connection_may_not_declare_framing_host_or_identity_hop_by_hop(connection):
    # The smuggling found on the old engine: "Connection: content-length" removed the length
    # from the forwarded head while the body was still framed by it.
    state, io = make_core()
    state.client_data(b"POST /acme/x HTTP/1.1\r\nHost: a\r\nConnection: " + connection +
                      b"\r\nContent-Length: 36\r\n\r\nGET /acme/admin HTTP/1.1\r\nHost: a\r\n\r\n")
    log = io.take()
    assert log[0][0] == "send" and log[0][1].startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert ("close",) in log and not [e for e in log if e[0] in ("connect", "upstream")]


def test_chunked_body_is_rechunked_extensions_and_trailers_dropped():
    state, io = make_core()
    state.client_data(b"POST /acme/up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5;ext=\"x\"\r\nhello\r\n")
    state.upstream_ready(state.ex, object(), reused=False)
    state.client_data(b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    upstream = b"".join(e[1] for e in io.take() if e[0] == "upstream")
    head, _, body = upstream.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"


def test_content_length_body_goes_with_exactly_that_length():
    state, io = make_core()
    state.client_data(b"PUT /acme/f HTTP/1.1\r\nHost: a\r\ncontent-length: 3\r\n\r\nabcGET /acme/next")
    state.upstream_ready(state.ex, object(), reused=False)
    upstream = b"".join(e[1] for e in io.take() if e[0] == "upstream")
    assert upstream.endswith(b"Content-Length: 3\r\n\r\nabc") and upstream.count(b"HTTP/1.1") == 1


@pytest.mark.parametrize("response,why", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "CL+TE"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", "duplicate CL"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx", "TE not chunked"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n", "chunk size"),
    (b"HTTP/1.1 20 OK\r\n\r\n", "status"),
    (b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", "version"),
    (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n", "obs-fold"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n", "101 unasked"),
])
def test_malformed_or_ambiguous_response_is_502_and_never_pooled(response, why):
    state, io = make_core()
    state.client_data(b"GET /acme/x HTTP/1.1\r\nHost: a\r\n\r\n")
    state.upstream_ready(state.ex, object(), reused=False)
    io.take()
    state.upstream_data(state.ex, response)
    log = io.take()
    assert ("release", False) in log and ("release", True) not in log, why
    assert log[-1] == ("close",), why
    sent = b"".join(e[1] for e in log if e[0] == "send")
    assert sent.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), why


def test_bytes_after_the_response_keep_the_upstream_connection_out_of_the_pool():
    state, io = make_core()
    state.client_data(b"GET /acme/x HTTP/1.1\r\nHost: a\r\n\r\n")
    state.upstream_ready(state.ex, object(), reused=False)
    state.upstream_data(state.ex, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                                  b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
    log = io.take()
    assert ("release", False) in log and b"forged" not in b"".join(e[1] for e in log if e[0] == "send")


def test_upstream_that_ends_its_body_by_closing_is_rechunked_for_the_client():
    state, io = make_core()
    state.client_data(b"GET /acme/x HTTP/1.1\r\nHost: a\r\n\r\n")
    ex = state.ex
    state.upstream_ready(ex, object(), reused=False)
    io.take()
    state.upstream_data(ex, b"HTTP/1.0 200 OK\r\n\r\nabc")
    state.upstream_lost(ex, "")
    log = io.take()
    assert b"".join(e[1] for e in log if e[0] == "send") == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert ("release", False) in log and not state.closed  # the client keeps its connection


def test_head_response_is_not_pooled():
    state, io = make_core()
    state.client_data(b"HEAD /acme/x HTTP/1.1\r\nHost: a\r\n\r\n")
    state.upstream_ready(state.ex, object(), reused=False)
    state.upstream_data(state.ex, b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
    log = io.take()
    assert (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n") in [e[1] for e in log if e[0] == "send"]
    assert ("release", False) in log


# -- identity (the proxy decides who a request belongs to) ---------------------------------------

def test_identity_headers_come_from_auth_only():
    state, io = make_core(auth="users")
    state.client_data(b"GET /acme/x HTTP/1.1\r\nHost: a\r\nAuthorization: Basic Zm9vOmJhcg==\r\n"
                      b"X-Forwarded-User: admin\r\nX_Forwarded_User: admin\r\nX-Forwarded-Email: a@b\r\n\r\n")
    assert io.take() == [("authenticate", b"Basic Zm9vOmJhcg==")]
    state.auth_result(state.ex, Identity(sub="s", username="alice", method="users", email="al@ice"))
    assert io.take() == [("connect", True)]
    state.upstream_ready(state.ex, object(), reused=False)
    head = io.take()[0][1]
    assert b"admin" not in head and b"a@b" not in head and b"Authorization" not in head
    assert b"\r\nX-Forwarded-User: alice\r\n" in head and b"\r\nX-Forwarded-Email: al@ice\r\n" in head


# -- pipelining: in order, one at a time, no recursion, bounded backlog --------------------------

def test_pipelined_requests_are_served_in_order_one_at_a_time():
    state, io = make_core()
    state.client_data(b"".join(b"GET /acme/%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3)))
    assert io.take() == [("connect", True)]  # only the first goes upstream
    for i in range(3):
        assert state.ex.target == f"/acme/{i}"
        serve_ok(state, io, b"r%d" % i)
        log = io.take()
        assert b"".join(e[1] for e in log if e[0] == "send").endswith(b"r%d" % i)
        if i < 2:
            assert log[-1] == ("connect", True)  # the next one asks for its upstream only now
    assert state.ex is None


def test_ten_thousand_pipelined_requests_need_no_recursion():
    state, io = make_core()
    n = 10_000
    requests = b"".join(b"GET /nowhere/%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(n))
    for i in range(0, len(requests), 65536):
        state.client_data(requests[i:i + 65536])
    sent = io.sent()
    assert sent.count(b"HTTP/1.1 404 Not Found\r\n") == n and not state.closed


def test_reading_pauses_while_the_backlog_is_long_and_resumes():
    state, io = make_core()
    state.client_data(b"GET /acme/first HTTP/1.1\r\nHost: a\r\n\r\n")
    io.take()
    state.client_data(b"GET /acme/q HTTP/1.1\r\nHost: a\r\n\r\n" * (MAX_QUEUE + 1))
    assert io.take() == [("reading", False)]
    serve_ok(state, io)
    serve_ok(state, io)
    assert ("reading", True) in io.take()


def test_framing_error_behind_a_request_is_answered_in_order_then_closed():
    state, io = make_core()
    state.client_data(b"GET /acme/ok HTTP/1.1\r\nHost: a\r\n\r\n"
                      b"POST /acme/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
    assert io.take() == [("connect", True), ("reading", False)]
    serve_ok(state, io, b"first")
    sent = io.sent()
    assert sent.index(b"first") < sent.index(b"HTTP/1.1 400 Bad Request")
    assert io.log[-1] == ("close",) and sent.count(b"HTTP/1.1 ") == 2


# -- retries (RFC 9110 section 9.2.2): idempotent only, never after a response byte ---------------

def test_post_on_a_pooled_connection_that_closed_is_not_sent_again():
    state, io = make_core()
    state.client_data(b"POST /acme/pay HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}")
    state.upstream_ready(state.ex, object(), reused=True)
    io.take()
    state.upstream_lost(state.ex, "Connection reset by peer")
    log = io.take()
    assert not [e for e in log if e[0] == "connect"]
    assert b"".join(e[1] for e in log if e[0] == "send").startswith(b"HTTP/1.1 502 ")


def test_get_on_a_pooled_connection_that_closed_is_retried_once_on_a_new_connection():
    state, io = make_core()
    state.client_data(b"GET /acme/x HTTP/1.1\r\nHost: a\r\n\r\n")
    state.upstream_ready(state.ex, object(), reused=True)
    io.take()
    state.upstream_lost(state.ex, "")
    assert io.take() == [("release", False), ("connect", False)]
    state.upstream_ready(state.ex, object(), reused=False)
    io.take()
    state.upstream_lost(state.ex, "")
    assert b"".join(e[1] for e in io.take() if e[0] == "send").startswith(b"HTTP/1.1 502 ")


def test_no_retry_once_a_response_byte_arrived():
    state, io = make_core()
    state.client_data(b"GET /acme/x HTTP/1.1\r\nHost: a\r\n\r\n")
    state.upstream_ready(state.ex, object(), reused=True)
    state.upstream_data(state.ex, b"HTTP/1.1 2")
    io.take()
    state.upstream_lost(state.ex, "")
    assert not [e for e in io.take() if e[0] == "connect"]


# -- own answers ---------------------------------------------------------------------------------

def test_early_answer_with_an_unfinished_body_closes():
    state, io = make_core()
    state.client_data(b"POST /nowhere HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nGET /acme/x")
    log = io.take()
    assert log[0][1].startswith(b"HTTP/1.1 404 Not Found\r\n") and b"Connection: close" in log[0][1]
    assert ("close",) in log


@pytest.mark.parametrize("target", [b"/acme/..%2fsecret", b"/acme/%2e%2e/x", b"/acme/a%5cb", b"/acme/%252e%252e/x",
                                    b"/acme/./x", b"/acme\\..\\x", b"/acme/%00"])
def test_escaping_paths_are_refused(target):
    state, io = make_core()
    state.client_data(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    log = io.take()
    assert log[0][1].startswith(b"HTTP/1.1 400 ") and not [e for e in log if e[0] == "connect"]


def test_unreserved_escapes_are_decoded_before_routing():
    state, io = make_core()
    state.client_data(b"GET /%61cme/%7Euser HTTP/1.1\r\nHost: a\r\n\r\n")
    state.upstream_ready(state.ex, object(), reused=False)
    assert io.take()[-1][1].startswith(b"GET /base/~user HTTP/1.1\r\n")


def test_absolute_form_uses_its_authority():
    state, io = make_core()
    state.client_data(b"GET http://pub.example:8080/acme/x HTTP/1.1\r\nHost: other\r\n\r\n")
    state.upstream_ready(state.ex, object(), reused=False)
    head = io.take()[-1][1]
    assert head.startswith(b"GET /base/x HTTP/1.1\r\n") and b"X-Forwarded-Host: pub.example:8080" in head


def test_own_answer_to_head_has_no_body_and_keeps_the_pipeline_in_step():
    # RFC 9110 section 9.3.2: a response to HEAD has no content; a body would be read as the
    # next response by a keep-alive client.
    state, io = make_core()
    state.client_data(b"HEAD /nowhere HTTP/1.1\r\nHost: a\r\n\r\nGET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n")
    sent = io.sent()
    first, _, second = sent.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 404 ") and second.startswith(b"HTTP/1.1 404 ")
