"""The read side of the http_proxy state store (both backends run these same queries): lifetime
totals, current incarnations with their counters, every incarnation's history."""

from __future__ import annotations

from typing import Any

from .store_rows import COLUMNS, NCOL, Inc


def _current(service: str | None, user: str | None) -> tuple[str, list[str]]:
    """A WITH clause: cur_u = the current incarnation of every user (the latest one in the
    latest incarnation of its service), restricted to ``service``/``user`` inside (indexed)."""
    args: list[str] = []
    s_where = u_where = ""
    if service is not None:
        s_where = " WHERE service = ?"
        args.append(service)
    if user is not None:
        u_where = " WHERE u.username = ?"
        args.append(user)
    return (f"WITH cur_s AS (SELECT service, max(sgen) AS sgen FROM service_incarnations{s_where} GROUP BY service), "
            f"cur_u AS (SELECT u.service, u.username, max(u.gen) AS gen FROM user_incarnations u "
            f"JOIN cur_s s ON u.service = s.service AND u.sgen = s.sgen{u_where} "
            f"GROUP BY u.service, u.username) "), args


class StoreReads:
    db: Any  # sqlite3.Connection or relayd.state.pg.Db: the same calls

    def totals(self) -> tuple[dict[str, list[int]], dict[str, int]]:
        """Lifetime totals per service name (all incarnations) and requests refused by auth."""
        rows = self.db.execute(f"SELECT service, {', '.join(COLUMNS)}, rejected FROM service_totals")
        totals, rejected = {}, {}
        for row in rows:
            totals[row[0]] = list(row[1:1 + NCOL])
            rejected[row[0]] = row[1 + NCOL]
        return totals, rejected

    def current_incarnations(self) -> list[tuple[Inc, bool]]:
        """The current incarnation of every user (with its endpoint keys) and whether it is open."""
        db = self.db
        with_clause, _ = _current(None, None)
        incs: dict[tuple[str, str, int], tuple[Inc, bool]] = {}
        for service, user, gen, sgen, created, deleted in db.execute(
                with_clause + "SELECT u.service, u.username, u.gen, u.sgen, u.created_at, u.deleted_at "
                "FROM user_incarnations u JOIN cur_u USING (service, username, gen)"):
            incs[(service, user, gen)] = (Inc(service, user, sgen, gen, created), deleted is None)
        for service, user, gen, endpoint in db.execute(
                with_clause + "SELECT c.service, c.username, c.gen, c.endpoint FROM counters c "
                "JOIN cur_u USING (service, username, gen) WHERE c.endpoint != ''"):
            entry = incs.get((service, user, gen))
            if entry is not None:
                entry[0].endpoints.add(endpoint)
        return list(incs.values())

    def current(self, service: str | None = None, user: str | None = None,
                endpoints: bool = False) -> list[tuple]:
        """Rows of the current incarnations: (service, user, sgen, gen, member, created, deleted,
        endpoint, *counters); with endpoints=False one row per user (zeros if never counted)."""
        with_clause, args = _current(service, user)
        cols = ", ".join(f"coalesce(c.{c}, 0)" for c in COLUMNS)
        if endpoints:
            join = "JOIN counters c ON c.service = u.service AND c.username = u.username AND c.gen = u.gen " \
                   "AND c.endpoint != ''"
            select = "c.endpoint"
        else:
            join = "LEFT JOIN counters c ON c.service = u.service AND c.username = u.username " \
                   "AND c.gen = u.gen AND c.endpoint = ''"
            select = "''"
        query = (with_clause + f"SELECT u.service, u.username, u.sgen, u.gen, u.member, u.created_at, "
                 f"u.deleted_at, {select}, {cols} FROM user_incarnations u JOIN cur_u USING (service, username, gen) "
                 f"{join} ORDER BY 1, 2, 8")
        return list(self.db.execute(query, args))

    def service_incarnations(self, service: str | None = None) -> list[tuple]:
        """(service, sgen, origin, created, deleted, rejected, note), oldest first."""
        query = "SELECT service, sgen, origin, created_at, deleted_at, rejected, note FROM service_incarnations"
        args: list[str] = []
        if service is not None:
            query += " WHERE service = ?"
            args.append(service)
        return list(self.db.execute(query + " ORDER BY service, sgen", args))

    def history(self, service: str | None = None, user: str | None = None,
                endpoints: bool = False) -> list[tuple]:
        """Every user incarnation: (service, user, sgen, gen, member, created, deleted, note,
        endpoint, *counters); endpoint '' rows (totals, zeros if never counted) unless endpoints."""
        where, args = [], []
        if service is not None:
            where.append("u.service = ?")
            args.append(service)
        if user is not None:
            where.append("u.username = ?")
            args.append(user)
        cols = ", ".join(f"coalesce(c.{c}, 0)" for c in COLUMNS)
        cond = "c.endpoint != ''" if endpoints else "c.endpoint = ''"
        kind = "JOIN" if endpoints else "LEFT JOIN"
        query = (f"SELECT u.service, u.username, u.sgen, u.gen, u.member, u.created_at, u.deleted_at, u.note, "
                 f"{'c.endpoint' if endpoints else chr(39) * 2}, {cols} FROM user_incarnations u {kind} counters c "
                 f"ON c.service = u.service AND c.username = u.username AND c.gen = u.gen AND {cond}"
                 + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY 1, 3, 2, 4, 9")
        return list(self.db.execute(query, args))

    def known_user(self, service: str, user: str) -> bool:
        """Whether the user has an incarnation in the current incarnation of the service."""
        with_clause, args = _current(service, user)
        return self.db.execute(with_clause + "SELECT 1 FROM cur_u", args).fetchone() is not None
