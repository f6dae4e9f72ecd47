"""The data-plane port pool of one stream component.

A port is reserved by binding it and listening on it at once: that both checks it is free when
it is handed out and keeps anyone else from taking it until the session ends (a socket that is
only bound could be bound again by another SO_REUSEADDR user). Connections arriving before
``update`` starts the forwarder wait in the kernel backlog.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

from grpclib.const import Status

from relayd.components.stream.model import StreamError


class PortPool:
    def __init__(self, host: str, first: int, last: int) -> None:
        self.host = host
        self.first = first
        self.last = last
        self.in_use: set[int] = set()
        self._next = first  # rotate, so a just-released port is not reused at once

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def free(self) -> int:
        """Ports not held by a session (some may be taken by other processes)."""
        return self.size - len(self.in_use)

    def reserve(self, count: int) -> list[socket.socket]:
        """`count` bound sockets on free ports; RESOURCE_EXHAUSTED if the range has fewer."""
        got: list[socket.socket] = []
        port = self._next
        for _ in range(self.size):
            if len(got) == count:
                break
            if port not in self.in_use:
                sock = self._try_bind(port)
                if sock is not None:
                    got.append(sock)
                    self.in_use.add(port)
            port = self.first if port >= self.last else port + 1
        self._next = port
        if len(got) < count:
            self.release([s.getsockname()[1] for s in got], got)
            raise StreamError(
                Status.RESOURCE_EXHAUSTED,
                f"only {len(got)} free ports in {self.first}-{self.last}, {count} requested",
            )
        return got

    def release(self, ports: list[int], socks: Sequence[socket.socket] = ()) -> None:
        """Return `ports` to the pool, closing `socks` (sockets no server took over)."""
        for sock in socks:
            sock.close()
        self.in_use.difference_update(ports)

    def _try_bind(self, port: int, backlog: int = 1024) -> socket.socket | None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # SO_REUSEADDR only lets us reuse a port whose old connections linger in TIME_WAIT;
            # a port someone listens on still fails with EADDRINUSE.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and self.host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((self.host, port))
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return None
            raise StreamError(Status.INTERNAL, f"cannot bind {self.host}:{port}: {exc.strerror}") from None
        sock.setblocking(False)
        return sock
