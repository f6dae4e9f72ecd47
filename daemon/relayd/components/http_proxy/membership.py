"""Which user is a member of which service: the one owner of membership.

The state database (through ``Counters``) keeps memberships durably; this object keeps them
in memory, for the request path and the management API, and changes both together. The
request path asks ``(service, user) in pairs``: a set lookup, as cheap as it gets; ``pairs``
is one set for the component's life (changed in place, never replaced), so ``Core.members``
can hold it. Every change makes the auth methods' verdicts be asked again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .counters import Counters


class Membership:
    def __init__(self, counters: Counters, changed: Callable[[], None]) -> None:
        self.counters = counters
        self.pairs: set[tuple[str, str]] = set()  # (service, user): read on every request
        self._joined: dict[tuple[str, str], float] = {}  # (service, user) -> when it joined
        self._changed = changed  # forgets cached credentials

    # -- questions -----------------------------------------------------------------------------

    def is_member(self, service: str, user: str) -> bool:
        return (service, user) in self.pairs

    def users_of(self, service: str) -> list[str]:
        return sorted(u for s, u in self.pairs if s == service)

    def in_any_service(self, user: str) -> bool:
        return any(u == user for _, u in self.pairs)

    def joined(self, service: str, user: str) -> float:
        """When the current membership began (time.time()), 0.0 if unknown."""
        return self._joined.get((service, user), 0.0)

    # -- changes: the database first, then memory ------------------------------------------------

    async def add(self, service: str, user: str) -> float:
        """A new membership (a new incarnation of the user's counters); when it began."""
        created = await self.counters.add_member(service, user)
        self.pairs.add((service, user))
        self._joined[(service, user)] = created
        self._changed()
        return created

    async def remove(self, service: str, user: str) -> None:
        await self.counters.remove_member(service, user)
        self.pairs.discard((service, user))
        self._joined.pop((service, user), None)
        self._changed()

    def remove_service(self, service: str) -> None:
        """The service is gone (its database rows end with it): so are its members."""
        for key in [k for k in self._joined if k[0] == service]:
            del self._joined[key]
        for key in [k for k in self.pairs if k[0] == service]:
            self.pairs.discard(key)

    def replace_all(self, members: dict[tuple[str, str], float]) -> bool:
        """Memory becomes ``members`` (a read of the store: ``Store.members()``); True if that
        changed who may use what."""
        self._joined = dict(members)
        if self.pairs == members.keys():
            return False
        self.pairs.clear()
        self.pairs.update(members)
        self._changed()
        return True
