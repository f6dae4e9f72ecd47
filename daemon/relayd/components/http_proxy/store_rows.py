"""The store's row types and errors, shared by both backends, the read side and the migration
(a module of their own so that none of those imports store.py, which imports them)."""

from __future__ import annotations

import time
from typing import Any

COLUMNS = ("requests", "bytes_in", "bytes_out", "s1xx", "s2xx", "s3xx", "s4xx", "s5xx", "no_response")
NCOL = len(COLUMNS)


class StoreError(Exception):
    """The state database cannot be used (the message says why and what to do)."""


class StoreConflict(StoreError):
    """The name is taken (e.g. another node created the same service a moment ago)."""


class Inc:
    """A user incarnation as the event loop counts it; sgen/gen are None until resolved."""

    __slots__ = ("created", "endpoints", "gen", "service", "sgen", "user")

    def __init__(self, service: str, user: str, sgen: int | None, gen: int | None,
                 created: float | None = None, endpoints: set[str] | None = None) -> None:
        self.service = service
        self.user = user
        self.sgen = sgen
        self.gen = gen
        self.created = time.time() if created is None else created
        self.endpoints: set[str] = endpoints if endpoints is not None else set()

    def __repr__(self) -> str:
        return f"Inc({self.service!r}, {self.user!r}, sgen={self.sgen}, gen={self.gen})"


def row_dict(values: list[int] | tuple[int, ...]) -> dict[str, Any]:
    return {
        "requests": values[0], "bytesIn": values[1], "bytesOut": values[2],
        "statuses": {"1xx": values[3], "2xx": values[4], "3xx": values[5], "4xx": values[6],
                     "5xx": values[7], "none": values[8]},
    }
