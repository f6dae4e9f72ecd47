"""Zero-copy forwarding of large fixed-length response bodies with splice(2).

For a plain-TCP (or unix) upstream and client, a body of known length goes socket -> pipe ->
socket inside the kernel: no copy into Python, no bytes objects, no transport buffers. The
transports stay in charge of their sockets otherwise: the upstream transport's reading is paused
for the duration, the client transport has nothing pending (checked before starting) and keeps
reading (so a client that goes away is noticed); the splicer works on dup'd descriptors, which
the event loop lets us watch beside the transports'. When the body is done, the transports take
over again: the upstream connection can be pooled, the client can send its next request.
"""

from __future__ import annotations

import fcntl
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .exchange import Exchange
    from .upstream import UpstreamClient, UpstreamConnection

log = logging.getLogger("relayd.http_proxy")
AVAILABLE = hasattr(os, "splice")
MIN_BODY = 256 * 1024  # below this the Python path is as fast (setting up costs ~4 syscalls)
PIPE_SIZE = 1 << 20
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class Splicer:
    def __init__(self, client: UpstreamClient, upstream: UpstreamConnection, ex: Exchange,
                 length: int) -> None:
        self.client = client
        self.upstream = upstream
        self.ex = ex
        self.loop = client.loop
        self.to_read = length
        self.in_pipe = 0
        self.reading = self.writing = False
        self.closed = False
        # Both connected: the shell splices only the body of an exchange in progress.
        assert upstream.transport is not None and client.transport is not None
        src = upstream.transport.get_extra_info("socket").fileno()
        dst = client.transport.get_extra_info("socket").fileno()
        opened: list[int] = []
        try:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            opened += [self.pipe_r, self.pipe_w]
            try:
                fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # the default 64 KiB pipe still works, with more round trips
            self.capacity = fcntl.fcntl(self.pipe_w, fcntl.F_GETPIPE_SZ)
            self.src = os.dup(src)
            opened.append(self.src)
            self.dst = os.dup(dst)
        except OSError:
            for fd in opened:
                os.close(fd)
            raise
        upstream.transport.pause_reading()
        self._read_on()

    def _read_on(self) -> None:
        if not self.reading:
            self.loop.add_reader(self.src, self._readable)
            self.reading = True

    def _read_off(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src)
            self.reading = False

    def _readable(self) -> None:
        room = min(self.to_read, self.capacity - self.in_pipe)
        if room <= 0:
            self._read_off()
            return
        try:
            n = os.splice(self.src, self.pipe_w, room, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(f"upstream: {exc.strerror}")
            return
        if n == 0:
            self._fail("upstream closed the connection in the middle of the body")
            return
        self.to_read -= n
        self.in_pipe += n
        self.ex.last_io = self.loop.time()
        self._drain()

    def _drain(self) -> None:
        while self.in_pipe:
            try:
                n = os.splice(self.pipe_r, self.dst, self.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                # The client is slower: stop reading the upstream until its socket drains.
                if not self.writing:
                    self.loop.add_writer(self.dst, self._drain)
                    self.writing = True
                self._read_off()
                return
            except OSError as exc:
                self._fail(f"client: {exc.strerror}")
                return
            self.in_pipe -= n
            self.ex.bytes_out += n
        if self.writing:
            self.loop.remove_writer(self.dst)
            self.writing = False
            self.ex.last_io = self.loop.time()  # upstream silence counts from when we read again
        if self.to_read == 0:
            self._done()
        else:
            self._read_on()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._read_off()
        if self.writing:
            self.loop.remove_writer(self.dst)
            self.writing = False
        for fd in (self.src, self.dst, self.pipe_r, self.pipe_w):
            os.close(fd)
        self.ex.splicer = None

    def cancel(self) -> None:
        """The exchange ended otherwise (client gone, timeout): just release everything."""
        self._close()

    def _done(self) -> None:
        self._close()
        transport = self.upstream.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
        self.client.state.splice_done(self.ex)  # type: ignore[union-attr]

    def _fail(self, why: str) -> None:
        log.info("%s %s: body cut: %s", getattr(self.ex.route, "name", "?"), self.ex.target[:200], why)
        self._close()
        self.client.state.abort(self.ex)  # type: ignore[union-attr]
