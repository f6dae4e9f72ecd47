"""The threaded TLS pump: the splice pump's threads, with TLS on one or both connections.

Each direction is a thread blocking in ``recv_into`` and ``sendall`` on blocking sockets; the GIL
is released in the syscalls and in OpenSSL's encrypt/decrypt, so, like the splice pump, a
connection costs no event-loop wake-ups and connections use several cores. Measured against the
event-loop pump (uvloop's SSL transport) in bench/README.md.

Why memory BIOs (``SSLObject``) rather than ``SSLSocket``: OpenSSL does not allow one SSL object
to be used by two threads at once (a TLS 1.3 post-handshake message read by one thread puts the
object back "in handshake" under the other's ``SSL_write``), so every call on it holds `TlsEnd`'s
lock, and a thread must never block in a socket while holding it, which a socket BIO would.
The sockets are read and written outside the lock; the record layer's work under it is a
memcpy plus the cipher, over up to 1 MiB at a time.

Backpressure, counters and ``abort()`` are the splice pump's; the rate gate too, except that a
chunk's pause comes before it is written, so a transfer's last chunk does not leave early.

Ending: TLS cannot half-close (``SSL_shutdown``'s second step would read and drop the other
direction's records), so as with the event-loop pump an EOF either way is passed on
(close_notify towards a TLS peer, ``SHUT_WR`` towards a plain one) and then ends the whole
connection: the other direction's reader is woken with ``SHUT_RD``, and its thread finishes
writing what it holds first. An error from then on is the peer being done (its kernel resets
what arrives after it closed, our close_notify's answer), so it ends the connection without a
reset: what is still queued towards the other side is delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import cast

from relayd.pump.splice import MIN_RATED_CHUNK, Count, Gates, SplicePump

READ_SIZE = 1 << 20  # plaintext (and ciphertext) read at a time: 64 records per Python round
HANDSHAKE_READ = 1 << 16


class TlsEnd:
    """A TLS connection over a blocking socket, read by one thread while another writes."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self.sock = sock
        self.tls = tls
        self.incoming = incoming
        self.outgoing = outgoing
        self.state = threading.Lock()  # every call on `tls` and the BIOs
        self.sending = threading.Lock()  # records leave in the order they were sealed
        self.eof = False
        self._cipher: memoryview | None = None  # the reading thread's, allocated at its first read

    def recv_into(self, view: memoryview) -> int:
        """Plaintext into `view`: as much as the records already received hold, else waits for
        more; 0 once the peer closed (close_notify, or a bare TCP close)."""
        while True:
            with self.state:
                got = self._decrypt_into(view)
                out = self._take_output()
            if out is not None:  # rare: an alert or a key update answer produced by reading
                self._send(out)
            if got or self.eof:
                return got
            if self._cipher is None:
                self._cipher = memoryview(bytearray(READ_SIZE))
            n = self.sock.recv_into(self._cipher)
            if not n:
                self.eof = True
                return 0
            with self.state:
                self.incoming.write(self._cipher[:n])

    def _decrypt_into(self, view: memoryview) -> int:
        got, room = 0, len(view)
        try:
            while got < room:
                # with a buffer, read() returns a count (typeshed says bytes either way)
                n = cast(int, self.tls.read(room - got, view[got:]))
                if not n:
                    self.eof = True
                    break
                got += n
        except ssl.SSLWantReadError:
            pass  # every complete record received is decrypted
        except ssl.SSLZeroReturnError:
            self.eof = True
        return got

    def sendall(self, data: memoryview) -> None:
        """Seal `data` and send it all (blocks while the peer does not read: backpressure)."""
        with self.state:
            self.tls.write(data)
            out = self.outgoing.read()
            self.sending.acquire()  # before letting go of `state`: keeps the records in order
        try:
            self.sock.sendall(out)
        finally:
            self.sending.release()

    def close_notify(self) -> None:
        """Tell the peer no more data comes (then TCP's FIN): the end of the connection."""
        with self.state:
            with contextlib.suppress(ssl.SSLError):  # wants the peer's close_notify: not awaited
                self.tls.unwrap()
            out = self._take_output()
        if out is not None:
            self._send(out)
        self.sock.shutdown(socket.SHUT_WR)

    def _take_output(self) -> bytes | None:
        """Under `state`: what the record layer produced, with `sending` held if anything."""
        if not self.outgoing.pending:
            return None
        out = self.outgoing.read()
        self.sending.acquire()
        return out

    def _send(self, out: bytes) -> None:
        try:
            self.sock.sendall(out)
        finally:
            self.sending.release()


async def handshake(loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext, *,
                    server_side: bool, server_hostname: str | None = None) -> TlsEnd:
    """The TLS handshake on `sock` (non-blocking) on the event loop: no thread is spent on a
    peer that has not authenticated. Raises `ssl.SSLError` or `OSError` (after sending the
    alert, if any)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
    while True:
        try:
            tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLError:
            if outgoing.pending:  # the alert saying why, best effort
                with contextlib.suppress(OSError):
                    sock.send(outgoing.read())
            raise
        if outgoing.pending:
            await loop.sock_sendall(sock, outgoing.read())
        if done:
            return TlsEnd(sock, tls, incoming, outgoing)
        data = await loop.sock_recv(sock, HANDSHAKE_READ)
        if not data:
            raise ConnectionResetError("the peer closed the connection during the TLS handshake")
        incoming.write(data)


class TlsPump(SplicePump):
    """Forwards between `first` and `second`, either a plain TCP socket or a `TlsEnd` (the pump
    owns both). Same interface as `SplicePump`."""

    def __init__(self, first: socket.socket | TlsEnd, second: socket.socket | TlsEnd, *,
                 loop: asyncio.AbstractEventLoop, gates: Gates = (None, None), count: Count | None = None,
                 on_closed: Callable[[], None] | None = None, name: str = "") -> None:
        self.tls = (first if isinstance(first, TlsEnd) else None,
                    second if isinstance(second, TlsEnd) else None)
        super().__init__(_raw(first), _raw(second), loop=loop, gates=gates, count=count,
                         on_closed=on_closed, name=name)
        self._closing = threading.Event()  # an EOF was passed on: the connection is ending

    def _broken(self) -> None:
        if not self._closing.is_set():
            self.abort()
            return
        # Ending already: the peer that had our close_notify may have closed and reset what
        # came after it (its own close_notify). No reset here: the bytes queued towards the
        # other side are still delivered, then FIN.
        self._stop.set()
        with self._lock:
            if not self._closed:
                for sock in self.socks:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def _copy(self, forward: bool, src: socket.socket, dst: socket.socket) -> None:
        tls_src, tls_dst = self.tls if forward else self.tls[::-1]
        bucket = self.gates[0 if forward else 1]
        # rated: reads no larger than the burst, so a pause follows every burst's worth
        size = READ_SIZE if bucket is None else max(MIN_RATED_CHUNK, min(READ_SIZE, int(bucket.burst)))
        view = memoryview(bytearray(size))
        read = src.recv_into if tls_src is None else tls_src.recv_into
        write = dst.sendall if tls_dst is None else tls_dst.sendall
        stop, count = self._stop, self.count
        while not stop.is_set():
            n = read(view)
            if not n:
                if not stop.is_set():
                    self._closing.set()
                    if tls_dst is None:
                        dst.shutdown(socket.SHUT_WR)
                    else:
                        tls_dst.close_notify()
                    # TLS cannot half-close: wake the other direction's reader, it ends too
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_RD)
                return
            if bucket is not None:  # paid before the chunk leaves
                delay = bucket.consume(n, time.monotonic())
                if delay > 0 and stop.wait(delay):
                    return
            write(view[:n])
            if count is not None:
                count(forward, n)


def _raw(end: socket.socket | TlsEnd) -> socket.socket:
    return end.sock if isinstance(end, TlsEnd) else end
