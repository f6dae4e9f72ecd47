"""relayctl import-state: a single node's SQLite state moves into PostgreSQL with every count,
once; relayctl db migrate; relayd then serves the same users and reports the same totals."""

from __future__ import annotations

import os
import subprocess

import psycopg

import configs
from polling import wait_for
from relayd.testing import BIN, free_port
from test_cluster_billing import USERS, pg_totals
from test_http_proxy import Upstream, basic, request
from test_http_proxy_billing import Api, db_total


def config(port: int, mgmt: int, upstream: str, url: str | None) -> str:
    return configs.config(configs.state(url) if url else "", configs.auth(users="basic"),
                          configs.billing_proxy(port, mgmt), configs.acme_service(upstream, members_only=True))


def relayctl(config_dir, state_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "relayctl"), "--config", str(config_dir), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "RELAYD_STATE_DIR": str(state_dir)},
                          check=False)


def test_import_state_moves_every_count_once(relayd, tmp_path, pg_url):
    port, mgmt = free_port(), free_port()
    state_dir = tmp_path / "state"
    with Upstream() as up:
        daemon = relayd(config(port, mgmt, up.url, None))
        api = Api(mgmt)
        made = {}
        for user, password in USERS.items():
            assert api("POST", "/services/acme/users", {"username": user, "password": password})[0] == 200
            made[user] = 0
        for i in range(30):
            user = "alice" if i % 3 else "bob"
            assert request(port, "GET", f"/acme/e{i % 4}", basic(user, USERS[user]))[0] == 200
            made[user] += 1
        # alice is created again: a second incarnation, counted from 0; history keeps the first.
        assert api("DELETE", "/services/acme/users/alice") == (200, None)
        assert api("POST", "/services/acme/users", {"username": "alice", "password": USERS["alice"]})[0] == 200
        for _ in range(5):
            assert request(port, "GET", "/acme/again", basic("alice", USERS["alice"]))[0] == 200
        made["alice"] += 5
        assert daemon.stop() == 0
        sqlite_total = db_total(state_dir / "http_proxy-web.sqlite3")
        assert sqlite_total == sum(made.values())

        pg_config = tmp_path / "etc-pg"
        pg_config.mkdir()
        (pg_config / "relayd.toml").write_text(config(port, mgmt, up.url, pg_url))
        migrated = relayctl(pg_config, state_dir, "db", "migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert "http_proxy web: created schema" in migrated.stdout
        imported = relayctl(pg_config, state_dir, "import-state")
        assert imported.returncode == 0, imported.stdout + imported.stderr
        assert "totals equal" in imported.stdout and "2 of 2 users copied" in imported.stdout
        assert pg_totals(pg_url) == made
        again = relayctl(pg_config, state_dir, "import-state")
        assert again.returncode == 1 and "already imported" in again.stderr, again.stdout + again.stderr
        assert pg_totals(pg_url) == made
        assert relayctl(pg_config, state_dir, "db", "migrate").returncode == 0  # idempotent

        # A node on PostgreSQL now admits the imported users and reports the imported usage.
        port, mgmt = free_port(), free_port()
        api = Api(mgmt)
        node = relayd(config(port, mgmt, up.url, pg_url), env={"RELAYD_STATE_DIR": str(tmp_path / "state-pg")})
        assert request(port, "GET", "/acme/x", basic("bob", USERS["bob"]))[0] == 200
        status, body = api("GET", "/services/acme/users/alice/stats")
        assert status == 200 and body["requests"] == 5, body  # the current incarnation
        _, history = api("GET", "/history/acme/alice")
        assert history is not None
        wait_for(lambda: pg_totals(pg_url)["bob"] == made["bob"] + 1, "bob's new request in PostgreSQL")
        # relayctl users, with [state] url in the configuration, manages the PostgreSQL users.
        added = subprocess.run([str(BIN / "relayctl"), "--config", str(pg_config), "users", "add", "dave"],
                               input="pw-d\n", capture_output=True, text=True, timeout=120, check=False,
                               env={**os.environ, "RELAYD_STATE_DIR": str(state_dir)})
        assert added.returncode == 0 and "PostgreSQL" in added.stdout, added.stdout + added.stderr
        wait_for(lambda: api("POST", "/services/acme/members", {"username": "dave"})[0] == 200,
                 "dave known to the node (NOTIFY) and made a member")
        wait_for(lambda: request(port, "GET", "/acme/x", basic("dave", "pw-d"))[0] == 200, "dave admitted")
        assert node.stop() == 0
        with psycopg.connect(pg_url) as conn:
            gens = conn.execute('SELECT count(*) FROM "http_proxy:web".user_incarnations WHERE username = %s',
                                ("alice",)).fetchone()[0]
        assert gens == 2
