"""Waiting for a condition in tests: poll it with a deadline (never a sleep as synchronisation)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], what: str, timeout: float = 20.0, interval: float = 0.02) -> T:
    """The first true value of predicate(), polled every interval seconds; AssertionError naming
    what was awaited once timeout seconds have passed without one."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)  # polling interval, not synchronisation


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """predicate()'s first true value, or its last value once timeout seconds have passed (for
    `assert wait_until(...), details`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)  # polling interval, not synchronisation
