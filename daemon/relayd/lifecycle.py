"""The lifecycle every component and auth method follows, written once.

Modelled on Caddy's modules (``Provision``/``Cleanup``): a plugin object is

1. **constructed** with ``(name, config, context)``: every attribute is made here, with no I/O
   (no socket, file or database is opened, no task is started);
2. **started** with ``await start()``: it opens what it needs and begins serving. It may raise:
   the configuration generation being built is then rejected;
3. **stopped** with ``await stop(drain_timeout)``: it stops accepting, lets work in flight
   finish for up to ``drain_timeout`` seconds (:func:`drain`), then releases everything.
   ``stop()`` is called once after every ``start()``, *whether start() succeeded or not*, so it
   must cope with a half-done start (attributes from step 1 are always there).

Only the runtime (``relayd.runtime``) knows where an object is: it keeps one :class:`State` per
component and shows it in ``relayctl status`` and ``relayd_component_up``. Plugins never write
a state of their own.
"""

from __future__ import annotations

import asyncio
import enum
import select
from collections.abc import Awaitable, Iterable
from typing import Protocol, runtime_checkable


class State(enum.Enum):
    CREATED = "created"  # constructed, start() not (yet) awaited
    SERVING = "serving"  # start() returned
    FAILED = "failed"  # start() raised; stop() follows
    DRAINING = "draining"  # stop() is running
    STOPPED = "stopped"  # stop() returned (or raised: it is not called again)


@runtime_checkable
class Lifecycle(Protocol):
    """What the runtime calls on a component or an auth method (nothing else)."""

    name: str

    async def start(self) -> None: ...

    async def stop(self, drain_timeout: float) -> None: ...


async def drain(finished: Awaitable[object], timeout: float) -> bool:
    """Wait for ``finished`` (work in flight coming to an end: connections idle, handlers
    done) for at most ``timeout`` seconds; True if it finished in time. The one way every
    built-in waits while draining: what is still running at the deadline is the caller's to
    cut off. ``timeout <= 0`` still lets ``finished`` run for one loop turn."""
    try:
        async with asyncio.timeout(max(timeout, 0.0)):
            await finished
    except TimeoutError:
        return False
    return True


def with_unread_bytes(transports: Iterable[asyncio.BaseTransport]) -> set[asyncio.BaseTransport]:
    """The transports whose socket holds bytes the event loop has not read yet.

    A drain's grace period ends on a timer, and an event loop runs the timers that are due
    before it polls for I/O: after a busy spell (a reload building the next generation on a
    loaded host), a connection whose first request arrived in time still looks idle when the
    grace ends. Asking the socket itself tells it from one that never sent anything."""
    poller = select.poll()
    by_fd: dict[int, asyncio.BaseTransport] = {}
    for transport in transports:
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        if fd >= 0:
            by_fd[fd] = transport
            poller.register(fd, select.POLLIN)
    return {by_fd[fd] for fd, events in poller.poll(0) if events & select.POLLIN}
