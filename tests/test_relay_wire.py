"""Hostile bytes against the relay's WebSocket layer (components/relay/wsconn.py), over real
sockets: each case names the RFC 6455 rule and the status or close code relayd answers with.
The relay runs in-process (tests/test_relay_fuzz.py's InProcessRelay), so every case can also
check that nothing stays registered or connected afterwards."""

from __future__ import annotations

import json
import socket
import struct
import uuid

import pytest

from relayd.components.relay import protocol as p
from test_relay_fuzz import InProcessRelay

HANDSHAKE = ("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
MASK = b"\x37\xfa\x21\x3d"
REPLY = p.REGISTERED_REPLY.encode()


@pytest.fixture(scope="module")
def relay():
    server = InProcessRelay()
    yield server
    server.stop()


def frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True, rsv: int = 0,
          length: int | None = None) -> bytes:
    """A client frame; `length` overrides the length field (to claim more than is sent)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def registration(name: str = "wire") -> bytes:
    return json.dumps({"name": name, "uuid": str(uuid.uuid4()), "message_type": "relay_registration"}).encode()


class Peer:
    """A raw TCP client of the relay."""

    def __init__(self, relay: InProcessRelay, request: str | bytes = HANDSHAKE) -> None:
        self.sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        self.sock.sendall(request.encode() if isinstance(request, str) else request)
        self.buf = b""

    def read_head(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers, self.buf

    def read_all(self) -> bytes:
        """Everything until the relay closes the connection."""
        try:
            while chunk := self.sock.recv(65536):
                self.buf += chunk
        except ConnectionResetError:
            pass
        data, self.buf = self.buf, b""
        return data

    def read_frame(self) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 2:
                n, at = self.buf[1] & 0x7F, 2
                if n == 126 and len(self.buf) >= 4:
                    n, at = struct.unpack("!H", self.buf[2:4])[0], 4
                if (n < 126 or at == 4) and len(self.buf) >= at + n:
                    opcode, payload = self.buf[0] & 0x0F, self.buf[at:at + n]
                    self.buf = self.buf[at + n:]
                    return opcode, payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk

    def open(self) -> Peer:
        status, _, _ = self.read_head()
        assert status == 101
        return self

    def register(self) -> Peer:
        self.open()
        self.sock.sendall(frame(0x1, registration()))
        assert self.read_frame() == (0x1, REPLY)
        return self

    def closed_with(self) -> int | None:
        """The code of the relay's close frame, and the relay must then close TCP."""
        data = self.buf + self.read_all()
        self.buf = b""
        while data:
            opcode, n = data[0] & 0x0F, data[1] & 0x7F
            if opcode == 0x8:
                return struct.unpack("!H", data[2:4])[0] if n >= 2 else None
            data = data[2 + n:]
        return None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peer(relay):
    peers: list[Peer] = []

    def make(request: str | bytes = HANDSHAKE) -> Peer:
        peers.append(Peer(relay, request))
        return peers[-1]

    yield make
    for each in peers:
        each.close()
    assert relay.wait_idle() == (0, 0), "stale connection or registration"


# -- frames: RFC 6455 section 5 ------------------------------------------------------------------

def test_oversize_frame_is_1009_before_its_payload_arrives(peer):
    """7.4.1 1009: a message too big to process; relayd's limit is 1 MiB (proxystore-relay's).
    Only the header is sent: the relay must not wait for (or buffer) 2 MiB first."""
    c = peer().register()
    c.sock.sendall(frame(0x1, b"", length=2 * 2**20)[:10] + MASK)
    assert c.closed_with() == p.MESSAGE_TOO_BIG


def test_oversize_message_in_fragments_is_1009(peer):
    """The 1 MiB limit is per message, not per frame (fragments add up)."""
    c = peer().register()
    chunk = b"x" * (600 * 1024)
    c.sock.sendall(frame(0x1, chunk, fin=False) + frame(0x0, chunk, fin=True))
    assert c.closed_with() == p.MESSAGE_TOO_BIG


def test_unmasked_client_frame_is_1002(peer):
    """5.1: a server MUST close the connection on an unmasked frame from a client (1002)."""
    c = peer().register()
    c.sock.sendall(frame(0x1, registration(), masked=False))
    assert c.closed_with() == p.PROTOCOL_ERROR


def test_fragmented_control_frame_is_1002(peer):
    """5.5: control frames MUST NOT be fragmented."""
    c = peer().register()
    c.sock.sendall(frame(0x9, b"ping", fin=False))
    assert c.closed_with() == p.PROTOCOL_ERROR


def test_control_frame_over_125_bytes_is_1002(peer):
    """5.5: control frames carry at most 125 bytes of payload."""
    c = peer().register()
    c.sock.sendall(frame(0x9, b"p" * 126))
    assert c.closed_with() == p.PROTOCOL_ERROR


@pytest.mark.parametrize("opcode, rsv", [(0x3, 0), (0xB, 0), (0x1, 0b100), (0x1, 0b001)])
def test_reserved_opcodes_and_bits_are_1002(peer, opcode, rsv):
    """5.2: reserved opcodes, and RSV bits without a negotiated extension, fail the connection."""
    c = peer().register()
    c.sock.sendall(frame(opcode, b"{}", rsv=rsv))
    assert c.closed_with() == p.PROTOCOL_ERROR


def test_continuation_without_a_start_is_1002(peer):
    """5.4: a continuation frame must follow a non-final data frame."""
    c = peer().register()
    c.sock.sendall(frame(0x0, b"{}"))
    assert c.closed_with() == p.PROTOCOL_ERROR


def test_new_message_inside_a_fragmented_one_is_1002(peer):
    """5.4: the fragments of one message are not interleaved with another data message."""
    c = peer().register()
    c.sock.sendall(frame(0x1, b"{", fin=False) + frame(0x1, b"{}"))
    assert c.closed_with() == p.PROTOCOL_ERROR


def test_non_utf8_text_is_1007(peer):
    """8.1: a text message that is not valid UTF-8 fails the connection; 7.4.1: 1007."""
    c = peer().register()
    c.sock.sendall(frame(0x1, b'{"name": "\xff\xfe"}'))
    assert c.closed_with() == p.INVALID_DATA


def test_utf8_split_across_fragments_with_a_ping_between_is_one_message(peer):
    """5.4: control frames may be injected between fragments; 5.5.2: a ping is answered with a
    pong carrying its payload; 5.6: UTF-8 is checked on the whole message, so a character split
    across fragments is fine."""
    c = peer().open()
    text = json.dumps({"name": "é", "uuid": str(uuid.uuid4()), "message_type": "relay_registration"},
                      ensure_ascii=False).encode()
    cut = text.index("é".encode()) + 1  # inside the two-byte character
    c.sock.sendall(frame(0x1, text[:cut], fin=False) + frame(0x9, b"hi") + frame(0x0, text[cut:]))
    assert c.read_frame() == (0xA, b"hi")
    assert c.read_frame() == (0x1, REPLY)


def test_client_close_is_echoed_then_tcp_closed(peer):
    """5.5.1 and 7.1.1: the server echoes the close code and then closes the TCP connection."""
    c = peer().register()
    c.sock.sendall(frame(0x8, struct.pack("!H", 1000) + b"bye"))
    assert c.closed_with() == 1000


def test_frames_right_behind_the_handshake_are_read(peer):
    """A client may send its first frame in the same packet as its request (4.1: after the
    handshake it may send data; nothing says it must wait for the 101)."""
    c = peer(HANDSHAKE.encode() + frame(0x1, registration()))
    c.open()
    assert c.read_frame() == (0x1, REPLY)


# -- the opening handshake: RFC 6455 section 4 ---------------------------------------------------

def test_handshake_without_upgrade_is_426_with_a_hint(peer):
    """4.2.1 needs Upgrade: websocket; RFC 9110 15.5.22: a 426 names the protocol in Upgrade."""
    c = peer("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = c.read_head()
    assert status == 426 and headers["upgrade"] == "websocket"
    assert b"ProxyStore-compatible WebSocket relay" in c.read_all()


def test_wrong_websocket_version_is_426_naming_13(peer):
    """4.2.2 / 4.4: a version the server does not speak gets 426 and Sec-WebSocket-Version."""
    c = peer(HANDSHAKE.replace("Version: 13", "Version: 8"))
    status, headers, _ = c.read_head()
    assert status == 426 and headers["sec-websocket-version"] == "13"


@pytest.mark.parametrize("request_text", [
    HANDSHAKE.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),  # no key
    HANDSHAKE.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),  # a key that is not 16 bytes
    HANDSHAKE.replace("Connection: Upgrade", "Connection: keep-alive"),  # no Connection: Upgrade
])
def test_malformed_handshake_is_4xx_not_101(peer, request_text):
    """4.2.1/4.2.2: a request that is not a valid opening handshake gets an HTTP error (400, or
    426 for a missing Connection: Upgrade), never 101."""
    status, _, _ = peer(request_text).read_head()
    assert status in (400, 426)


def test_not_http_at_all_is_closed(peer):
    c = peer(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert c.read_all()[:8] in (b"", b"HTTP/1.1")


def test_oversized_header_is_refused(peer):
    c = peer(HANDSHAKE.replace("Host: x", "Host: x\r\nX-Big: " + "b" * 20000))
    data = c.read_all()
    assert data == b"" or data.split()[1] in (b"400", b"431")


def test_discovery_document_on_the_relay_listener(peer):
    status, headers, _ = (c := peer("GET /.well-known/relayd HTTP/1.1\r\nHost: x\r\n\r\n")).read_head()
    assert status == 200 and headers["content-type"].startswith("application/json")
    body = json.loads(c.read_all())
    assert body["service"] == "relayd" and body["auth"] == [{"name": "open", "method": "none"}]
