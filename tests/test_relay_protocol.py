"""The relay's sans-I/O core: routing decisions and close codes without sockets, plus a fuzz test."""

from __future__ import annotations

import json
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.components.relay import protocol as p


def client(core: p.RelayCore, name: str = "c") -> p.Client:
    c = p.Client(conn=name, address="127.0.0.1:1", connected_at=0.0)
    assert core.open(c) is None
    return c


def register(core: p.RelayCore, c: p.Client, identity: str = "anonymous", name: str = "c",
             client_uuid: str | None = None) -> list[p.Action]:
    request = core.receive(c, p.encode_registration(name, client_uuid or str(uuid.uuid4())))
    assert isinstance(request, p.Register)
    return core.register(c, identity, identity, request.name, request.uuid)


def peer(src: str, dst: str, description: str = "d", **extra) -> str:
    return json.dumps({"source_uuid": src, "source_name": "x", "peer_uuid": dst, "description_type": "offer",
                       "description": description, "error": None, "message_type": "peer_connection", **extra})


def test_registration_reply_is_byte_exact():
    core = p.RelayCore()
    c = client(core)
    assert register(core, c) == [p.Send(c, p.REGISTERED_REPLY)]
    assert p.encode_response() == p.REGISTERED_REPLY


def test_forward_rewrites_source_and_matches_proxystores_encoder():
    from proxystore.p2p.relay.messages import PeerConnectionRequest, encode_relay_message

    core = p.RelayCore()
    a, b = client(core, "a"), client(core, "b")
    register(core, a, name="alice")
    register(core, b, name="b\u00f6b")
    [send] = core.receive(a, peer(str(uuid.uuid4()), b.uuid.upper(), "caf\u00e9"))
    expected = encode_relay_message(PeerConnectionRequest(
        uuid.UUID(a.uuid), "alice", uuid.UUID(b.uuid), "offer", "caf\u00e9"))
    assert send == p.Send(b, expected)


def test_other_identity_cannot_take_over_or_be_reached():
    core = p.RelayCore()
    a, b, mallory = client(core, "a"), client(core, "b"), client(core, "m")
    register(core, a, "alice", client_uuid="8b7a3f4e-0000-4000-8000-000000000001")
    register(core, b, "bob")
    [close] = register(core, mallory, "mallory", client_uuid="8b7a3f4e-0000-4000-8000-000000000001")
    assert close.code == p.FORBIDDEN and "already registered to another user" in close.reason
    assert core.by_uuid["8b7a3f4e-0000-4000-8000-000000000001"] is a and mallory not in core.connections
    [echo] = core.receive(a, peer(a.uuid, b.uuid))
    assert echo.client is a and f"The requested peer {b.uuid} is owned by a different user." in echo.text


def test_same_identity_duplicate_kicks_the_old_socket():
    core = p.RelayCore()
    old, new = client(core, "old"), client(core, "new")
    register(core, old, client_uuid="8b7a3f4e-0000-4000-8000-000000000002")
    close, reply = register(core, new, client_uuid="8b7a3f4e-0000-4000-8000-000000000002")
    assert (close.client, close.code) == (old, p.DUPLICATE) and reply == p.Send(new, p.REGISTERED_REPLY)
    assert len(close.reason.encode()) <= 123 and old.closed


def test_reasons_are_cut_at_a_utf8_boundary():
    reason = "ForbiddenError: " + "\u00e9" * 100
    cut = p.truncate_reason(reason)
    assert len(cut.encode()) <= 123 and reason.startswith(cut) and len(cut.encode()) >= 121


def test_max_message_bytes_counts_utf8_bytes():
    probe = peer(str(uuid.UUID(int=1)), str(uuid.UUID(int=1)), "")
    core = p.RelayCore(max_message_bytes=len(probe) + 3)
    a, b = client(core, "a"), client(core, "b")
    for c in (a, b):
        register(core, c, client_uuid=str(uuid.UUID(int=1 if c is a else 2)))
    # one character, 2 UTF-8 bytes: fits in 3 bytes of slack
    assert type(core.receive(a, json.dumps(json.loads(peer(a.uuid, a.uuid, "\u00e9")), ensure_ascii=False))[0]) is p.Send
    # one character, 4 UTF-8 bytes: does not, although it is one character (sys.getsizeof would differ again)
    text = json.dumps(json.loads(peer(b.uuid, b.uuid, "\U0001F600")), ensure_ascii=False)
    assert len(text) == len(probe) + 1
    assert core.receive(b, text)[0].code == p.TOO_LONG and b.closed and b.uuid not in core.by_uuid


def test_rate_limit_refills_over_time():
    core = p.RelayCore(max_messages_per_second=2)
    c = client(core)
    register(core, c)  # takes one token at t=0
    assert type(core.receive(c, peer(c.uuid, c.uuid), now=0.0)[0]) is p.Send
    assert core.receive(c, peer(c.uuid, c.uuid), now=0.1)[0].code == p.RATE_LIMITED


def test_rate_limit_allows_steady_traffic():
    core = p.RelayCore(max_messages_per_second=2)
    c = client(core)
    register(core, c)
    for i in range(1, 20):
        assert type(core.receive(c, peer(c.uuid, c.uuid), now=i * 0.5)[0]) is p.Send


def test_client_limit():
    core = p.RelayCore(max_clients=1)
    client(core)
    extra = p.Client("x", "", 0.0)
    assert core.open(extra).code == p.TOO_MANY_CLIENTS


# -- fuzz: any frame sequence leaves the registry consistent --------------------------------------

_uuids = [str(uuid.UUID(int=i)) for i in range(1, 4)]
_values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8), st.sampled_from(_uuids),
                    st.sampled_from([u.upper().replace("-", "") for u in _uuids]),
                    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_keys = st.sampled_from(["name", "uuid", "message_type", "source_uuid", "source_name", "peer_uuid",
                         "description_type", "description", "error", "success", "message", "extra"])
_types = st.sampled_from(["relay_registration", "peer_connection", "relay_response", "bogus"])


@st.composite
def messages(draw):
    kind = draw(_types)
    if kind == "relay_registration":
        obj = {"name": draw(st.text(max_size=5)), "uuid": draw(st.sampled_from(_uuids))}
    elif kind == "peer_connection":
        obj = {"source_uuid": draw(st.sampled_from(_uuids)), "source_name": "s",
               "peer_uuid": draw(st.sampled_from(_uuids)), "description_type": draw(st.sampled_from(["offer", "answer", "x"])),
               "description": "d", "error": None}
    else:
        obj = {}
    obj["message_type"] = kind
    for key, value in draw(st.dictionaries(_keys, _values, max_size=2)).items():
        obj[key] = value
    for key in draw(st.lists(st.sampled_from(sorted(obj)), max_size=1)):
        del obj[key]
    return json.dumps(obj)


frames = st.one_of(messages(), st.text(max_size=20), st.sampled_from(["[]", "null", "1", '"x"', "{}", "{" * 3000]),
                   st.just(b"binary"))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), frames, st.sampled_from(["alice", "bob"])), max_size=12))
def test_fuzz_core_never_crashes_and_never_keeps_a_closed_client(script):
    core = p.RelayCore(max_message_bytes=400, max_messages_per_second=50)
    clients = [client(core, str(i)) for i in range(3)]
    for index, frame, identity in script:
        c = clients[index]
        if isinstance(frame, bytes):
            actions = core.receive_binary(c)
        else:
            actions = core.receive(c, frame)
            if isinstance(actions, p.Register):
                actions = core.register(c, identity, identity, actions.name, actions.uuid)
        for action in actions:
            if isinstance(action, p.Close):
                assert action.code in p.DOCUMENTED_CODES
                assert len(action.reason.encode()) <= 123
                assert action.client.closed
            else:
                assert not action.client.closed
                json.loads(action.text)
    # invariants: only open clients are registered, each under its own uuid
    for key, c in core.by_uuid.items():
        assert not c.closed and c.uuid == key and c in core.connections
    assert all(not c.closed for c in core.connections)


_ws = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\ufeff", max_size=3)
_json_texts = st.one_of(
    st.builds(lambda a, v, b: a + json.dumps(v) + b, _ws, st.recursive(
        st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
        max_leaves=5), _ws),
    st.text(max_size=12), st.sampled_from(["", " ", "{} {}", "1 2", "\ufeff{}", "[1,]", "NaN", " -Infinity "]))


@settings(max_examples=1000, deadline=None)
@given(_json_texts)
def test_parse_json_is_exactly_json_loads(text):
    def outcome(parse):
        try:
            return ("ok", repr(parse(text)))
        except (ValueError, RecursionError):
            return ("error",)

    assert outcome(p.parse_json) == outcome(json.loads)
