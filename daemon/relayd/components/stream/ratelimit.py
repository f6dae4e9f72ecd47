"""A token bucket: the time source is the caller's, so it is deterministic to test."""

from __future__ import annotations


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

    def consume(self, n: int, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        return -self.tokens / self.rate if self.tokens < 0 else 0.0
