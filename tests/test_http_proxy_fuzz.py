"""Fuzz http_proxy over real sockets against the recording upstream (tests/http_recorder.py).

Requests: hypothesis builds pipelines of 1-3 requests (methods, targets, header names and
values with hostile bytes, Content-Length / Transfer-Encoding combinations, chunked bodies with
random chunk sizes, extensions and trailers), each with its own X-Request-Id, and sends them in
random segments. Every framing mutation makes the framing *invalid* (never differently valid),
so whatever the proxy does, these must hold:

* every request the upstream saw is one the client made: an outer X-Request-Id (never one of
  the requests hidden in bodies), with the same method and the same body bytes;
* no request arrives twice;
* every answer from the upstream the client got carries the X-Request-Id of the request it
  answers (responses stay in order);
* a pipeline without any hostile part is served completely;
* the daemon log gains no "Traceback".

Responses: the recorder answers with generated raw bytes (valid, or with invalid status lines,
field lines or framing, optionally followed by a second, "EVIL" response). The client gets the
upstream's response intact (valid ones), a 502, or a cut connection; never "EVIL" bytes, and
the next clients get their own answers.

Reproducible: derandomized, no example database. Shrinking is off by default (every step costs
network round trips and, for a lenient engine, timeouts): RELAYD_FUZZ_SHRINK=1 turns it on.
"""

from __future__ import annotations

import itertools
import json
import os
import string
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from http_recorder import Cut, RawClient, Recorder, Response
from relayd.testing import RelaydProcess, free_port, start_relayd, write_config
from test_http_proxy import proxy_config

pytestmark = pytest.mark.timeout(300)

TIMEOUT = 3.0
PROXY_PORT = [0]  # read while drawing (absolute-form targets); set by the env fixture
PHASES = tuple(p for p in Phase if p is not Phase.shrink or os.environ.get("RELAYD_FUZZ_SHRINK"))
FUZZ = settings(deadline=None, derandomize=True, database=None, phases=PHASES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@dataclass
class Env:
    daemon: RelaydProcess
    port: int
    rec: Recorder
    serial: Iterator[int]

    def new_id(self, tag: str) -> str:
        return f"{tag}-{next(self.serial)}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("fuzz")
    rec = Recorder()
    port = PROXY_PORT[0] = free_port()
    config = proxy_config(port, f"{rec.url}/base", service_extra="read_timeout = 2")
    daemon = start_relayd(tmp, write_config(tmp / "etc", config))
    try:
        yield Env(daemon, port, rec, itertools.count())
    finally:
        daemon.kill()
        rec.stop()


def sentinel(env: Env) -> None:
    rid = env.new_id("sentinel")
    with RawClient(env.port, timeout=TIMEOUT) as c:
        c.send(b"GET /acme/sentinel HTTP/1.1\r\nHost: a\r\nX-Request-Id: " + rid.encode() + b"\r\n\r\n")
        r = c.response()
    assert r is not None and r.status == 200 and r.request_id == rid, r
    env.rec.wait_request_id(rid)


def log_check(env: Env, start: int) -> None:
    new = env.daemon.log[start:]
    assert "Traceback" not in new, new[-4000:]
    assert env.daemon.process.poll() is None, "relayd exited"


# -- request generation ------------------------------------------------------------------------

@dataclass
class Req:
    raw: bytes
    rid: str
    method: str
    payload: bytes
    hostile: bool
    closes: bool  # asks for the connection to close after it


TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
VALID_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
HOSTILE_METHODS = ["get", "Post", "G(T", "GE T", "", "POST\x00", "GET\t", "ÉT", "GET/", "\x7fGET"]
PLAIN_SEGMENT = st.text(string.ascii_letters + string.digits + "-_~", min_size=1, max_size=8)
HOSTILE_PIECES = ["%2e%2e", "..", "%2f", "%2F", "%5c", "\\", "%00", "%252e", ".", " ", "\x00", "#", "\x7f", "é",
                  "%", "%zz", "\r", "\n", "%%32%65", "//"]
FIELD_VCHAR = [chr(c) for c in range(0x21, 0x7f)]
HOSTILE_VALUE_BYTES = ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1b", "\x7f", "\r", "\n", "\r\n ", "\r\n\t"]
HOSTILE_NAMES = ["X A", "X-A ", "X(A)", "X\x00A", "", "X\tA", "Ä", "X\x7f", " X-A", "X@A"]
HOSTILE_HOSTS = [None, "a b", "a@b", "a/b", "a:8x", "[::1", "a\x00", "a\r"]
HOSTILE_CONNECTION = ["content-length", "Transfer-Encoding", "host", "X-Forwarded-User", "keep-alive, Content-Length"]


def inner_request(n: int) -> bytes:
    """A request hidden in a body: it must never reach the upstream as a request."""
    return (b"0\r\n\r\nGET /acme/inner HTTP/1.1\r\nHost: a\r\nX-Request-Id: inner-%d\r\n"
            b"Content-Length: 0\r\n\r\n" % n)


@st.composite
def field_value(draw: st.DrawFn, hostile: bool) -> str:
    """A field value: VCHAR, obs-text, SP/HTAB inside; hostile: NUL, CTLs, bare CR/LF, obs-fold."""
    chars = draw(st.lists(st.sampled_from(FIELD_VCHAR + [" ", "\t", "é"]), max_size=12))
    if not hostile:
        return "".join(chars)
    for _ in range(draw(st.integers(1, 2))):
        chars.insert(draw(st.integers(0, len(chars))), draw(st.sampled_from(HOSTILE_VALUE_BYTES)))
    return "".join(chars)


@st.composite
def chunked_body(draw: st.DrawFn, payload: bytes, hostile: bool) -> tuple[bytes, bool]:
    """(chunked encoding of payload, whether a mutation made it invalid)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=5)))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)]) if b > a]
    mutate_at = draw(st.integers(0, len(pieces))) if hostile else -1
    out = []
    for i, piece in enumerate(pieces + [b""]):
        size = b"%x" % len(piece)
        style = draw(st.sampled_from(["lower", "upper", "zeros", "ext", "quoted-ext", "plain"]))
        if style == "upper":
            size = size.upper()
        elif style == "zeros":
            size = b"000" + size
        ext = {"ext": b";a=b", "quoted-ext": b';name="q s"'}.get(style, b"")
        line_end, after = b"\r\n", b"\r\n"
        if i == mutate_at:
            kind = draw(st.sampled_from(["underscore", "lead-space", "trail-space", "0x", "minus", "plus",
                                         "overflow", "bad-ext", "bare-lf", "data-junk", "empty-size",
                                         "ctl-ext"]))
            if kind == "underscore":
                size = size[:1] + b"_" + size[1:] if len(size) > 1 else b"_" + size
            elif kind == "lead-space":
                size = b" " + size
            elif kind == "trail-space":
                size = size + b" "
                ext = b""
            elif kind == "0x":
                size = b"0x" + size
            elif kind == "minus":
                size = b"-" + size
            elif kind == "plus":
                size = b"+" + size
            elif kind == "overflow":
                size = b"1" + b"0" * 16 + size
            elif kind == "bad-ext":
                ext = draw(st.sampled_from([b";", b";a b", b';a="b', b";=b", b";a=b c"]))
            elif kind == "ctl-ext":
                ext = b";a=\x01"
            elif kind == "bare-lf":
                line_end = b"\n"
            elif kind == "empty-size":
                size = b""
            elif kind == "data-junk" and piece:
                after = b"X\r\n"
            else:
                size = b"-" + size
        if piece:
            out.append(size + ext + line_end + piece + after)
        else:  # the last chunk, optional trailers
            trailer = b""
            if draw(st.booleans()):
                trailer = b"X-Trailer: t\r\n"
            out.append(size + ext + line_end + trailer + b"\r\n")
    return b"".join(out), mutate_at >= 0


@st.composite
def request(draw: st.DrawFn, rid: str, inner: int) -> Req:
    hostile = False
    method = draw(st.sampled_from(VALID_METHODS))
    if draw(st.integers(0, 9)) == 0:
        method, hostile = draw(st.sampled_from(HOSTILE_METHODS)), True
    segments = draw(st.lists(PLAIN_SEGMENT, max_size=3))
    if draw(st.integers(0, 5)) == 0:
        segments.insert(draw(st.integers(0, len(segments))), draw(st.sampled_from(HOSTILE_PIECES)))
        hostile = True
    target = "/acme" + "".join("/" + s for s in segments)
    if draw(st.booleans()):
        target += "?q=" + draw(PLAIN_SEGMENT)
    if draw(st.integers(0, 9)) == 0:
        target = f"http://127.0.0.1:{PROXY_PORT[0]}" + target  # absolute-form
    lines: list[bytes] = [b"X-Request-Id: " + rid.encode()]
    others: list[bytes] = []
    host: str | None = "a"
    if draw(st.integers(0, 9)) == 0:
        host, hostile = draw(st.sampled_from(HOSTILE_HOSTS)), True
    if host is not None:
        others.append(b"Host: " + host.encode("utf-8"))
    if draw(st.integers(0, 12)) == 0:
        others.append(b"Host: " + (host or "b").encode())
        hostile = True
    for _ in range(draw(st.integers(0, 4))):
        bad_name = draw(st.integers(0, 9)) == 0
        bad_value = draw(st.integers(0, 7)) == 0
        name = draw(st.sampled_from(HOSTILE_NAMES)) if bad_name else draw(st.text(TCHAR, min_size=1, max_size=10))
        if name.lower() in ("host", "content-length", "transfer-encoding", "connection", "x-request-id",
                            "upgrade", "expect", "te", "trailer", "keep-alive"):
            name = "X-" + name  # framing and routing fields are drawn on purpose below
        value = draw(field_value(bad_value))
        others.append(name.encode("utf-8") + b": " + value.encode("utf-8"))
        hostile |= bad_name or bad_value
    closes = False
    if draw(st.integers(0, 7)) == 0:
        others.append(b"X-Forwarded-User: " + draw(st.sampled_from([b"mallory", b"root", b""])))
    if draw(st.integers(0, 7)) == 0:
        others.append(b"X_Forwarded_User: mallory")
    if draw(st.integers(0, 9)) == 0:
        others.append(b"Expect: 100-continue")
    if draw(st.integers(0, 7)) == 0:
        token = draw(st.sampled_from(["keep-alive", "close", "x-hop"] + HOSTILE_CONNECTION))
        others.append(b"Connection: " + token.encode())
        closes = token == "close"
        hostile |= token in HOSTILE_CONNECTION
    # The body and its framing.
    payload = b""
    framing = draw(st.sampled_from(["none", "none", "cl", "chunked"]))
    if method == "HEAD":
        framing = "none"
    if framing != "none":
        payload = draw(st.binary(max_size=300))
        if draw(st.booleans()):
            at = draw(st.integers(0, len(payload)))
            payload = payload[:at] + inner_request(inner) + payload[at:]
    if framing == "cl":
        value = b"%d" % len(payload)
        style = draw(st.sampled_from(["plain", "plain", "zeros", "ows", "hostile"]))
        if style == "zeros":
            value = b"00" + value
        elif style == "ows":
            value = b" " + value + b"\t"
        cl_lines = [b"Content-Length: " + value]
        if style == "hostile":
            hostile = True
            kind = draw(st.sampled_from(["plus", "two", "list", "hex", "minus", "dup-equal", "dup-other",
                                         "with-te", "space-colon", "vt", "empty"]))
            n = len(payload)
            cl_lines = {
                "plus": [b"Content-Length: +%d" % n], "two": [b"Content-Length: %d %d" % (n, n)],
                "list": [b"Content-Length: %d, %d" % (n, n)], "hex": [b"Content-Length: 0x%x" % n],
                "minus": [b"Content-Length: -%d" % n],
                "dup-equal": [b"Content-Length: %d" % n, b"Content-Length: %d" % n],
                "dup-other": [b"Content-Length: %d" % n, b"Content-Length: %d" % (n + 7)],
                "with-te": [b"Content-Length: %d" % n, b"Transfer-Encoding: chunked"],
                "space-colon": [b"Content-Length : %d" % n], "vt": [b"Content-Length: %d\x0b" % n],
                "empty": [b"Content-Length: "],
            }[kind]
        others += cl_lines
        body = payload
    elif framing == "chunked":
        body, bad = draw(chunked_body(payload, draw(st.integers(0, 4)) == 0))
        hostile |= bad
        te_value = draw(st.sampled_from([b"chunked", b"chunked", b"\tchunked", b"chunked "]))
        te_lines = [b"Transfer-Encoding: " + te_value]
        if draw(st.integers(0, 5)) == 0:
            hostile = True
            te_lines = draw(st.sampled_from([
                [b"Transfer-Encoding: chunked", b"Content-Length: %d" % len(body)],
                [b"Content-Length: %d" % len(payload), b"Transfer-Encoding: chunked"],
                [b"Transfer-Encoding: gzip, chunked"], [b"Transfer-Encoding: chunked, chunked"],
                [b"Transfer-Encoding: xchunked"], [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
                [b"Transfer-Encoding : chunked"], [b"Transfer-Encoding: chunked\x0b"],
                [b'Transfer-Encoding: ["chunked"]'], [b"Transfer-encoding: identity"],
                [b"Transfer-Encoding: identity", b"Transfer-Encoding: chunked"],
            ]))
        others += te_lines
    else:
        body = b""
    others = draw(st.permutations(others))
    head_lines = [f"{method} {target} HTTP/1.1".encode(), *lines, *others]
    endings = [b"\r\n"] * len(head_lines) + [b"\r\n"]
    if draw(st.integers(0, 11)) == 0:
        endings[draw(st.integers(0, len(endings) - 1))] = draw(st.sampled_from([b"\n", b"\r", b"\r\r\n"]))
        hostile = True
    if draw(st.integers(0, 15)) == 0:  # obs-fold: a continuation line
        at = draw(st.integers(1, len(head_lines)))
        head_lines.insert(at, draw(st.sampled_from([b" folded", b"\tfolded"])))
        endings.insert(at, b"\r\n")
        hostile = True
    raw = b"".join(line + end for line, end in zip(head_lines, endings)) + endings[-1] + body
    return Req(raw, rid, method, payload, hostile, closes)


@st.composite
def pipeline(draw: st.DrawFn) -> tuple[list[Req], list[int]]:
    serial = draw(st.integers(0, 10**6))
    n = draw(st.integers(1, 3))
    reqs = [draw(request(f"fz-{serial}-{i}", serial * 10 + i)) for i in range(n)]
    total = sum(len(r.raw) for r in reqs)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, total - 1)), max_size=8))))
    return reqs, cuts


def _read_answers(c: RawClient, reqs: list[Req]) -> list[Response | None]:
    answers: list[Response | None] = []
    for req in reqs:
        method = req.method if req.method in VALID_METHODS else "GET"
        try:
            r = c.response(method)
        except Cut:
            break
        except TimeoutError:
            raise AssertionError(f"no answer to {req.rid} within {TIMEOUT}s (the proxy waits for bytes "
                                 "no valid framing announced)") from None
        if r is None:
            break
        answers.append(r)
    return answers


def _upstream_id(r: Response) -> str | None:
    """The request id an upstream answer carries; None for the proxy's own answers."""
    try:
        data = json.loads(r.body) if r.body else None
    except ValueError:
        data = None
    if isinstance(data, dict) and "serial" in data:
        return data.get("request_id")
    if not r.body and r.header("x-request-id"):  # HEAD
        return r.header("x-request-id")
    return None


@settings(FUZZ, max_examples=int(os.environ.get("RELAYD_FUZZ_EXAMPLES", "150")))
@given(case=pipeline())
def test_request_pipelines(env: Env, case: tuple[list[Req], list[int]]) -> None:
    reqs, cuts = case
    env.rec.clear()
    start = len(env.daemon.log)
    data = b"".join(r.raw for r in reqs)
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    with RawClient(env.port, timeout=TIMEOUT) as c:
        c.send_segments(pieces)
        answers = _read_answers(c, reqs)
    sentinel(env)
    by_id = {r.rid: r for r in reqs}
    seen = [x for x in env.rec.snapshot() if not (x.request_id or "").startswith("sentinel-")]
    ids = [x.request_id for x in seen]
    # Every request the upstream saw is one the client made, once, as made.
    for x in seen:
        assert x.request_id in by_id, f"the upstream saw a request the client never made: {x!r}"
        made = by_id[x.request_id]
        assert x.method == made.method, (x.method, made.method)
        assert x.body == made.payload, f"{x.request_id}: body {x.body[:200]!r} != {made.payload[:200]!r}"
        assert x.path.startswith("/base"), x.target
        assert not x.has("x-forwarded-user") and not x.has("x_forwarded_user"), x.headers
    assert len(ids) == len(set(ids)), f"a request arrived twice: {ids}"
    assert ids == [r.rid for r in reqs if r.rid in ids], f"out of order: {ids}"
    assert not [b for b in env.rec.broken_snapshot() if b.kind == "invalid"], env.rec.broken_snapshot()
    # Every upstream answer the client got belongs to the request it answers.
    for req, r in zip(reqs, answers):
        got = _upstream_id(r)
        if got is not None:
            assert got == req.rid, f"answer for {req.rid} carries {got}"
    # A pipeline without anything hostile is served completely (up to a Connection: close).
    if not any(r.hostile for r in reqs):
        expected = []
        for r in reqs:
            expected.append(r.rid)
            if r.closes:
                break
        assert ids == expected, (ids, expected)
        assert [_upstream_id(r) for r in answers] == expected, [(a.status, a.body[:100]) for a in answers]
    log_check(env, start)


# -- response generation -----------------------------------------------------------------------

@dataclass
class Resp:
    raw: bytes
    status: int
    body: bytes
    valid: bool
    junk: bool  # followed by a second response
    close: bool


EVIL = b'{"request_id": "EVIL"}'
SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Request-Id: EVIL\r\n\r\n%s" % (len(EVIL), EVIL)


@st.composite
def upstream_response(draw: st.DrawFn) -> Resp:
    valid = True
    status = draw(st.sampled_from([200, 201, 203, 400, 404, 418, 500, 503]))
    version = b"HTTP/1.1"
    status_text = b"%d" % status
    reason = draw(st.sampled_from([b"OK", b"", b"Some Reason", b"x"]))
    if draw(st.integers(0, 9)) == 0:
        valid = False
        kind = draw(st.sampled_from(["2-digit", "4-digit", "letters", "low", "high", "http2", "lower", "space"]))
        status_text = {"2-digit": b"20", "4-digit": b"2000", "letters": b"2OO", "low": b"099", "high": b"600",
                       "http2": status_text, "lower": status_text, "space": b" " + status_text}[kind]
        version = {"http2": b"HTTP/2.0", "lower": b"http/1.1"}.get(kind, version)
    body = draw(st.binary(max_size=600)).replace(b"EVIL", b"evil").replace(b"E", b"e")
    framing = draw(st.sampled_from(["cl", "cl", "chunked", "close"]))
    headers: list[bytes] = []
    for _ in range(draw(st.integers(0, 3))):
        headers.append(b"X-" + draw(st.text(string.ascii_letters, min_size=1, max_size=6)).encode() + b": v")
    if draw(st.integers(0, 9)) == 0:
        valid = False
        headers.append(draw(st.sampled_from([b"X-A: b\r\n c", b"X A: b", b"X-A : b", b"X-A: b\x00c", b"X-A: b\rc",
                                             b"X-A: b\nX-B: c", b"no-colon"])))
    close = framing == "close" or draw(st.booleans())
    if framing == "cl":
        headers.append(b"Content-Length: %d" % len(body))
        encoded = body
        if draw(st.integers(0, 5)) == 0:
            valid = False
            n = len(body)
            headers[-1:] = draw(st.sampled_from([
                [b"Content-Length: %d" % n, b"Content-Length: %d" % n],
                [b"Content-Length: %d" % n, b"Content-Length: %d" % (n + 5)],
                [b"Content-Length: +%d" % n], [b"Content-Length: %d, %d" % (n, n)], [b"Content-Length: 0x%x" % n],
                [b"Content-Length: %d" % n, b"Transfer-Encoding: chunked"],
                [b"Content-Length: %d" % n, b"Transfer-Encoding: gzip"],
                [b"Content-Length: 18446744073709551621"],
            ]))
    elif framing == "chunked":
        sizes = draw(st.lists(st.integers(1, 200), max_size=4))
        pieces, pos = [], 0
        for size in sizes:
            if pos >= len(body):
                break
            pieces.append(body[pos:pos + size])
            pos += size
        if pos < len(body):
            pieces.append(body[pos:])
        encoded = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
        headers.append(b"Transfer-Encoding: chunked")
        if draw(st.integers(0, 5)) == 0 and pieces:
            valid = False
            kind = draw(st.sampled_from(["underscore", "0x", "space", "junk", "te-gzip", "te-twice", "lf"]))
            first = b"%x" % len(pieces[0])
            if kind == "underscore":
                encoded = encoded.replace(first + b"\r\n", b"1_" + first + b"\r\n", 1)
            elif kind == "0x":
                encoded = encoded.replace(first + b"\r\n", b"0x" + first + b"\r\n", 1)
            elif kind == "space":
                encoded = encoded.replace(first + b"\r\n", first + b" \r\n", 1)
            elif kind == "junk":
                chunk = first + b"\r\n" + pieces[0] + b"\r\n"
                encoded = first + b"\r\n" + pieces[0] + b"J\r\n" + encoded[len(chunk):]
            elif kind == "te-gzip":
                headers[-1] = b"Transfer-Encoding: gzip, chunked"
            elif kind == "te-twice":
                headers.append(b"Transfer-Encoding: chunked")
            else:
                encoded = encoded.replace(first + b"\r\n", first + b"\n", 1)
    else:
        encoded = body
    lines = [version + b" " + status_text + b" " + reason, *draw(st.permutations(headers))]
    junk = framing != "close" and draw(st.integers(0, 3)) == 0
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + encoded + (SECOND if junk else b"")
    return Resp(raw, status, body, valid, junk, close)


@settings(FUZZ, max_examples=int(os.environ.get("RELAYD_FUZZ_RESPONSE_EXAMPLES", "100")))
@given(resp=upstream_response(), split=st.none() | st.integers(1, 10**6))
def test_upstream_responses(env: Env, resp: Resp, split: int | None) -> None:
    env.rec.clear()
    start = len(env.daemon.log)
    marker = env.new_id("fr")
    chunks: list[bytes] = [resp.raw]
    if split is not None and len(resp.raw) > 2:  # written in two pieces
        at = 1 + split % (len(resp.raw) - 1)
        chunks = [resp.raw[:at], resp.raw[at:]]
    env.rec.script(marker, chunks, close=resp.close)
    rid = env.new_id("fq")
    with RawClient(env.port, timeout=TIMEOUT) as c:
        c.send(b"GET /acme/" + marker.encode() + b" HTTP/1.1\r\nHost: a\r\nX-Request-Id: " + rid.encode() + b"\r\n\r\n")
        try:
            r = c.response()
            cut = False
        except Cut:
            r, cut = None, True
        except TimeoutError:
            raise AssertionError("no answer in time") from None
        got = bytes(c.received)
    assert b"EVIL" not in got, f"bytes meant for another request reached the client: {got[:600]!r}"
    intact = r is not None and r.status == resp.status and r.body == resp.body
    if resp.valid and not resp.junk:
        assert intact, (resp.raw[:300], cut, r and (r.status, r.body[:200]))
    else:  # the upstream's response as it meant it, a 502, or a cut (never anything else)
        assert intact or cut or (r is not None and r.status == 502), (resp.raw[:300], r and (r.status, r.body[:200]))
    for _ in range(2):
        nid = env.new_id("fn")
        with RawClient(env.port, timeout=TIMEOUT) as c:
            c.send(b"GET /acme/next HTTP/1.1\r\nHost: a\r\nX-Request-Id: " + nid.encode() + b"\r\n\r\n")
            r2 = c.response()
            assert b"EVIL" not in bytes(c.received)
        assert r2 is not None and r2.status == 200 and r2.request_id == nid, r2 and (r2.status, r2.body[:200])
    log_check(env, start)


def test_fuzz_env_is_quiet(env: Env) -> None:
    """After both fuzzers: the daemon still serves and logged no traceback at all."""
    sentinel(env)
    assert "Traceback" not in env.daemon.log

