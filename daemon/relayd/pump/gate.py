"""A token bucket: the time source is the caller's, so it is deterministic to test.

It may be shared by several connections (a session's rate is summed over them) whose pumps run
in different threads (splice), so `consume` takes a lock; uncontended it costs well under a
microsecond, once per chunk of up to a pipe's worth of bytes.
"""

from __future__ import annotations

import threading


class TokenBucket:
    """`rate` bytes/s on average, bursts up to `burst` bytes.

    ``consume`` always accepts the bytes (they were already read) and returns how long the
    reader must pause so the average stays at `rate`: the bucket may go into debt.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now
        self._lock = threading.Lock()

    def consume(self, n: int, now: float) -> float:
        with self._lock:
            # max(): two clocks reading CLOCK_MONOTONIC at different moments (the event loop's
            # cached time, a thread's fresh one) must not give back tokens for negative time.
            elapsed = max(0.0, now - self.last)
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.last = max(now, self.last)
            self.tokens -= n
            return -self.tokens / self.rate if self.tokens < 0 else 0.0
