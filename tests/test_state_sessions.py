"""Browser sessions (globus_login) on PostgreSQL: a session made on node A is valid on node B,
and ending it on B ends it on A; the login flow is plain HTTP following redirects, against the
local fake Globus Auth, with one cookie jar (cookies are per host, not per port)."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from relayd.testing import free_port
from test_cluster_billing import BOUND
from test_http_proxy import Upstream
from test_http_proxy_globus_login import _browse, _config


async def _poll(session: aiohttp.ClientSession, url: str, want: int, what: str) -> float:
    started = time.monotonic()
    deadline = started + BOUND + 15
    while True:
        async with session.get(url, allow_redirects=False) as r:
            if r.status == want:
                return time.monotonic() - started
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)  # polling interval


def test_a_browser_session_made_on_node_a_is_valid_on_node_b(relayd, fake_globus, tls_files, pg_url, tmp_path):
    cert, key, client_context = tls_files
    fake_globus.login_identity.update(sub="11111111-2222-3333-4444-555555555555",
                                      username="alice@example.org", email="alice@example.org", name="Alice")
    ports = [free_port(), free_port()]
    with Upstream() as up:
        for i, port in enumerate(ports):
            relayd(f'[state]\nurl = "{pg_url}"\n[cluster]\nnode = "n{i}"\n'
                   + _config(0, port, cert, key, up.url, fake_globus),
                   env={"RELAYD_STATE_DIR": str(tmp_path / f"state{i}")})
        a, b = (f"https://127.0.0.1:{p}" for p in ports)

        async def steps(session: aiohttp.ClientSession):
            async with session.get(b + "/app/x", allow_redirects=False) as r:
                assert r.status == 302  # no session yet
            async with session.get(a + "/app/page") as r:  # log in on node a
                assert r.status == 200, await r.text()
                assert any("/v2/oauth2/authorize" in str(h.url) for h in r.history)
            elapsed = await _poll(session, b + "/app/x", 200, "the session valid on node b")
            print(f"session made on node a valid on node b after {elapsed:.3f}s")
            old = next(c for c in session.cookie_jar if c.key == "relayd_session").value
            async with session.get(b + "/.relayd/logout") as r:  # sign out on node b
                assert r.status == 200
            # The old cookie, replayed to node a, no longer opens a session there.
            session.cookie_jar.update_cookies({"relayd_session": old}, response_url=aiohttp.client.URL(a))
            ended = await _poll(session, a + "/app/x", 302, "the session ended on node a")
            print(f"session ended on node b refused by node a after {ended:.3f}s")
            return max(elapsed, ended)

        elapsed = asyncio.run(_browse(a, client_context, steps))
        assert elapsed < BOUND + 5


def test_a_session_made_while_postgres_is_down_survives_its_return(relayd, fake_globus, tls_files,
                                                                     private_pg_server, tmp_path):
    """Sign-in works while PostgreSQL is away (the session is kept in memory and its write is
    retried); when the database is back the session is written, stays valid here and becomes
    valid on a node started afterwards."""
    import psycopg

    cert, key, client_context = tls_files
    url = private_pg_server.new_database()
    ports = [free_port(), free_port()]
    with Upstream() as up:
        def node(i: int):
            return relayd(f'[state]\nurl = "{url}"\n[cluster]\nnode = "n{i}"\n'
                          + _config(0, ports[i], cert, key, up.url, fake_globus),
                          env={"RELAYD_STATE_DIR": str(tmp_path / f"state{i}")})

        node(0)
        a, b = (f"https://127.0.0.1:{p}" for p in ports)

        def rows() -> int:
            with psycopg.connect(url) as conn:
                return conn.execute('SELECT count(*) FROM "globus_login:browser".sessions').fetchone()[0]

        async def steps(session: aiohttp.ClientSession):
            private_pg_server.stop()
            async with session.get(a + "/app/page") as r:  # sign in while PostgreSQL is down
                assert r.status == 200, await r.text()
            async with session.get(a + "/app/x", allow_redirects=False) as r:
                assert r.status == 200
            private_pg_server.start()
            deadline = time.monotonic() + BOUND + 30
            while await asyncio.to_thread(rows) != 1:
                assert time.monotonic() < deadline, "the session was not written after PostgreSQL returned"
                await asyncio.sleep(0.05)  # polling interval
            async with session.get(a + "/app/x", allow_redirects=False) as r:
                assert r.status == 200  # the reconnect's re-read did not end it
            await asyncio.to_thread(node, 1)
            async with session.get(b + "/app/x", allow_redirects=False) as r:
                assert r.status == 200  # valid on a node started afterwards

        asyncio.run(_browse(a, client_context, steps))
