"""How many connections the open file limit (RLIMIT_NOFILE) serves: raising the soft limit, and
the default max_connections of every listener (relayd.accept_gate enforces them)."""

from __future__ import annotations

import logging
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger("relayd.listeners")

# The default max_connections; see plan_limits().
RESERVED_FDS = 64  # relayd itself: stdio, epoll and event fds, listening sockets and their dups,
#                    the control socket and its clients, state databases (SQLite + WAL), logs
HEADROOM_DIVISOR = 8  # plus nofile/8: idle upstream pools, splice pipes, auth HTTP clients
FDS_PER_CONNECTION = 2  # an http_proxy client and its upstream (splice falls back to copying
#                         when no descriptors are left for its pipe)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as nginx and systemd advise; (before, now).

    systemd's default soft limit is 1024 (for select()-based programs); relayd uses epoll and
    may use up to the hard limit (LimitNOFILE= in relayd.service sets both).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or hard == resource.RLIM_INFINITY:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open file limit (RLIMIT_NOFILE) from %d to %d: %s", soft, hard, exc)
        return soft, soft
    return soft, hard


def nofile_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class LimitPlan:
    """max_connections of every listener of one configuration, with how they were derived."""

    nofile: int
    reserved: int  # descriptors kept for relayd itself
    capacity: int  # connections that the rest serves, at FDS_PER_CONNECTION each
    limits: dict[str, int]
    default: int | None  # for listeners without max_connections (None: every one sets it)
    explicit: dict[str, int] = field(default_factory=dict)

    def warning(self) -> str | None:
        """A message when explicit max_connections add up to more than the file limit serves."""
        total = sum(self.explicit.values())
        if not self.explicit or total <= self.capacity:
            return None
        listed = ", ".join(f"{name} ({value})" for name, value in sorted(self.explicit.items()))
        return (f"max_connections of listener(s) {listed} add up to {total} connections, more than "
                f"the open file limit (RLIMIT_NOFILE {self.nofile}) serves: about {self.capacity} at "
                f"{FDS_PER_CONNECTION} descriptors each, after {self.reserved} kept for relayd itself. "
                "Near that many connections accept() and upstream connections fail with EMFILE (and "
                "the control socket and other listeners with them); lower max_connections or raise "
                "LimitNOFILE= in relayd.service")


def plan_limits(explicit: Mapping[str, int | None], nofile: int) -> LimitPlan:
    """The max_connections of each listener, for a soft RLIMIT_NOFILE of `nofile`.

    reserved = RESERVED_FDS + nofile // HEADROOM_DIVISOR     (64 + 1/8 of the limit)
    capacity = (nofile - reserved) // FDS_PER_CONNECTION      (2 descriptors per connection)
    default  = (capacity - sum of explicit max_connections) // listeners without one, at least 1

    E.g. 65536 (LimitNOFILE= of relayd.service) with two listeners: 14320 each; 1024: 208 each.
    Every listener gets a share, so one at its limit leaves the others (the status listener,
    the control socket) their descriptors.
    """
    reserved = RESERVED_FDS + nofile // HEADROOM_DIVISOR
    capacity = max(0, nofile - reserved) // FDS_PER_CONNECTION
    fixed = {name: value for name, value in explicit.items() if value is not None}
    derived = [name for name, value in explicit.items() if value is None]
    share = max(1, (capacity - sum(fixed.values())) // len(derived)) if derived else 0
    limits = {name: fixed.get(name, share) for name in explicit}
    return LimitPlan(nofile, reserved, capacity, limits, share if derived else None, fixed)
