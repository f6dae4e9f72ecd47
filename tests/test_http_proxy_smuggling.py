"""Hostile corpus for http_proxy: request smuggling, framing, Host, identity, paths, responses.

One relayd and one recording upstream (tests/http_recorder.py, parsed by h11) per module; every
case opens fresh client connections and starts from an empty recorder. Each case names the rule
it checks (RFC 9112 / RFC 9110 section). Invariants checked after EVERY case (autouse fixture):

* the daemon log gained no "Traceback";
* every request the upstream saw is framed by the proxy (at most one Content-Length, equal to
  the body length; or Transfer-Encoding exactly "chunked"; never both), its path starts with
  /base, it carries no client-supplied identity header, and h11 never saw invalid HTTP.

Rejections ("reject" cases): the status is one of the expected ones, the body is JSON with a
"message", nothing of the bad request reached the upstream (its X-Request-Id appears in no
byte the upstream received), no smuggled request got through, a valid request pipelined
before it arrives exactly once and is answered first, and the connection is closed after
(rule 1, 3) or, where the spec does not require closing, at least still in sync.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

import configs
from http_recorder import Cut, RawClient, Recorded, Recorder, Response
from relayd.cli.control_client import ControlClient
from relayd.testing import RelaydProcess, free_port, start_relayd, write_config

pytestmark = pytest.mark.timeout(240)

CLIENT_TIMEOUT = 5.0
SECRET = "TOP-SECRET-do-not-serve-3141592653"
IDENTITY = ("x-forwarded-user", "x-forwarded-email", "x_forwarded_user", "x_forwarded_email")


# -- the module's daemon, recorder and file server ---------------------------------------------

@dataclass
class Env:
    daemon: RelaydProcess
    port: int
    rec: Recorder
    files_port: int
    ids: Iterator[int] = field(default_factory=itertools.count)

    def new_id(self, tag: str = "r") -> str:
        return f"{tag}-{next(self.ids)}"

    def smug_id(self) -> str:
        """As long as the SMUG placeholder, so that lengths computed around it stay right."""
        return f"smug-{next(self.ids):011d}"


def _config(port: int, rec: Recorder, files_port: int) -> str:
    def service(name: str, to: str, **keys: object) -> str:
        return configs.service("web", name, to, listeners=["web"], read_timeout=3, **keys)

    return configs.config(
        configs.listeners(web=port), configs.auth(open="none", users="basic"),
        configs.http_proxy("web", auth="open", flush_interval=0.2),
        service("acme", f"{rec.url}/base"), service("priv", f"{rec.url}/base/priv", auth="users"),
        service("named", f"{rec.url}/base/named", server_names=["named.test"]),
        service("files", f"http://127.0.0.1:{files_port}/public"))


def _wait_listening(port: int, deadline: float) -> None:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            threading.Event().wait(0.02)  # polling with a deadline for the server to bind


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("smuggling")
    www = tmp / "www"
    (www / "public").mkdir(parents=True)
    (www / "public" / "index.html").write_text("public index\n")
    (www / "secret.txt").write_text(SECRET + "\n")
    files_port = free_port()
    files = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                              str(www), str(files_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rec = Recorder()
    daemon = None
    try:
        _wait_listening(files_port, time.monotonic() + 20)
        port = free_port()
        daemon = start_relayd(tmp, write_config(tmp / "etc", _config(port, rec, files_port)))
        status, body = ControlClient(daemon.control_socket, 30).request(
            "POST", "/v1/components/web/services/priv/users", {"username": "alice", "password": "pw1"})
        assert status == 200, body
        yield Env(daemon, port, rec, files_port)
    finally:
        if daemon is not None:
            daemon.kill()
        rec.stop()
        files.terminate()
        files.wait(10)


def check_upstream_invariants(env: Env) -> None:
    """What every request reaching the upstream must look like (rules 6, 7, 8)."""
    broken = [b for b in env.rec.broken_snapshot() if b.kind == "invalid"]
    assert not broken, f"the proxy sent invalid HTTP upstream: {broken!r}"
    for rec in env.rec.snapshot():
        check_framing(rec)
        assert rec.path.startswith("/base"), f"upstream path escaped /base: {rec.target!r}"
        if not rec.path.startswith("/base/priv"):  # auth none: no identity at all
            for name in IDENTITY:
                assert not rec.has(name), f"{name} reached the upstream: {rec.headers!r}"


def check_framing(rec: Recorded) -> None:
    """RFC 9112 §6: the proxy frames what it forwards: one CL equal to the body, or chunked."""
    lengths = rec.values("content-length")
    codings = rec.values("transfer-encoding")
    assert not (lengths and codings), f"Content-Length with Transfer-Encoding upstream: {rec.headers!r}"
    assert len(lengths) <= 1, f"several Content-Length upstream: {rec.headers!r}"
    if lengths:
        assert lengths[0] == str(len(rec.body)), f"Content-Length {lengths} for {len(rec.body)} bytes"
    if codings:
        assert codings == ["chunked"], f"Transfer-Encoding upstream: {codings!r}"
    if rec.body:
        assert lengths or codings, "a body without framing headers"


@pytest.fixture(autouse=True)
def case_invariants(env: Env) -> Iterator[None]:
    env.rec.clear()
    start = len(env.daemon.log)
    yield
    assert env.daemon.process.poll() is None, "relayd exited"
    new = env.daemon.log[start:]
    assert "Traceback" not in new, new[-4000:]
    check_upstream_invariants(env)


# -- helpers -------------------------------------------------------------------------------------

def client(env: Env, timeout: float = CLIENT_TIMEOUT) -> RawClient:
    return RawClient(env.port, timeout=timeout)


def get(rid: str, target: str = "/acme/x", extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return (method + b" " + target.encode() + b" HTTP/1.1\r\nHost: a\r\nX-Request-Id: " + rid.encode()
            + b"\r\n" + extra + b"\r\n")


def sentinel(env: Env) -> None:
    """A fresh request through the proxy that must be answered with its own id: everything the
    earlier case might have pushed upstream has arrived by the time it comes back."""
    rid = env.new_id("sentinel")
    with client(env) as c:
        c.send(get(rid, "/acme/sentinel"))
        r = c.response()
    assert r is not None and r.status == 200 and r.request_id == rid, r
    env.rec.wait_request_id(rid)


def assert_error_json(r: Response) -> None:
    try:
        data = json.loads(r.body)
    except ValueError:
        raise AssertionError(f"error body is not JSON: {r.body[:500]!r}") from None
    assert isinstance(data, dict) and isinstance(data.get("message"), str), data


def assert_own(r: Response | None, rid: str, status: int = 200) -> None:
    assert r is not None, f"no response for {rid}"
    assert r.status == status and r.request_id == rid, (rid, r.status, r.body[:300])


def with_ids(raw: bytes, rid: str, smug: str, env: Env) -> bytes:
    assert len(smug) == len(SMUG)
    return (raw.replace(b"RID", rid.encode()).replace(SMUG, smug.encode())
            .replace(b"PORT", str(env.port).encode()).replace(b"UPSTREAM", str(env.rec.port).encode()))


# -- the corpus of refused requests (rules 1, 2, 4, 5, 6, 8) ----------------------------------

@dataclass
class Reject:
    id: str
    raw: bytes  # RID: this request's id, SMUG(GLED-REQUEST): a smuggled request's id, PORT: the proxy's port
    statuses: frozenset[int]
    rule: str
    body_level: bool = False  # found in the body: its head may have gone upstream (aborted)
    must_close: bool = True  # rule 1 / 3: close; others: closed or still in sync


S400 = frozenset({400})
S400_501 = frozenset({400, 501})
S400_505 = frozenset({400, 505})

RL = b"GET /acme/x HTTP/1.1\r\n"
HOST = b"Host: a\r\n"
ID = b"X-Request-Id: RID\r\n"
SMUG = b"SMUGGLED-REQUEST"  # replaced by Env.smug_id() (same length)
TAIL = b"GET /acme/smuggled HTTP/1.1\r\nHost: a\r\nX-Request-Id: " + SMUG + b"\r\n\r\n"


def head(*lines: bytes, line: bytes = RL, host: bytes = HOST) -> bytes:
    return line + host + ID + b"".join(lines) + b"\r\n"


def post(*lines: bytes, body: bytes = b"", line: bytes = b"POST /acme/x HTTP/1.1\r\n") -> bytes:
    return line + HOST + ID + b"".join(lines) + b"\r\n" + body


def chunked(body: bytes, tail: bytes = TAIL) -> bytes:
    return post(b"Transfer-Encoding: chunked\r\n", body=body + tail)


R1_LINES = "RFC 9112 §2.2 (CRLF line ends; bare CR must be refused)"
R1_FOLD = "RFC 9112 §5.2 (obs-fold refused)"
R1_COLON = "RFC 9112 §5.1 (no whitespace between field name and colon)"
R1_NAME = "RFC 9110 §5.1, §5.6.2 (field-name is a token)"
R1_VALUE = "RFC 9110 §5.5 (no NUL or CTL in field values)"
R1_CL = "RFC 9110 §8.6, RFC 9112 §6.3 (invalid Content-Length: 400 and close)"
R1_DUPCL = "RFC 9112 §6.3 (duplicate Content-Length refused, even equal: spec)"
R1_CLTE = "RFC 9112 §6.1, §6.3 (Content-Length with Transfer-Encoding: 400 and close)"
R1_TE = "RFC 9112 §6.1, §7 (Transfer-Encoding other than exactly chunked: 400/501)"
R1_CHUNK = "RFC 9112 §7.1 (chunk-size = 1*HEXDIG)"
R1_CHUNKDATA = "RFC 9112 §7.1 (chunk-data is followed by CRLF)"
R1_EXT = "RFC 9112 §7.1.1 (chunk-ext = *( BWS ; BWS token [ BWS = BWS ( token / quoted-string ) ] ))"
R1_TRAILER = "RFC 9112 §7.1.2 (trailer fields are field lines)"
R1_METHOD = "RFC 9110 §9.1, RFC 9112 §3.1 (method is a token; upper-case methods only: spec)"
R1_LINE = "RFC 9112 §3 (request-line = method SP request-target SP HTTP-version)"
R2 = "RFC 9112 §2.3, RFC 9110 §15.6.6 (HTTP versions other than 1.0/1.1: 505)"
R4 = "RFC 9112 §3.2, RFC 9110 §7.2 (exactly one valid Host)"
R5 = "RFC 9110 §7.6.1 (Connection may not make framing, Host or identity hop-by-hop)"


def _cases() -> list[Reject]:
    c: list[Reject] = []

    def add(id: str, raw: bytes, rule: str, statuses: frozenset[int] = S400, **kw: bool) -> None:
        c.append(Reject(id, raw, statuses, rule, **kw))

    # Rule 1: bare CR / LF
    add("bare-lf-after-request-line", b"GET /acme/x HTTP/1.1\n" + HOST + ID + b"\r\n", R1_LINES)
    add("bare-lf-between-fields", RL + b"Host: a\n" + ID + b"\r\n", R1_LINES)
    add("bare-lf-ends-head", RL + HOST + b"X-Request-Id: RID\r\n\n", R1_LINES)
    add("bare-lf-everywhere", b"GET /acme/x HTTP/1.1\nHost: a\nX-Request-Id: RID\n\n", R1_LINES)
    add("bare-lf-hides-field", head(b"X-A: b\nX-B: c\r\n"), R1_LINES)
    add("bare-cr-in-value", head(b"X-A: b\rc\r\n"), R1_LINES)
    add("bare-cr-as-line-end", head(b"X-A: b\rX-B: c\r\n"), R1_LINES)
    add("bare-cr-end-of-request-line", b"GET /acme/x HTTP/1.1\r\r\n" + HOST + ID + b"\r\n", R1_LINES)
    add("bare-cr-in-target", head(line=b"GET /acme/x\ry HTTP/1.1\r\n"), R1_LINES)
    add("cr-cr-lf-field", head(b"X-A: b\r\r\n"), R1_LINES)
    # Rule 1: obs-fold
    add("obs-fold-space", head(b"X-A: b\r\n c\r\n"), R1_FOLD)
    add("obs-fold-tab", head(b"X-A: b\r\n\tc\r\n"), R1_FOLD)
    add("obs-fold-host", RL + b"Host: a\r\n b\r\n" + ID + b"\r\n", R1_FOLD)
    add("obs-fold-request-id", RL + HOST + b"X-Request-Id: RID\r\n more\r\n\r\n", R1_FOLD)
    # RFC 9112 §2.2 allows ignoring a whitespace-preceded first line instead; the spec refuses it.
    add("whitespace-before-first-field", RL + b" X-A: b\r\n" + HOST + ID + b"\r\n", R1_FOLD)
    # Rule 1: whitespace before the colon
    add("space-before-colon", head(b"X-A : b\r\n"), R1_COLON)
    add("tab-before-colon", head(b"X-A\t: b\r\n"), R1_COLON)
    add("space-before-colon-host", RL + b"Host : a\r\n" + ID + b"\r\n", R1_COLON)
    add("space-before-colon-content-length", post(b"Content-Length : 3\r\n", body=b"abc"), R1_COLON)
    # Rule 1: invalid field names
    for label, char in [("lparen", b"("), ("rparen", b")"), ("comma", b","), ("slash", b"/"),
                        ("semicolon", b";"), ("lt", b"<"), ("eq", b"="), ("gt", b">"), ("question", b"?"),
                        ("at", b"@"), ("lbracket", b"["), ("backslash", b"\\"), ("rbrace", b"}"),
                        ("dquote", b'"'), ("space", b" "), ("del", b"\x7f"), ("obs-text", b"\x80"),
                        ("nul", b"\x00"), ("soh", b"\x01"), ("tab", b"\t")]:
        add(f"field-name-{label}", head(b"X" + char + b"A: b\r\n"), R1_NAME)
    add("field-name-empty", head(b": b\r\n"), R1_NAME)
    add("field-line-without-colon", head(b"X-A b\r\n"), R1_NAME)
    add("field-name-utf8", head("Ünïcode: b\r\n".encode()), R1_NAME)
    # Rule 1: NUL / CTL in values
    for label, char in [("nul", b"\x00"), ("soh", b"\x01"), ("bs", b"\x08"), ("vt", b"\x0b"), ("ff", b"\x0c"),
                        ("esc", b"\x1b"), ("us", b"\x1f"), ("del", b"\x7f")]:
        add(f"field-value-{label}", head(b"X-A: b" + char + b"c\r\n"), R1_VALUE)
    add("host-value-nul", RL + b"Host: a\x00b\r\n" + ID + b"\r\n", R1_VALUE)
    add("request-id-trailing-nul", RL + HOST + b"X-Request-Id: RID\x00\r\n\r\n", R1_VALUE)
    # Rule 1: invalid Content-Length
    for label, value in [("letters", b"abc"), ("negative", b"-1"), ("plus", b"+3"), ("two-numbers", b"3 3"),
                         ("list", b"3,3"), ("list-space", b"3, 3"), ("hex", b"0x3"), ("decimal", b"3.0"),
                         ("empty", b""), ("exponent", b"1e3"), ("2-pow-64-plus-5", b"18446744073709551621"),
                         ("huge", b"99999999999999999999999"), ("arabic-digit", "٣".encode()),
                         ("fullwidth-digit", "３".encode()), ("nul-after", b"3\x00"), ("vt-before", b"\x0b3")]:
        add(f"content-length-{label}", post(b"Content-Length: " + value + b"\r\n", body=b"abc" + TAIL), R1_CL)
    add("content-length-2-pow-63-too-large", post(b"Content-Length: 9223372036854775808\r\n", body=b"abc"),
        "RFC 9110 §15.5.14 (valid but above max_body: 413 and close)", frozenset({413}))
    # Rule 1: duplicate Content-Length
    add("dup-content-length-equal", post(b"Content-Length: 3\r\nContent-Length: 3\r\n", body=b"abc" + TAIL),
        R1_DUPCL)
    add("dup-content-length-different", post(b"Content-Length: 3\r\nContent-Length: 50\r\n", body=b"abc" + TAIL),
        R1_DUPCL)
    add("dup-content-length-case", post(b"Content-Length: 3\r\ncontent-length: 3\r\n", body=b"abc" + TAIL),
        R1_DUPCL)
    add("dup-content-length-apart", post(b"Content-Length: 0\r\nX-A: b\r\nContent-Length: 61\r\n", body=TAIL),
        R1_DUPCL)
    add("dup-content-length-zero-then-body", post(b"Content-Length: 0\r\nContent-Length: 61\r\n", body=TAIL),
        R1_DUPCL)
    # Rule 1 / 6: Content-Length with Transfer-Encoding (CL.TE and TE.CL)
    add("cl-te-classic", post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", body=b"0\r\n\r\n" + TAIL),
        R1_CLTE)
    add("te-cl-classic", post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                              body=b"3d\r\n" + TAIL + b"\r\n0\r\n\r\n"), R1_CLTE)
    add("cl-zero-te", post(b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", body=b"0\r\n\r\n" + TAIL),
        R1_CLTE)
    add("cl-te-lowercase", post(b"content-length: 5\r\ntransfer-encoding: chunked\r\n", body=b"0\r\n\r\n" + TAIL),
        R1_CLTE)
    add("cl-te-tab-ows", post(b"Content-Length: 5\r\nTransfer-Encoding:\tchunked\r\n", body=b"0\r\n\r\n" + TAIL),
        R1_CLTE)
    add("cl-te-upper-chunked", post(b"Content-Length: 5\r\nTransfer-Encoding: CHUNKED\r\n", body=b"0\r\n\r\n" + TAIL),
        R1_CLTE, S400_501)
    # Rule 6: TE.TE obfuscations (two parsers disagreeing on whether the body is chunked)
    add("te-space-before-colon", post(b"Content-Length: 4\r\nTransfer-Encoding : chunked\r\n",
                                      body=b"3d\r\n" + TAIL + b"\r\n0\r\n\r\n"), R1_COLON + "; TE.TE")
    add("te-vertical-tab", post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\x0b\r\n",
                                body=b"3d\r\n" + TAIL + b"\r\n0\r\n\r\n"), R1_VALUE + "; TE.TE", S400_501)
    add("te-json-list", post(b"Content-Length: 4\r\nTransfer-Encoding: [\"chunked\"]\r\n",
                             body=b"3d\r\n" + TAIL + b"\r\n0\r\n\r\n"), R1_TE + "; TE.TE", S400_501)
    add("te-hidden-by-bare-lf", post(b"Content-Length: 4\r\nX: y\nTransfer-Encoding: chunked\r\n",
                                     body=b"3d\r\n" + TAIL + b"\r\n0\r\n\r\n"), R1_LINES + "; TE.TE")
    add("te-identity-with-cl", post(b"Content-Length: 61\r\nTransfer-encoding: identity\r\n", body=TAIL),
        R1_TE + "; TE.TE", S400_501)
    add("te-hidden-by-obs-fold", post(b"Content-Length: 4\r\nX: y\r\n Transfer-Encoding: chunked\r\n",
                                      body=b"3d\r\n" + TAIL + b"\r\n0\r\n\r\n"), R1_FOLD + "; TE.TE")
    add("te-nul-in-name", post(b"Content-Length: 4\r\nTransfer-Encoding\x00: chunked\r\n",
                               body=b"3d\r\n" + TAIL + b"\r\n0\r\n\r\n"), R1_NAME + "; TE.TE")
    add("te-leading-vtab", post(b"Transfer-Encoding: \x0bchunked\r\n", body=b"0\r\n\r\n" + TAIL),
        R1_VALUE + "; TE.TE", S400_501)
    # Rule 1: Transfer-Encoding other than exactly chunked (400 or 501)
    for label, lines in [("gzip-chunked", b"Transfer-Encoding: gzip, chunked\r\n"),
                         ("chunked-chunked", b"Transfer-Encoding: chunked, chunked\r\n"),
                         ("xchunked", b"Transfer-Encoding: xchunked\r\n"),
                         ("chunkedx", b"Transfer-Encoding: chunkedx\r\n"),
                         ("two-fields", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
                         ("two-fields-identity", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"),
                         ("identity-then-chunked", b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n"),
                         ("chunked-gzip", b"Transfer-Encoding: chunked, gzip\r\n"),
                         ("identity", b"Transfer-Encoding: identity\r\n"),
                         ("gzip", b"Transfer-Encoding: gzip\r\n"),
                         ("chun-ked", b"Transfer-Encoding: chun ked\r\n"),
                         ("chunked-param", b"Transfer-Encoding: chunked;q=1\r\n")]:
        add(f"te-{label}", post(lines, body=b"3\r\nabc\r\n0\r\n\r\n" + TAIL), R1_TE, S400_501)
    # Rule 1: invalid chunk sizes (found in the body)
    for label, size in [("underscore", b"1_0"), ("leading-space", b" 3"), ("trailing-space", b"3 "),
                        ("leading-tab", b"\t3"), ("0x-prefix", b"0x3"), ("negative", b"-1"), ("plus", b"+3"),
                        ("2-pow-64-plus-5", b"10000000000000005"), ("overflow-17-f", b"fffffffffffffffff"),
                        ("empty", b""), ("not-hex", b"g"), ("nul", b"3\x00"), ("fullwidth", "３".encode())]:
        add(f"chunk-size-{label}", chunked(size + b"\r\nabc\r\n0\r\n\r\n"), R1_CHUNK, body_level=True)
    add("chunk-size-bare-lf", chunked(b"3\nabc\r\n0\r\n\r\n"), R1_CHUNK, body_level=True)
    # Rule 1: chunk data not followed by CRLF
    add("chunk-data-then-junk", chunked(b"3\r\nabcX\r\n0\r\n\r\n"), R1_CHUNKDATA, body_level=True)
    add("chunk-data-bare-lf", chunked(b"3\r\nabc\n0\r\n\r\n"), R1_CHUNKDATA, body_level=True)
    add("chunk-data-no-crlf", chunked(b"3\r\nabc0\r\n\r\n"), R1_CHUNKDATA, body_level=True)
    add("chunk-data-longer-than-size", chunked(b"3\r\nabcd\r\n0\r\n\r\n"), R1_CHUNKDATA, body_level=True)
    add("chunk-data-shorter-than-size", chunked(b"5\r\nabc\r\n0\r\n\r\n"), R1_CHUNKDATA, body_level=True)
    # Rule 1: bad chunk extensions
    for label, ext in [("empty-name", b";"), ("space-in-name", b";a b"), ("unterminated-quote", b';a="b'),
                       ("ctl-in-value", b";a=\x01"), ("space-in-value", b";a=b c"),
                       ("nul-in-name", b";a\x00"), ("bare-lf", b";a=b\nc"), ("nul-in-quoted", b';a="b\x00"'),
                       ("cr-in-value", b";a=b\rc")]:
        add(f"chunk-ext-{label}", chunked(b"3" + ext + b"\r\nabc\r\n0\r\n\r\n"), R1_EXT, body_level=True)
    # Rule 1: malformed trailer section / last chunk
    add("trailer-space-in-name", chunked(b"3\r\nabc\r\n0\r\nX A: b\r\n\r\n"), R1_TRAILER, body_level=True)
    add("trailer-obs-fold", chunked(b"3\r\nabc\r\n0\r\nX-A: b\r\n c\r\n\r\n"), R1_TRAILER, body_level=True)
    add("trailer-bare-lf-end", chunked(b"3\r\nabc\r\n0\r\n\n"), R1_TRAILER, body_level=True)
    add("trailer-nul-in-value", chunked(b"3\r\nabc\r\n0\r\nX-A: \x00\r\n\r\n"), R1_TRAILER, body_level=True)
    # Rule 1: invalid methods
    for label, method in [("paren", b"G(T"), ("at", b"GE@T"), ("quoted", b'"GET"'), ("comma", b"GET,"),
                          ("lower", b"get"), ("mixed-case", b"Get"), ("lower-post", b"post"), ("nul", b"GET\x00"),
                          ("del", b"G\x7fET"), ("utf8", "GÉT".encode()), ("slash", b"GET/")]:
        add(f"method-{label}", head(line=method + b" /acme/x HTTP/1.1\r\n"), R1_METHOD)
    add("method-empty", head(line=b" /acme/x HTTP/1.1\r\n"), R1_METHOD)
    # Rule 1: bad request lines
    for label, line in [("trailing-space", b"GET /acme/x HTTP/1.1 "), ("tabs", b"GET\t/acme/x\tHTTP/1.1"),
                        ("leading-space", b" GET /acme/x HTTP/1.1"), ("space-in-target", b"GET /acme/a b HTTP/1.1"),
                        ("extra-token", b"GET /acme/x HTTP/1.1 extra"), ("no-target", b"GET HTTP/1.1"),
                        ("nul-in-target", b"GET /acme/x\x00 HTTP/1.1"), ("del-in-target", b"GET /acme/\x7fx HTTP/1.1"),
                        ("soh-in-target", b"GET /acme/\x01x HTTP/1.1"), ("utf8-target", "GET /acme/é HTTP/1.1".encode()),
                        ("relative-target", b"GET acme/x HTTP/1.1"), ("version-junk", b"GET /acme/x HTTP/1.1x"),
                        ("lower-version", b"GET /acme/x http/1.1"), ("no-slash-version", b"GET /acme/x HTTP1.1"),
                        ("only-method", b"GET")]:
        add(f"request-line-{label}", head(line=line + b"\r\n"), R1_LINE,
            S400_505 if "version" in label else S400)
    # Rule 2: versions
    for version in (b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/3.0", b"HTTP/9.9", b"HTTP/1.10", b"HTTP/2"):
        add(f"version-{version.decode()}", head(line=b"GET /acme/x " + version + b"\r\n"), R2, S400_505)
    add("version-missing-http09-style", b"GET /acme/x\r\n" + HOST + ID + b"\r\n", R2, S400_505)
    # Rule 4: Host (closing is not required by the spec here: closed or in sync)
    add("host-missing", RL + ID + b"\r\n", R4, must_close=False)
    add("host-missing-absolute-form", b"GET http://127.0.0.1:PORT/acme/x HTTP/1.1\r\n" + ID + b"\r\n", R4,
        must_close=False)
    add("host-twice-equal", RL + HOST + HOST + ID + b"\r\n", R4, must_close=False)
    add("host-twice-different", RL + HOST + b"Host: b\r\n" + ID + b"\r\n", R4, must_close=False)
    add("host-twice-case", RL + HOST + b"host: a\r\n" + ID + b"\r\n", R4, must_close=False)
    for label, value in [("space", b"a b"), ("at", b"a@b"), ("userinfo", b"user@127.0.0.1"), ("slash", b"a/b"),
                         ("backslash", b"a\\b"), ("question", b"a?b"), ("hash", b"a#b"), ("quote", b'"a"'),
                         ("bad-port-letters", b"a:8x"), ("bad-port-negative", b"a:-1"), ("two-ports", b"a:80:80"),
                         ("port-name", b"a:http"), ("unclosed-bracket", b"[::1"), ("bracket-garbage", b"[::1]x"),
                         ("empty-host-port-garbage", b":x"), ("tab-inside", b"a\tb")]:
        add(f"host-{label}", RL + b"Host: " + value + b"\r\n" + ID + b"\r\n", R4, must_close=False)
    add("options-asterisk", head(line=b"OPTIONS * HTTP/1.1\r\n"),
        "RFC 9112 §3.2.4 (asterisk-form: the proxy has no server-wide OPTIONS: 400)", must_close=False)
    add("connect", b"CONNECT 127.0.0.1:UPSTREAM HTTP/1.1\r\nHost: 127.0.0.1:UPSTREAM\r\n" + ID + b"\r\n",
        "RFC 9110 §9.3.6 (CONNECT is not offered: 405)", frozenset({405}), must_close=False)
    # Rule 5: Connection naming framing, Host or identity headers
    for label, value in [("content-length", b"content-length"), ("transfer-encoding", b"Transfer-Encoding"),
                         ("host", b"HOST"), ("x-forwarded-user", b"X-Forwarded-User"),
                         ("x-forwarded-email", b"x-forwarded-email"), ("among-others", b"keep-alive, Content-Length"),
                         ("spaced-list", b"foo ,  transfer-encoding ,bar"), ("close-host", b"close, host"),
                         ("user-upper", b"X-FORWARDED-USER, keep-alive")]:
        add(f"connection-{label}", head(b"Connection: " + value + b"\r\n"), R5, must_close=False)
    add("connection-content-length-with-body",
        post(b"Content-Length: 3\r\nConnection: Content-Length\r\n", body=b"abc"), R5, must_close=False)
    return c


REJECTS = _cases()


def run_reject(env: Env, case: Reject, prefix: bool, segment: int | None = None) -> None:
    rid, smug, first = env.new_id("bad"), env.smug_id(), env.new_id("first")
    data = with_ids(case.raw, rid, smug, env)
    if prefix:
        data = get(first, "/acme/first") + data
    with client(env) as c:
        c.send(data, segment)
        if prefix:
            assert_own(c.response(), first)
        try:
            r = c.response()
        except Cut as exc:
            raise AssertionError(f"connection cut instead of {set(case.statuses)}: {exc.partial[:500]!r}") from None
        assert r is not None, f"closed without an answer, expected {set(case.statuses)}"
        assert r.status in case.statuses, (r.status, r.body[:300], case.rule)
        assert_error_json(r)
        if case.must_close:
            assert c.closed(), "the connection stays open after a malformed request"
        else:
            after = env.new_id("after")
            c.send(get(after, "/acme/after"))
            try:
                r2 = c.response()
            except Cut:
                r2 = None
            if r2 is not None:  # kept open: then it must still be in sync
                assert_own(r2, after)
    sentinel(env)
    seen = env.rec.snapshot()
    assert not [r for r in seen if r.request_id in (rid, smug)], f"the bad request reached the upstream: {seen!r}"
    assert smug.encode() not in env.rec.raw_bytes(), "a smuggled request reached the upstream"
    if not case.body_level:  # refused from its head: not one byte of it may go upstream
        assert rid.encode() not in env.rec.raw_bytes(), "bytes of the refused request reached the upstream"
    if prefix:
        assert [r.request_id for r in seen].count(first) == 1, seen


@pytest.mark.parametrize("prefix", [False, True], ids=["alone", "after-valid"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in REJECTS])
def test_refused(env: Env, case: Reject, prefix: bool) -> None:
    """Rules 1, 2, 4, 5, 6, 8: a malformed or hostile request is refused and nothing reaches the upstream."""
    run_reject(env, case, prefix)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in REJECTS
                                  if c.id in ("cl-te-classic", "te-cl-classic", "bare-lf-ends-head",
                                              "obs-fold-space", "chunk-size-underscore", "chunk-data-then-junk",
                                              "dup-content-length-equal", "te-gzip-chunked")])
def test_refused_byte_by_byte(env: Env, case: Reject) -> None:
    """Rule 1: the same verdicts when every byte arrives in its own segment."""
    run_reject(env, case, prefix=True, segment=1)


# -- rule 3: head size and field count limits ------------------------------------------------

def _big_head(size: int) -> bytes:
    base = head(b"X-Pad: \r\n")
    return head(b"X-Pad: " + b"p" * (size - len(base)) + b"\r\n")


@pytest.mark.parametrize("shape,segment", [
    ("33k-one-segment", None), ("33k-byte-by-byte", 1), ("33k-7-byte-segments", 7), ("40k-1k-segments", 1024),
    ("40k-no-terminator", None), ("many-fields-36k", None), ("101-fields", None), ("101-fields-byte-by-byte", 1),
    ("long-target", None), ("64k-one-segment", None),
])
def test_head_too_large(env: Env, shape: str, segment: int | None) -> None:
    """Rule 3 (RFC 6585 §5): a head over 32 KiB or with more than 100 fields is 431, however it arrives.
    A 40 KiB request-target may also be 414 (RFC 9112 §3)."""
    rid = env.new_id("big")
    statuses = {431}
    if shape.startswith(("33k", "64k")):
        raw = _big_head(33 * 1024 if shape.startswith("33k") else 64 * 1024)
    elif shape == "40k-1k-segments":
        raw = _big_head(40 * 1024)
    elif shape == "40k-no-terminator":
        raw = RL + HOST + ID + b"X-Pad: " + b"p" * (40 * 1024)
    elif shape == "many-fields-36k":
        raw = head(*[b"X-F%d: %s\r\n" % (i, b"v" * 400) for i in range(90)])
    elif shape.startswith("101-fields"):
        raw = head(*[b"X-F%d: v\r\n" % i for i in range(99)])  # + Host + X-Request-Id = 101
    else:
        raw = head(line=b"GET /acme/" + b"t" * (40 * 1024) + b" HTTP/1.1\r\n")
        statuses = {414, 431}
    with client(env, timeout=15) as c:
        c.send(raw.replace(b"RID", rid.encode()), segment)
        r = c.response()
        assert r is not None, "closed without an answer"
        assert r.status in statuses, (r.status, r.body[:300])
        assert_error_json(r)
        assert c.closed()
    sentinel(env)
    assert rid.encode() not in env.rec.raw_bytes()


@pytest.mark.parametrize("shape,segment", [
    ("30k-one-segment", None), ("30k-byte-by-byte", 1), ("30k-100-byte-segments", 100), ("100-fields", None),
])
def test_head_under_limits_is_served(env: Env, shape: str, segment: int | None) -> None:
    """Rule 3: a 30 KiB head, or exactly 100 fields, is served (the limits are not off by much)."""
    rid = env.new_id("near")
    if shape == "100-fields":
        raw = head(*[b"X-F%d: v\r\n" % i for i in range(98)])  # + Host + X-Request-Id = 100
    else:
        raw = _big_head(30 * 1024)
    with client(env, timeout=15) as c:
        c.send(raw.replace(b"RID", rid.encode()), segment)
        assert_own(c.response(), rid)
    rec = env.rec.wait_request_id(rid)
    if shape == "100-fields":
        assert rec.values("x-f97") == ["v"]
    else:
        assert len(rec.values("x-pad")[0]) > 29 * 1024


# -- rule 4: forms of the request target, Host ------------------------------------------------

def served(env: Env, raw: bytes, *, method: str = "GET", http10: bool = False, segment: int | None = None,
           status: int = 200) -> tuple[Response, Recorded]:
    rid = env.new_id("ok")
    with client(env) as c:
        c.send(with_ids(raw, rid, SMUG.decode(), env), segment)  # the placeholder stays (never sent alone)
        r = c.response(method, http10=http10)
    assert r is not None, "closed without an answer"
    assert r.status == status and (method == "HEAD" or r.request_id == rid), (r.status, r.body[:500])
    rec = env.rec.wait_request_id(rid)
    assert [x.request_id for x in env.rec.snapshot()].count(rid) == 1
    return r, rec


@pytest.mark.parametrize("line", [b"GET  /acme/x HTTP/1.1\r\n", b"GET /acme/x  HTTP/1.1\r\n"])
def test_request_line_extra_spaces_reach_the_upstream_as_one_clean_line(env: Env, line: bytes) -> None:
    """RFC 9112 §3: llhttp splits the request line on runs of spaces (recipients may parse on
    whitespace boundaries); the proxy writes its own request line, so nothing ambiguous goes on."""
    _, rec = served(env, head(line=line))
    assert rec.method == "GET" and rec.target == "/base/x"


def test_absolute_form_is_served(env: Env) -> None:
    """RFC 9112 §3.2.2: absolute-form is accepted; its authority is the host (Host is ignored)."""
    _, rec = served(env, b"GET http://127.0.0.1:PORT/acme/abs?q=1 HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\n"
                         b"X-Request-Id: RID\r\n\r\n")
    assert rec.target == "/base/abs?q=1"
    _, rec = served(env, b"GET http://127.0.0.1:PORT/acme/abs HTTP/1.1\r\nHost: other.example\r\n"
                         b"X-Request-Id: RID\r\n\r\n")
    assert rec.target == "/base/abs"
    assert rec.values("x-forwarded-host") == [f"127.0.0.1:{env.port}"], rec.headers


def test_absolute_form_authority_routes(env: Env) -> None:
    """RFC 9112 §3.2.2: the authority, not Host, selects the service (server_names = named.test)."""
    _, rec = served(env, b"GET http://named.test/named/n HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: RID\r\n\r\n")
    assert rec.target == "/base/named/n"
    _, rec = served(env, b"GET /named/n HTTP/1.1\r\nHost: named.test\r\nX-Request-Id: RID\r\n\r\n")
    assert rec.target == "/base/named/n"
    for raw in (b"GET /named/n HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: RID\r\n\r\n",
                b"GET http://127.0.0.1/named/n HTTP/1.1\r\nHost: named.test\r\nX-Request-Id: RID\r\n\r\n"):
        rid = env.new_id("notnamed")
        with client(env) as c:
            c.send(with_ids(raw, rid, SMUG.decode(), env))
            r = c.response()
        assert r is not None and r.status == 404, (raw, r)
    sentinel(env)
    assert not [r for r in env.rec.snapshot() if r.request_id and r.request_id.startswith("notnamed")]


def test_http10_without_host_is_served(env: Env) -> None:
    """RFC 9112 §3.2: Host is required of HTTP/1.1 requests only."""
    _, rec = served(env, b"GET /acme/old HTTP/1.0\r\nX-Request-Id: RID\r\n\r\n", http10=True)
    assert rec.target == "/base/old"


def test_options_with_a_path_and_head_are_served(env: Env) -> None:
    """RFC 9110 §9.3.7 / §9.3.2: ordinary OPTIONS and HEAD pass."""
    _, rec = served(env, head(line=b"OPTIONS /acme/o HTTP/1.1\r\n"), method="OPTIONS")
    assert rec.method == "OPTIONS"
    r, rec = served(env, head(line=b"HEAD /acme/h HTTP/1.1\r\n"), method="HEAD")
    assert rec.method == "HEAD" and r.body == b""


# -- rule 5 (positive): ordinary Connection options are hop-by-hop ------------------------------

def test_connection_option_headers_are_removed(env: Env) -> None:
    """RFC 9110 §7.6.1: fields the Connection header names are not forwarded."""
    _, rec = served(env, head(b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"))
    assert not rec.has("x-hop") and not rec.has("keep-alive"), rec.headers


# -- rule 6: framing of forwarded bodies ---------------------------------------------------------

PAYLOAD = bytes(range(256)) * 3 + b"\r\n0\r\n\r\n" + TAIL  # looks like framing and a request


@dataclass
class Body:
    id: str
    raw: bytes
    payload: bytes
    chunked: bool
    segment: int | None = None
    rule: str = "RFC 9112 §6, §7.1 (the proxy frames the body it forwards)"


def _bodies() -> list[Body]:
    def te(body: bytes, te_line: bytes = b"Transfer-Encoding: chunked\r\n") -> bytes:
        return post(te_line, body=body)

    def cl(payload: bytes) -> bytes:
        return post(b"Content-Length: %d\r\n" % len(payload), body=payload)

    big = os.urandom(300 * 1024)
    sizes = [1, 0x10, 0x3fff, 0x10000, 0x20000, len(big) - 1 - 0x10 - 0x3fff - 0x10000 - 0x20000]
    pieces, pos = [], 0
    for size in sizes:
        pieces.append(b"%x\r\n" % size + big[pos:pos + size] + b"\r\n")
        pos += size
    big_chunked = b"".join(pieces) + b"0\r\n\r\n"
    return [
        Body("cl-body", cl(b"hello"), b"hello", False),
        Body("cl-zero", cl(b""), b"", False),
        Body("cl-body-byte-by-byte", cl(b"hello world"), b"hello world", False, segment=1),
        Body("cl-body-looks-like-requests", cl(PAYLOAD), PAYLOAD, False),
        Body("cl-get-with-body", post(b"Content-Length: 3\r\n", body=b"abc", line=b"GET /acme/x HTTP/1.1\r\n"),
             b"abc", False),
        Body("cl-leading-zeros", post(b"Content-Length: 0005\r\n", body=b"hello"), b"hello", False),
        Body("cl-300k", cl(big), big, False),
        Body("chunked-simple", te(b"5\r\nhello\r\n0\r\n\r\n"), b"hello", True),
        Body("chunked-multi", te(b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"), b"hello world", True),
        Body("chunked-extensions", te(b'5;a=b\r\nhello\r\n6;name="quoted value";x\r\n world\r\n0;z=1\r\n\r\n'),
             b"hello world", True),
        Body("chunked-upper-hex", te(b"A\r\n0123456789\r\n0\r\n\r\n"), b"0123456789", True),
        Body("chunked-lower-hex", te(b"a\r\n0123456789\r\n0\r\n\r\n"), b"0123456789", True),
        Body("chunked-leading-zeros", te(b"00005\r\nhello\r\n0000\r\n\r\n"), b"hello", True),
        Body("chunked-trailers", te(b"5\r\nhello\r\n0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n"), b"hello", True),
        Body("chunked-empty", te(b"0\r\n\r\n"), b"", True),
        Body("chunked-byte-by-byte", te(b"5\r\nhello\r\n6;e=1\r\n world\r\n0\r\nX-T: 1\r\n\r\n"),
             b"hello world", True, segment=1),
        Body("chunked-3-byte-segments", te(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), b"hello world", True, segment=3),
        Body("chunked-payload-looks-like-requests", te(b"%x\r\n" % len(PAYLOAD) + PAYLOAD + b"\r\n0\r\n\r\n"),
             PAYLOAD, True),
        Body("chunked-300k-odd-sizes", te(big_chunked), big, True),
        Body("chunked-ext-without-name-is-dropped", te(b"3;=b\r\nabc\r\n0\r\n\r\n"), b"abc", True,
             rule="RFC 9112 §7.1.1: llhttp accepts ';=b'; extensions are never forwarded (recipients ignore them)"),
        Body("chunked-te-tab-ows", te(b"5\r\nhello\r\n0\r\n\r\n", b"Transfer-Encoding:\tchunked\r\n"), b"hello", True,
             rule="RFC 9110 §5.5, §5.6.3 (OWS may be a tab: Transfer-Encoding:<TAB>chunked is valid)"),
    ]


@pytest.mark.parametrize("case", [pytest.param(b, id=b.id) for b in _bodies()])
def test_body_framing(env: Env, case: Body) -> None:
    """Rule 6: a body arrives once, framed by the proxy, with the same payload bytes."""
    _, rec = served(env, case.raw, method="POST", segment=case.segment)
    assert rec.body == case.payload, (len(rec.body), len(case.payload))
    if case.chunked:
        assert rec.values("transfer-encoding") == ["chunked"] and not rec.has("content-length"), rec.headers
    else:
        assert rec.values("content-length") == [str(len(case.payload))] and not rec.has("transfer-encoding"), \
            rec.headers
    sentinel(env)
    assert not [r for r in env.rec.snapshot() if r.target.endswith("smuggled")]


def test_pipelined_bodies_arrive_once_in_order(env: Env) -> None:
    """RFC 9112 §9.3.2: pipelined requests with bodies are each forwarded once, answered in order."""
    ids = [env.new_id("pipe") for _ in range(4)]
    raw = (get(ids[0]).replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\nhello", 1).replace(b"GET", b"POST", 1)
           + post(b"Transfer-Encoding: chunked\r\n", body=b"3\r\nabc\r\n0\r\n\r\n").replace(b"RID", ids[1].encode())
           + get(ids[2])
           + post(b"Content-Length: 0\r\n").replace(b"RID", ids[3].encode()))
    with client(env) as c:
        c.send(raw)
        for rid, method in zip(ids, ("POST", "POST", "GET", "POST")):
            assert_own(c.response(method), rid)
    env.rec.wait_requests(4)
    seen = env.rec.snapshot()
    assert [r.request_id for r in seen] == ids
    assert [r.body for r in seen] == [b"hello", b"abc", b"", b""]


def test_http10_transfer_encoding_is_never_smuggled(env: Env) -> None:
    """RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 request means faulty framing: close after.
    Whatever the status, the chunked-looking tail never becomes a request."""
    rid, smug = env.new_id("te10"), env.smug_id()
    raw = with_ids(b"POST /acme/x HTTP/1.0\r\nX-Request-Id: RID\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"0\r\n\r\n" + TAIL, rid, smug, env)
    with client(env) as c:
        c.send(raw)
        try:
            r = c.response("POST", http10=True)
        except Cut:
            r = None
        assert r is None or r.status in (200, 400, 501), r
        assert c.closed()
    sentinel(env)
    assert smug.encode() not in env.rec.raw_bytes()


@pytest.mark.parametrize("raw,status", [
    (b"POST /priv/x HTTP/1.1\r\nHost: a\r\nX-Request-Id: RID\r\nContent-Length: %d\r\n\r\n" % len(TAIL) + TAIL, 401),
    (b"POST /priv/x HTTP/1.1\r\nHost: a\r\nX-Request-Id: RID\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"%x\r\n" % len(TAIL) + TAIL + b"\r\n0\r\n\r\n", 401),
    (b"POST /nowhere HTTP/1.1\r\nHost: a\r\nX-Request-Id: RID\r\nContent-Length: %d\r\n\r\n" % len(TAIL) + TAIL, 404),
    (b"POST /nowhere HTTP/1.1\r\nHost: a\r\nX-Request-Id: RID\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"%x\r\n" % len(TAIL) + TAIL + b"\r\n0\r\n\r\n", 404),
    (b"POST /acme/%2e%2e/x HTTP/1.1\r\nHost: a\r\nX-Request-Id: RID\r\nContent-Length: " + b"%d" % len(TAIL)
     + b"\r\n\r\n" + TAIL, 400),
    (b"POST /acme/x HTTP/1.1\r\nHost: a\r\nX-Request-Id: RID\r\nContent-Length: 2147483648\r\n\r\n" + TAIL, 413),
], ids=["401-cl", "401-chunked", "404-cl", "404-chunked", "400-path-cl", "413-cl"])
def test_early_answer_leaves_no_body_behind(env: Env, raw: bytes, status: int) -> None:
    """Rule 6 (RFC 9112 §9.3, §6.3): a request answered before its body was read: the body is
    discarded or the connection closed, never parsed as the next request."""
    rid, smug, after = env.new_id("early"), env.smug_id(), env.new_id("after")
    with client(env) as c:
        c.send(with_ids(raw, rid, smug, env))
        r = c.response("POST")
        assert r is not None and r.status == status, r
        c.send(get(after, "/acme/after"))
        try:
            r2 = c.response()
        except Cut:
            r2 = None
        if r2 is not None:
            assert_own(r2, after)
    sentinel(env)
    assert smug.encode() not in env.rec.raw_bytes(), "the body became a request"
    assert not [x for x in env.rec.snapshot() if x.request_id == rid]


@pytest.mark.parametrize("raw", [
    post(b"Content-Length: 10\r\n", body=b"hello"),
    post(b"Transfer-Encoding: chunked\r\n", body=b"5\r\nhel"),
    post(b"Transfer-Encoding: chunked\r\n", body=b"5\r\nhello\r\n"),
    post(b"Transfer-Encoding: chunked\r\n", body=b"5\r\nhello\r\n0\r\n"),
    post(b"Transfer-Encoding: chunked\r\n", body=b"5\r\nhello\r\n0\r\nX-T: 1\r\n"),
], ids=["cl-short", "mid-chunk", "before-last-chunk", "before-trailer-end", "mid-trailers"])
def test_truncated_body_is_never_completed(env: Env, raw: bytes) -> None:
    """Rule 6 (RFC 9112 §8): a client that stops mid-body (half-close) never gets a complete
    request forwarded: the proxy must not finish the framing (CL or last-chunk) itself."""
    rid = env.new_id("trunc")
    with client(env) as c:
        c.send(raw.replace(b"RID", rid.encode()))
        c.sock.shutdown(socket.SHUT_WR)
        try:
            r = c.response("POST")
        except Cut:
            r = None
        assert r is None or r.status >= 400, r
    sentinel(env)
    assert not [x for x in env.rec.snapshot() if x.request_id == rid], "a truncated body was completed"


@pytest.mark.parametrize("first", [
    b"GET /acme/x HTTP/1.1\r\nHost: a\r\nX-Request-Id: RID\r\nConnection: close\r\n\r\n",
    b"GET /acme/x HTTP/1.1\r\nHost: a\r\nX-Request-Id: RID\r\nConnection: keep-alive, close\r\n\r\n",
    b"GET /acme/x HTTP/1.0\r\nHost: a\r\nX-Request-Id: RID\r\n\r\n",
], ids=["close", "keep-alive-close", "http10"])
def test_no_request_is_processed_after_close(env: Env, first: bytes) -> None:
    """RFC 9112 §9.6: after a request with "close" (or HTTP/1.0 without keep-alive) the server
    processes no further request on that connection."""
    rid, smug = env.new_id("closing"), env.smug_id()
    with client(env) as c:
        c.send(with_ids(first + TAIL, rid, smug, env))
        assert_own(c.response(http10=b"HTTP/1.0" in first), rid)
        assert c.closed()
    sentinel(env)
    assert smug.encode() not in env.rec.raw_bytes()


def test_head_then_get_pipelined(env: Env) -> None:
    """RFC 9110 §9.3.2, RFC 9112 §6.3: a HEAD response has no body even with Content-Length."""
    ids = [env.new_id("hg") for _ in range(3)]
    with client(env) as c:
        c.send(get(ids[0], method=b"HEAD") + get(ids[1]) + get(ids[2], method=b"HEAD"))
        r = c.response("HEAD")
        assert r is not None and r.status == 200 and r.body == b"" and r.header("x-request-id") == ids[0], r
        assert_own(c.response(), ids[1])
        r = c.response("HEAD")
        assert r is not None and r.status == 200 and r.header("x-request-id") == ids[2], r


@pytest.mark.parametrize("target,extra,status", [
    ("/nowhere", b"", 404),
    ("/priv/x", b"", 401),
    ("/acme/%2e%2e/x", b"", 400),
    ("/acme/x", b"Host: b\r\n", 400),
    ("/acme/x", b"Connection: content-length\r\n", 400),
], ids=["404", "401", "400-path", "400-two-hosts", "400-connection"])
def test_proxy_answers_to_head_have_no_body(env: Env, target: str, extra: bytes, status: int) -> None:
    """RFC 9110 §9.3.2, RFC 9112 §6.3: the proxy's own answer to HEAD ends at its head; content
    after it would be read as the next response by a pipelining client."""
    rid, nxt = env.new_id("head"), env.new_id("next")
    with client(env) as c:
        c.send(get(rid, target, extra=extra, method=b"HEAD") + get(nxt))
        r = c.response("HEAD")
        assert r is not None and r.status == status, r
        rest = c.response()  # the GET's answer, or nothing if the proxy closed
        if rest is not None:
            assert_own(rest, nxt)


def test_upgrade_not_accepted_keeps_parsing_requests(env: Env) -> None:
    """RFC 9110 §7.8: without a 101 the connection stays HTTP: what follows an Upgrade request
    is a request, proxied (mapped to /base) like any other, never tunnelled raw."""
    rid, tail = env.new_id("upg"), env.new_id("tail")
    raw = (get(rid, "/acme/up", extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
           + b"GET /acme/after-upgrade HTTP/1.1\r\nHost: a\r\nX-Request-Id: " + tail.encode() + b"\r\n\r\n")
    with client(env) as c:
        c.send(raw)
        assert_own(c.response(), rid)
        try:
            r = c.response()
        except Cut:
            r = None
        if r is not None:
            assert_own(r, tail)
    sentinel(env)
    for x in env.rec.snapshot():  # the autouse check also asserts every path starts with /base
        assert x.target != "/acme/after-upgrade", "the tail went upstream raw"


def test_trailer_fields_never_carry_framing(env: Env) -> None:
    """RFC 9110 §6.5.1: framing, routing and identity fields in a trailer are never acted upon
    nor forwarded (400, or served with such trailer fields dropped)."""
    rid, smug = env.new_id("trailer"), env.smug_id()
    raw = post(b"Transfer-Encoding: chunked\r\n", body=b"5\r\nhello\r\n0\r\nContent-Length: 61\r\n"
               b"Transfer-Encoding: chunked\r\nHost: evil\r\nX-Forwarded-User: mallory\r\n\r\n" + TAIL)
    with client(env) as c:
        c.send(with_ids(raw, rid, smug, env))
        r = c.response("POST")
        assert r is not None and r.status in (200, 400), r
    sentinel(env)
    assert smug.encode() not in env.rec.raw_bytes()
    for x in env.rec.snapshot():
        names = {n.lower() for n, _ in x.trailers}
        assert not names & {"content-length", "transfer-encoding", "host", "x-forwarded-user"}, x.trailers


# -- rule 7: identity headers ----------------------------------------------------------------------

IDENTITY_SPOOFS = [
    ("x-forwarded-user", b"X-Forwarded-User: mallory\r\n"),
    ("x-forwarded-email", b"X-Forwarded-Email: m@evil.example\r\n"),
    ("underscore-user", b"X_Forwarded_User: mallory\r\n"),
    ("underscore-email", b"X_Forwarded_Email: m@evil.example\r\n"),
    ("lower-case", b"x-forwarded-user: mallory\r\n"),
    ("upper-case", b"X-FORWARDED-USER: mallory\r\n"),
    ("mixed-underscore", b"X_FORWARDED_user: mallory\r\n"),
    ("twice", b"X-Forwarded-User: a\r\nX-Forwarded-User: b\r\n"),
    ("empty-value", b"X-Forwarded-User:\r\n"),
    ("all-at-once", b"X-Forwarded-User: m\r\nX_Forwarded_User: m\r\nX-Forwarded-Email: m@e\r\n"
                    b"X_Forwarded_Email: m@e\r\n"),
]


@pytest.mark.parametrize("lines", [pytest.param(v, id=k) for k, v in IDENTITY_SPOOFS])
def test_identity_spoofing_anonymous(env: Env, lines: bytes) -> None:
    """Rule 7: client identity headers never reach the upstream; with auth none there is none."""
    _, rec = served(env, head(lines))
    for name in IDENTITY:
        assert not rec.has(name), rec.headers


@pytest.mark.parametrize("lines", [pytest.param(v, id=k) for k, v in IDENTITY_SPOOFS])
def test_identity_spoofing_authenticated(env: Env, lines: bytes) -> None:
    """Rule 7: with basic auth the upstream sees exactly the authenticated user, once."""
    auth = b"Authorization: Basic YWxpY2U6cHcx\r\n"  # alice:pw1
    _, rec = served(env, head(auth, lines, line=b"GET /priv/me HTTP/1.1\r\n"))
    assert rec.values("x-forwarded-user") == ["alice"], rec.headers
    assert not rec.has("x_forwarded_user") and not rec.has("x_forwarded_email")
    assert not rec.has("x-forwarded-email"), rec.headers  # basic auth has no e-mail
    assert rec.target == "/base/priv/me"


# -- rule 8: paths ------------------------------------------------------------------------------------

R8 = "RFC 3986 §2.3, §5.2.4, spec rule 8 (after decoding unreserved once: no encoded / or \\, NUL, dot segments)"

REFUSED_PATHS = [
    "/acme/%2f", "/acme/a%2fb", "/acme/a%2Fb", "/acme/a%5cb", "/acme/a%5Cb", "/acme/a\\b", "/acme/..\\x",
    "/acme/a%00b", "/acme/../x", "/acme/./x", "/acme/x/..", "/acme/x/.", "/acme/..", "/acme/.", "/acme/x/../y",
    "/acme//../x", "/acme/..?q=1", "/acme/%2e%2e/x", "/acme/%2E%2E/x", "/acme/.%2e/x", "/acme/%2e./x",
    "/acme/.%2E/x", "/acme/%2E/x", "/acme/%2e", "/acme/x/%2E%2e", "/acme/..%2fx", "/acme/..%2Fx",
    "/acme/..%2F..%2Fx", "/acme/%2e%2e%2fx", "/acme/x/..%5c..%5cy", "/acme/%252e%252e/x", "/acme/%252E%252E/x",
    "/acme/%252e/x", "/acme/%252f", "/acme/a%252fb", "/acme/%255c", "/acme/%%32%65%%32%65/x", "/acme/%%32%66x",
    "/acme/%%35%63x", "/acme/%2e%2e%2f%2e%2e%2fetc/passwd",
]


@pytest.mark.parametrize("target", REFUSED_PATHS)
def test_path_refused(env: Env, target: str) -> None:
    """Rule 8: paths that could escape /base, or mean something else to the upstream, are 400."""
    run_reject(env, Reject(target, head(line=b"GET " + target.encode() + b" HTTP/1.1\r\n"), S400, R8,
                           must_close=False), prefix=False)


def test_path_refused_in_absolute_form(env: Env) -> None:
    """Rule 8 with RFC 9112 §3.2.2: absolute-form targets are checked the same way."""
    run_reject(env, Reject("abs-dot", head(line=b"GET http://127.0.0.1:PORT/acme/%2e%2e/x HTTP/1.1\r\n"), S400, R8,
                           must_close=False), prefix=False)


def test_encoded_slash_at_prefix_boundary(env: Env) -> None:
    """Rule 8: /acme%2f..%2fadmin is no route into /acme (400, or 404 for no service)."""
    run_reject(env, Reject("prefix-boundary", head(line=b"GET /acme%2f..%2fadmin HTTP/1.1\r\n"),
                           frozenset({400, 404}), R8, must_close=False), prefix=False)


SERVED_PATHS = [
    ("/acme/%61bc", {"/base/abc"}),
    ("/acme/%7Euser", {"/base/~user"}),
    ("/acme/A%2Db%5F", {"/base/A-b_"}),
    ("/acme/%41%42%43", {"/base/ABC"}),
    ("/acme", {"/base"}),
    ("/acme/", {"/base/"}),
    ("/acme?x=1", {"/base?x=1"}),
    ("/acme/x?q=%2e%2e%2f..", {"/base/x?q=%2e%2e%2f.."}),
    ("/acme/x?p=../../etc", {"/base/x?p=../../etc"}),
    ("/acme/x%3fy", {"/base/x%3fy", "/base/x%3Fy"}),
    ("/acme/100%25", {"/base/100%25"}),
    ("/acme/a%20b", {"/base/a%20b"}),
    ("/acme/%C3%A9", {"/base/%C3%A9", "/base/%c3%a9"}),
    ("/acme/.hidden", {"/base/.hidden"}),
    ("/acme/..x", {"/base/..x"}),
    ("/acme/x..", {"/base/x.."}),
    ("/acme/%2e%2e%2e", {"/base/..."}),
    ("/acme/a/b/c", {"/base/a/b/c"}),
    ("/acme/a%0d%0aX-Injected:%20y", {"/base/a%0d%0aX-Injected:%20y", "/base/a%0D%0AX-Injected:%20y"}),
]


@pytest.mark.parametrize("target,expected", SERVED_PATHS, ids=[t for t, _ in SERVED_PATHS])
def test_path_served(env: Env, target: str, expected: set[str]) -> None:
    """Rule 8: unreserved characters are decoded once, everything else is forwarded as sent."""
    _, rec = served(env, head(line=b"GET " + target.encode() + b" HTTP/1.1\r\n"))
    assert rec.target in expected, rec.target


ESCAPES = [
    "/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/..%2fsecret.txt", "/files/..%2Fsecret.txt",
    "/files/%2e%2e%2fsecret.txt", "/files/.%2e/secret.txt", "/files/%252e%252e/secret.txt", "/files/..%5csecret.txt",
    "/files/x/..%2f..%2fsecret.txt", "/files/%%32%65%%32%65/secret.txt", "/files/..%2f%2e%2e%2fsecret.txt",
    "/files/%2e%2e%2fsecret.txt?x=1", "/files/..%252fsecret.txt", "http://127.0.0.1:PORT/files/..%2fsecret.txt",
]


def test_file_server_sanity(env: Env) -> None:
    with client(env) as c:
        c.send(b"GET /files/index.html HTTP/1.1\r\nHost: a\r\n\r\n")
        r = c.response()
    assert r is not None and r.status == 200 and r.body == b"public index\n", r


@pytest.mark.parametrize("target", ESCAPES)
def test_file_server_secret_is_never_served(env: Env, target: str) -> None:
    """Rule 8 against a real upstream (python -m http.server, to = /public): no escape to ../secret.txt."""
    raw = (b"GET " + target.encode() + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").replace(
        b"PORT", str(env.port).encode())
    with client(env) as c:
        c.send(raw)
        try:
            r = c.response()
        except Cut:
            r = None
        rest = c.rest() if r is not None else b""
    assert SECRET.encode() not in bytes(c.received) + rest, f"{target} served the secret"
    assert r is not None and r.status in (400, 404), r  # refused (400), or at worst a miss


# -- rule 9: malformed or ambiguous responses -----------------------------------------------------

EVIL = b'{"request_id": "EVIL"}'
SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Request-Id: EVIL\r\n\r\n%s" % (len(EVIL), EVIL)


@dataclass
class Bad:
    id: str
    raw: bytes | list[bytes]
    expect: str  # "502": exactly a 502; "502-or-cut"; "ok": the valid first response (or 502/cut)
    rule: str
    close: bool = False  # the upstream closes after writing (else keeps the connection open)
    method: str = "GET"
    ok_status: int = 200
    ok_body: bytes = b"ok"


R9_CL = "RFC 9112 §6.3 (invalid or conflicting Content-Length in a response: 502, close upstream)"
R9_TE = "RFC 9112 §6.1, §6.3 (Transfer-Encoding in a response: exactly chunked, never with Content-Length)"
R9_STATUS = "RFC 9112 §4 (status-line = HTTP-version SP 3DIGIT SP [reason]); RFC 9110 §15 (100..599)"
R9_LINES = "RFC 9112 §2.2, §5.1, §5.2; RFC 9110 §5.5 (response field lines)"
R9_EXTRA = "RFC 9112 §9.3.2, §6.3 (bytes after the response are no response to the next request)"


def _bad_responses() -> list[Bad]:
    ok = b"HTTP/1.1 200 OK\r\n"
    c = [
        Bad("cl-te", ok + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SECOND, "502", R9_TE),
        Bad("te-cl", ok + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + SECOND, "502", R9_TE),
        Bad("dup-cl-different", ok + b"Content-Length: 2\r\nContent-Length: 7\r\n\r\nokEVIL!", "502", R9_CL),
        Bad("dup-cl-equal", ok + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok" + SECOND, "502", R9_CL),
        Bad("cl-list", ok + b"Content-Length: 2, 2\r\n\r\nok" + SECOND, "502", R9_CL),
        Bad("te-gzip", ok + b"Transfer-Encoding: gzip\r\n\r\nEVIL", "502", R9_TE),
        Bad("te-gzip-chunked", ok + b"Transfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", "502", R9_TE),
        Bad("te-identity", ok + b"Transfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nok" + SECOND, "502", R9_TE),
        Bad("te-chunked-twice", ok + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n", "502", R9_TE),
        Bad("te-space-before-colon", ok + b"Transfer-Encoding : chunked\r\nContent-Length: 2\r\n\r\nok", "502",
            R9_LINES),
        Bad("status-2-digits", b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok", "502", R9_STATUS),
        Bad("status-4-digits", b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", "502", R9_STATUS),
        Bad("status-letters", b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok", "502", R9_STATUS),
        Bad("status-099", b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok", "502", R9_STATUS),
        Bad("status-600", b"HTTP/1.1 600 High\r\nContent-Length: 2\r\n\r\nok", "502", R9_STATUS),
        Bad("http2-status-line", b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "502", R9_STATUS),
        Bad("lower-case-version", b"http/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "502", R9_STATUS),
        Bad("leading-space-status-line", b" HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "502", R9_STATUS),
        Bad("no-status-line-http09", EVIL, "502", R9_STATUS, close=True),
        Bad("bare-lf-everywhere", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "502", R9_LINES),
        Bad("bare-lf-one-field", ok + b"X-A: b\nContent-Length: 2\r\n\r\nok", "502", R9_LINES),
        Bad("bare-cr", ok + b"X-A: b\rContent-Length: 2\r\n\r\nok", "502", R9_LINES),
        Bad("obs-fold", ok + b"X-A: b\r\n c\r\nContent-Length: 2\r\n\r\nok", "502", R9_LINES),
        Bad("space-before-colon-cl", ok + b"Content-Length : 2\r\n\r\nok", "502", R9_LINES),
        Bad("nul-in-value", ok + b"X-A: b\x00c\r\nContent-Length: 2\r\n\r\nok", "502", R9_LINES),
        Bad("bad-field-name", ok + b"X A: b\r\nContent-Length: 2\r\n\r\nok", "502", R9_LINES),
        Bad("head-over-32k", ok + b"X-Pad: " + b"p" * (40 * 1024) + b"\r\nContent-Length: 2\r\n\r\nok", "502",
            "spec rule 3/9 (response head over 32 KiB: 502)"),
        Bad("101-unasked", b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: evil\r\n\r\n" + SECOND,
            "502", "RFC 9110 §15.2.2 (101 only in answer to Upgrade)"),
        Bad("1xx-with-body", b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nEVIL!" + SECOND, "502",
            "RFC 9110 §15.2 (1xx has no content: the bytes after it are garbage)"),
        Bad("close-without-response", b"", "502", "RFC 9110 §15.6.3 (no response: 502)", close=True),
    ]
    for label, value in [("letters", b"abc"), ("negative", b"-1"), ("plus", b"+2"), ("hex", b"0x2"),
                         ("two-numbers", b"2 2"), ("empty", b""), ("2-pow-64-plus-5", b"18446744073709551621")]:
        c.append(Bad(f"cl-{label}", ok + b"Content-Length: " + value + b"\r\n\r\nok" + SECOND, "502", R9_CL))
    for label, size in [("underscore", b"1_0"), ("negative", b"-1"), ("0x", b"0x2"), ("leading-space", b" 2"),
                        ("trailing-space", b"2 "), ("2-pow-64-plus-5", b"10000000000000005"), ("not-hex", b"zz"),
                        ("bare-lf", b"2\n"), ("bad-ext", b"2;a b")]:
        line = size if size.endswith(b"\n") else size + b"\r\n"
        c.append(Bad(f"chunk-size-{label}", ok + b"Transfer-Encoding: chunked\r\n\r\n" + line + b"ok\r\n0\r\n\r\n"
                     + SECOND, "502-or-cut", "RFC 9112 §7.1 (chunk-size, chunk-ext)"))
    c += [
        Bad("chunk-data-then-junk", ok + b"Transfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n0\r\n\r\n" + SECOND,
            "502-or-cut", "RFC 9112 §7.1 (chunk-data CRLF)"),
        Bad("cl-short-then-close", ok + b"Content-Length: 100\r\n\r\nabc", "502-or-cut",
            "RFC 9112 §8 (incomplete message: the client must see it incomplete)", close=True),
        Bad("chunked-unterminated-then-close", ok + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", "502-or-cut",
            "RFC 9112 §8 (incomplete message)", close=True),
        Bad("extra-response-same-write", ok + b"Content-Length: 2\r\n\r\nok" + SECOND, "ok", R9_EXTRA),
        Bad("extra-response-separate-write", [ok + b"Content-Length: 2\r\n\r\nok", SECOND], "ok", R9_EXTRA),
        Bad("extra-bytes-after-chunked", ok + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" + SECOND,
            "ok", R9_EXTRA),
        Bad("204-with-body", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nEVIL!" + SECOND, "ok",
            "RFC 9110 §15.3.5 (204 has no content)", ok_status=204, ok_body=b""),
        Bad("304-with-body", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nEVIL!" + SECOND, "ok",
            "RFC 9110 §15.4.5 (304 has no content)", ok_status=304, ok_body=b""),
        Bad("head-response-with-body", ok + b"Content-Length: 5\r\n\r\nEVIL!" + SECOND, "ok",
            "RFC 9110 §9.3.2 (a response to HEAD has no content)", method="HEAD", ok_body=b""),
        Bad("100-then-200", b"HTTP/1.1 100 Continue\r\n\r\n" + ok + b"Content-Length: 2\r\n\r\nok", "ok",
            "RFC 9110 §15.2 (interim responses precede the final one)"),
        Bad("103-103-then-200", b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\n\r\n" + ok + b"Content-Length: 2\r\n\r\nok", "ok",
            "RFC 9110 §15.2 (several interim responses)"),
        Bad("head-response-chunked-no-body", ok + b"Transfer-Encoding: chunked\r\n\r\n" + SECOND, "ok",
            "RFC 9112 §6.3 (1) (a response to HEAD ends at its head, whatever its framing fields)",
            method="HEAD", ok_body=b""),
        Bad("connection-close-then-junk", ok + b"Content-Length: 2\r\nConnection: close\r\n\r\nok" + SECOND, "ok",
            "RFC 9112 §9.6 (after Connection: close the upstream connection is not reused)"),
        Bad("http10-until-close", b"HTTP/1.0 200 OK\r\n\r\nok", "ok",
            "RFC 9112 §6.3 (8) (no framing: the body ends at close)", close=True),
    ]
    return c


BAD_RESPONSES = _bad_responses()


def _follow_ups(env: Env, n: int = 3) -> None:
    for _ in range(n):
        rid = env.new_id("next")
        with client(env) as c:
            c.send(get(rid, "/acme/next"))
            try:
                r = c.response()
            except Cut as exc:
                raise AssertionError(f"the next request was cut: {exc.partial[:500]!r}") from None
            assert b"EVIL" not in bytes(c.received), "leftover upstream bytes reached another request"
        assert_own(r, rid)


@pytest.mark.parametrize("case", [pytest.param(b, id=b.id) for b in BAD_RESPONSES])
def test_bad_response(env: Env, case: Bad) -> None:
    """Rule 9: a malformed or ambiguous response is a 502 (or a cut), and its connection is not reused."""
    marker = env.new_id("rs")
    env.rec.script(marker, case.raw, close=case.close)
    rid = env.new_id("resp")
    with client(env) as c:
        c.send(get(rid, f"/acme/{marker}", method=case.method.encode()))
        try:
            r = c.response(case.method)
            outcome = "response"
        except Cut as exc:
            r, outcome = None, f"cut after {exc.partial[:200]!r}"
        if r is None and outcome == "response":
            outcome = "closed without a response"
        got = bytes(c.received)
    assert b"EVIL" not in got, f"bytes after the response reached the client: {got[:1000]!r}"
    if case.expect == "502":
        assert r is not None and r.status == 502, (outcome, r and (r.status, r.body[:300]))
        assert_error_json(r)
    elif case.expect == "502-or-cut":
        assert (r is None and outcome.startswith("cut")) or (r is not None and r.status == 502), \
            (outcome, r and (r.status, r.body[:300]))
    else:
        assert (r is None and outcome.startswith("cut")) or (r is not None and (
            r.status == 502 or (r.status == case.ok_status and r.body == case.ok_body))), \
            (outcome, r and (r.status, r.body[:300]))
    raw = case.raw if isinstance(case.raw, bytes) else b"".join(case.raw)
    if b"EVIL" in raw:
        # Bytes after the response: the proxy must drop that upstream connection, whether they
        # came with the response or later. Waiting for the drop keeps the follow-ups from racing
        # bytes still on their way (which no proxy could tell from an answer to a new request).
        conn = next(r.conn for r in env.rec.snapshot() if r.scripted and marker in r.target)
        assert env.rec.wait_for(lambda: conn not in env.rec.conns), \
            "an upstream connection that sent bytes after its response was kept open"
    _follow_ups(env)


def test_client_abandoning_a_large_response_does_not_leak(env: Env) -> None:
    """Rule 9/10: a client leaving mid-body leaves nothing behind for the next client."""
    for _ in range(2):
        with client(env) as c:
            c.send(get(env.new_id("abandon"), "/acme/big?pad=2000000"))
            c.sock.recv(1024)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
    _follow_ups(env, 5)


# -- rule 10: responses never cross clients --------------------------------------------------------

def test_responses_never_cross_clients(env: Env) -> None:
    """Rule 10 (RFC 9112 §9.3.2): two clients interleaving through the pooled upstream connections
    each get only their own responses (some large enough for splice, some pipelined)."""
    errors: list[str] = []
    barrier = threading.Barrier(2)

    def run(tag: str) -> None:
        try:
            with client(env, timeout=15) as c:
                barrier.wait(10)
                for batch in range(60):
                    ids = [env.new_id(tag) for _ in range(1 + batch % 3)]
                    pads = [(300 * 1024 if (batch + i) % 17 == 0 else (batch * 37 + i) % 3000) for i in range(len(ids))]
                    c.send(b"".join(get(rid, f"/acme/{tag}?pad={pad}") for rid, pad in zip(ids, pads)))
                    for rid in ids:
                        r = c.response()
                        if r is None or r.status != 200 or r.request_id != rid:
                            errors.append(f"{tag} expected {rid}, got {r and (r.status, r.body[:200])}")
                            return
        except Exception as exc:  # reported below
            errors.append(f"{tag}: {exc!r}")

    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("alpha", "beta")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


# -- rule 11: no retry of non-idempotent requests -----------------------------------------------------

@pytest.mark.parametrize("method,extra,body", [
    ("POST", b"Content-Length: 5\r\n", b"hello"),
    ("POST", b"Content-Length: 0\r\n", b""),
    ("POST", b"", b""),
    ("POST", b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ("PATCH", b"Content-Length: 5\r\n", b"hello"),
], ids=["post-body", "post-cl-0", "post-no-body", "post-chunked", "patch-body"])
def test_non_idempotent_request_is_never_sent_twice(env: Env, method: str, extra: bytes, body: bytes) -> None:
    """Rule 11 (RFC 9110 §9.2.2, RFC 9112 §9.3.1): the upstream closes after reading the request,
    without answering: 502, and the request reached it exactly once (no automatic retry)."""
    warm = env.new_id("warm")  # an idle pooled connection, so the request goes over a reused one
    with client(env) as c:
        c.send(get(warm, "/acme/warm"))
        assert_own(c.response(), warm)
    marker = env.new_id("once")
    env.rec.script(marker, b"", close=True)
    rid = env.new_id("unsafe")
    with client(env) as c:
        c.send(get(rid, f"/acme/{marker}", extra=extra, method=method.encode()) + body)
        r = c.response(method)
    assert r is not None and r.status == 502, r
    assert_error_json(r)
    sentinel(env)
    seen = [x for x in env.rec.snapshot() if x.request_id == rid]
    assert len(seen) == 1, f"{method} reached the upstream {len(seen)} times"


# -- rule 12: a long pipeline -------------------------------------------------------------------------

def test_ten_thousand_pipelined_requests(env: Env) -> None:
    """Rule 12 (RFC 9112 §9.3.2): 10,000 pipelined GETs are all answered, in order."""
    n = 10_000
    requests = [get(f"pipe-{i}", f"/acme/p{i % 97}") for i in range(n)]
    with client(env, timeout=30) as c:
        failure: list[BaseException] = []

        def writer() -> None:
            try:
                for start in range(0, n, 250):
                    c.sock.sendall(b"".join(requests[start:start + 250]))
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=writer)
        thread.start()
        for i in range(n):
            r = c.response()
            assert r is not None and r.status == 200 and r.request_id == f"pipe-{i}", (i, r)
        thread.join(30)
        assert not failure, failure
    seen = env.rec.wait_requests(n, timeout=30)
    assert [x.request_id for x in seen] == [f"pipe-{i}" for i in range(n)]
    assert "Traceback" not in env.daemon.log

