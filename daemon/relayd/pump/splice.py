"""The splice pump: two connected TCP sockets joined in the kernel, one thread per direction.

Each direction is a thread looping ``splice(src -> pipe)`` then ``splice(pipe -> dst)`` on
blocking sockets. The bytes never enter Python, and the GIL is released inside both syscalls,
so connections (and sessions) run on as many cores as the machine has; what Python does per
chunk (up to a pipe's worth, 1 MiB) is a few bytecodes.

Why threads rather than the event loop's readiness callbacks: on the loop every chunk costs two
wake-ups and the callbacks hold the GIL, so all sessions share one core; why not worker
processes: a thread needs no descriptor passing, shares the counters and the rate bucket
directly, and the work is in the kernel anyway (measured in bench/README.md).

Backpressure is the blocking itself: while `dst` cannot take more, the thread waits in the
second splice and does not read `src`; what is in flight is bounded by the pipe and the
kernel's socket buffers, none of it in relayd's heap. The rate gate (a shared `TokenBucket`)
is consulted after each chunk; when in debt the thread waits, and reads chunks of at most the
bucket's burst, so the average stays within a few percent of the rate.

Closing: an EOF read one way is forwarded as ``shutdown(SHUT_WR)`` the other way (half-close);
an error either way (reset, broken pipe) tears both down. ``abort()`` (from any thread) wakes
both threads with ``shutdown(SHUT_RDWR)`` (the only safe way to interrupt a blocked syscall:
closing a descriptor another thread is blocked on could hand its number to a new file) and
makes the close a reset. The last thread out closes the sockets and tells the owner on its
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

from relayd.pump.gate import TokenBucket

log = logging.getLogger("relayd.pump")
SPLICE_AVAILABLE = hasattr(os, "splice")
PIPE_SIZE = 1 << 20  # as large as an unprivileged process may set by default (pipe-max-size)
MIN_RATED_CHUNK = 16384
_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
_LINGER_RESET = struct.pack("ii", 1, 0)

Gates = tuple[TokenBucket | None, TokenBucket | None]
Count = Callable[[bool, int], None]  # (forward, nbytes); called from the pump's threads


class SplicePump:
    """Forwards between connected TCP sockets `first` and `second` (the pump owns both)."""

    def __init__(self, first: socket.socket, second: socket.socket, *, loop: asyncio.AbstractEventLoop,
                 gates: Gates = (None, None), count: Count | None = None,
                 on_closed: Callable[[], None] | None = None, name: str = "",
                 pipe_size: int = PIPE_SIZE) -> None:
        self.socks = (first, second)
        self.loop = loop
        self.gates = gates
        self.count = count
        self.on_closed = on_closed
        self.name = name
        self.pipe_size = pipe_size
        self._stop = threading.Event()
        self._lock = threading.Lock()  # orders abort()'s shutdowns before the final close
        self._running = 0
        self._closed = False
        for sock in self.socks:
            sock.setblocking(True)
            with contextlib.suppress(OSError):  # like asyncio transports: no Nagle delay
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def start(self) -> None:
        first, second = self.socks
        self._running = 2
        for forward, src, dst in ((True, first, second), (False, second, first)):
            threading.Thread(target=self._run, args=(forward, src, dst), daemon=True,
                             name=f"splice {self.name} {'>' if forward else '<'}").start()

    def abort(self) -> None:
        """Drop both connections now (safe from any thread, any number of times)."""
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _broken(self) -> None:
        """A direction failed (reset, broken pipe): one way broken, the connection is."""
        self.abort()

    # -- the threads ---------------------------------------------------------------------------

    def _run(self, forward: bool, src: socket.socket, dst: socket.socket) -> None:
        try:
            self._copy(forward, src, dst)
        except OSError as exc:
            if not self._stop.is_set():
                log.debug("splice %s %s: %s", self.name, ">" if forward else "<", exc)
            self._broken()
        except BaseException:
            self.abort()
            raise
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
                if last:
                    self._closed = True
                    for sock in self.socks:
                        sock.close()
            if last and self.on_closed is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                    self.loop.call_soon_threadsafe(self.on_closed)

    def _copy(self, forward: bool, src: socket.socket, dst: socket.socket) -> None:
        pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, self.pipe_size)
            except OSError:
                pass  # over the user's pipe quota: the default 64 KiB pipe works, with more calls
            capacity = fcntl.fcntl(pipe_w, fcntl.F_GETPIPE_SZ)
            bucket = self.gates[0 if forward else 1]
            # rated: chunks no larger than the burst, so a pause follows every burst's worth
            chunk = capacity if bucket is None else max(MIN_RATED_CHUNK, min(capacity, int(bucket.burst)))
            sfd, dfd = src.fileno(), dst.fileno()
            stop, count = self._stop, self.count
            while not stop.is_set():
                n = os.splice(sfd, pipe_w, chunk, flags=_MOVE)
                if n == 0:  # EOF (or abort's shutdown): pass the half-close on
                    if not stop.is_set():
                        dst.shutdown(socket.SHUT_WR)
                    return
                # Counted before the bytes leave the pipe: once the receiver has them, the
                # counters (and a release's access line) include them. A failed write below
                # ends the connection; only what was in the pipe then counts undelivered.
                if count is not None:
                    count(forward, n)
                left = n
                while left:
                    left -= os.splice(pipe_r, dfd, left, flags=_MOVE)
                if bucket is not None:
                    delay = bucket.consume(n, time.monotonic())
                    if delay > 0:
                        stop.wait(delay)
        finally:
            os.close(pipe_r)
            os.close(pipe_w)
