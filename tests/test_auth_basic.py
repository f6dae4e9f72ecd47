"""method = "basic": the SQLite user store, htpasswd import, header parsing, relayctl users."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import stat
from pathlib import Path

import bcrypt
import pytest

from relayd.auth import basic as basic_module
from relayd.auth import users as users_module
from relayd.auth.base import AuthError, AuthFailure
from relayd.auth.basic import BasicAuth, BasicAuthConfig, parse_basic
from relayd.auth.users import BadUsername, UnknownUser, UserExists, UserStore
from relayd.component import Context
from relayd.testing import get_json as get


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make(tmp_path: Path, **overrides) -> BasicAuth:
    config = BasicAuthConfig(method="basic", **overrides)
    return BasicAuth("users", config, Context({}, {}, {}, tmp_path / "state"))


def authenticate(method: BasicAuth, *headers: str | None) -> list[object]:
    async def main():
        await method.start()
        out = []
        for header in headers:
            try:
                out.append(await method.authenticate(header))
            except AuthError as exc:
                out.append(exc)
        return out
    return asyncio.run(main())


def test_store_add_list_passwd_remove(tmp_path):
    store = UserStore(tmp_path / "u.sqlite3")
    info = store.add("alice", "correct horse")
    assert [u.username for u in store.list()] == ["alice"] and store.list()[0].created_at == info.created_at
    with pytest.raises(UserExists):
        store.add("alice", "other")
    assert store.verify("alice", "correct horse")
    assert not store.verify("alice", "correct horsE")
    store.set_password("alice", "battery staple")
    assert not store.verify("alice", "correct horse")  # the cached success is not reused
    assert store.verify("alice", "battery staple")
    store.remove("alice")
    assert not store.verify("alice", "battery staple")
    with pytest.raises(UnknownUser):
        store.remove("alice")
    with pytest.raises(UnknownUser):
        store.set_password("alice", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "u.sqlite3").st_mode) == 0o600


def test_passwords_are_stored_as_argon2id_hashes(tmp_path):
    store = UserStore(tmp_path / "u.sqlite3")
    store.add("alice", "s3cret-password")
    [(digest,)] = sqlite3.connect(tmp_path / "u.sqlite3").execute("SELECT hash FROM users").fetchall()
    assert digest.startswith("$argon2id$") and "s3cret-password" not in digest
    assert b"s3cret-password" not in (tmp_path / "u.sqlite3").read_bytes()


@pytest.mark.parametrize("name", ["", "a:b", "tab\there", " lead", "x" * 200, "nul\x00"])
def test_bad_usernames_are_refused(tmp_path, name):
    with pytest.raises(BadUsername):
        UserStore(tmp_path / "u.sqlite3").add(name, "pw")


def test_unknown_users_cost_a_full_hash_check(tmp_path, monkeypatch):
    """Constant time: an unknown user runs the same argon2 verification as a wrong password."""
    store = UserStore(tmp_path / "u.sqlite3")
    store.add("alice", "pw")
    checked = []
    real = users_module.verify_hash
    monkeypatch.setattr(users_module, "verify_hash", lambda h, p: checked.append(h) or real(h, p))
    assert not store.verify("mallory", "pw")
    assert not store.verify("alice", "wrong")
    assert len(checked) == 2 and checked[0] == store.dummy_hash() and checked[0].startswith("$argon2id$")


def test_basic_method_identity_and_failures(tmp_path):
    method = make(tmp_path)
    method.users.add("alice", "pw:with:colons é")
    results = authenticate(method, basic("alice", "pw:with:colons é"), basic("alice", "nope"),
                           basic("bob", "pw"), None, "Bearer abc", "Basic !!!", "Basic " +
                           base64.b64encode(b"no-colon").decode())
    identity = results[0]
    assert (identity.sub, identity.username, identity.method) == ("alice", "alice", "users")
    assert [r.reason for r in results[1:]] == [AuthFailure.INVALID, AuthFailure.INVALID, AuthFailure.MISSING,
                                               AuthFailure.MALFORMED, AuthFailure.MALFORMED,
                                               AuthFailure.MALFORMED]
    assert method.challenge() == 'Basic realm="relayd", charset="UTF-8"'
    assert (tmp_path / "state" / "users-users.sqlite3").exists()


def test_basic_scheme_is_case_insensitive():
    assert parse_basic("basic " + base64.b64encode(b"a:b").decode()) == ("a", "b")


def test_htpasswd_bcrypt_users_are_read_only_and_weak_hashes_skipped(tmp_path, caplog):
    htpasswd = tmp_path / "htpasswd"
    digest = bcrypt.hashpw(b"from-apache", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$")
    htpasswd.write_text(f"# comment\ncarol:{digest}\nold:$apr1$abc$def\nplain:{{SHA}}xyz\n")
    method = make(tmp_path, htpasswd=htpasswd)
    method.users.add("alice", "db-password")
    results = authenticate(method, basic("carol", "from-apache"), basic("carol", "wrong"),
                           basic("old", "x"), basic("alice", "db-password"))
    assert results[0].sub == "carol"
    assert [r.reason for r in results[1:3]] == [AuthFailure.INVALID, AuthFailure.INVALID]
    assert results[3].sub == "alice"
    assert "'old' does not have a bcrypt hash" in caplog.text and "$apr1$" not in caplog.text
    assert htpasswd.read_text().startswith("# comment")  # untouched
    # Edits to the file apply without a reload.
    dave = bcrypt.hashpw(b"new", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"carol:{digest}\ndave:{dave}\n")
    assert authenticate(method, basic("dave", "new"))[0].sub == "dave"


def test_missing_htpasswd_file_rejects_the_configuration(tmp_path):
    with pytest.raises(ValueError, match="cannot read htpasswd"):
        authenticate(make(tmp_path, htpasswd=tmp_path / "absent"))


def test_realm_with_quotes_is_rejected():
    with pytest.raises(ValueError):
        BasicAuthConfig(method="basic", realm='a"b')


# -- relayctl users against a real relayd ----------------------------------------------------------

def config(port: int) -> str:
    return f"""
        [listeners.web]
        bind = "127.0.0.1:{port}"
        [auth.users]
        method = "basic"
        realm = "test realm"
        [components.health]
        kind = "status"
        listener = "web"
        auth = "users"
    """


def test_relayctl_users_against_a_real_relayd(relayd, port):
    daemon = relayd(config(port))
    url = f"http://127.0.0.1:{port}/status"
    added = daemon.ctl("users", "add", "alice", input="first password\n")
    assert added.returncode == 0, added.stderr
    assert "first password" not in added.stdout + added.stderr
    assert get(url, basic("alice", "first password"))[0] == 200
    status, headers, body = get(url, basic("alice", "wrong"))
    assert status == 401 and headers["WWW-Authenticate"].startswith('Basic realm="test realm"')
    assert get(url)[0] == 401

    again = daemon.ctl("users", "add", "alice", input="x\n")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert daemon.ctl("users", "passwd", "alice", input="second password\n").returncode == 0
    assert get(url, basic("alice", "first password"))[0] == 401
    assert get(url, basic("alice", "second password"))[0] == 200

    listed = daemon.ctl("users", "list", "--json")
    assert [u["username"] for u in json.loads(listed.stdout)] == ["alice"]
    assert daemon.ctl("users", "remove", "alice").returncode == 0
    assert get(url, basic("alice", "second password"))[0] == 401
    missing = daemon.ctl("users", "remove", "alice")
    assert missing.returncode == 1 and "no user 'alice'" in missing.stderr
    bad = daemon.ctl("users", "add", "a:b", input="pw\n")
    assert bad.returncode == 1 and "':'" in bad.stderr

    metrics = daemon.ctl("metrics").stdout
    assert 'relayd_auth_basic_failures_total{auth="users"} 3.0' in metrics

    # The discovery document is unauthenticated and names the method, nothing secret.
    status, _, doc = get(f"http://127.0.0.1:{port}/.well-known/relayd")
    assert status == 200 and doc["auth"] == [{"name": "users", "method": "basic", "realm": "test realm"}]
    assert "first password" not in daemon.log and "second password" not in daemon.log


def test_relayctl_users_without_a_daemon_needs_db_or_config(tmp_path):
    import subprocess

    from relayd.testing import BIN

    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
    db = tmp_path / "users.sqlite3"
    cmd = [str(BIN / "relayctl"), "--socket", str(tmp_path / "none.sock"), "users"]
    added = subprocess.run(cmd + ["--db", str(db), "add", "bob"], input="pw\n", capture_output=True,
                           text=True, env=env)
    assert added.returncode == 0, added.stderr
    assert UserStore(db).verify("bob", "pw")
    lost = subprocess.run(cmd + ["list"], capture_output=True, text=True, env=env)
    assert lost.returncode == 1 and "--db PATH" in lost.stderr


def test_default_db_path_is_in_the_state_dir(tmp_path):
    assert basic_module.default_users_db(tmp_path, "web") == tmp_path / "users-web.sqlite3"


def test_relayctl_users_reads_the_db_path_from_config_when_relayd_is_stopped(tmp_path):
    import subprocess

    from relayd.testing import BIN, write_config

    directory = write_config(tmp_path / "etc", f"""
        state_dir = "{tmp_path / 'state'}"
        [auth.staff]
        method = "basic"
        [auth.guests]
        method = "basic"
        users_db = "{tmp_path / 'guests.sqlite3'}"
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
    cmd = [str(BIN / "relayctl"), "--socket", str(tmp_path / "none.sock"), "--config",
           str(directory / "relayd.toml"), "users"]
    ambiguous = subprocess.run(cmd + ["list"], capture_output=True, text=True, env=env)
    assert ambiguous.returncode == 1 and "pick one with --auth" in ambiguous.stderr
    for name in ("staff", "guests"):
        done = subprocess.run(cmd + ["--auth", name, "add", f"{name}-user"], input="pw\n",
                              capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
    assert UserStore(tmp_path / "state" / "users-staff.sqlite3").verify("staff-user", "pw")
    assert [u.username for u in UserStore(tmp_path / "guests.sqlite3").list()] == ["guests-user"]
    wrong = subprocess.run(cmd + ["--auth", "nope", "list"], capture_output=True, text=True, env=env)
    assert wrong.returncode == 1 and "no [auth.nope]" in wrong.stderr


def test_an_unusable_user_database_denies_with_unavailable(tmp_path, caplog):
    method = make(tmp_path)
    method.users.add("alice", "pw-5e1f")
    method.db_path.write_bytes(b"this is not an SQLite database" * 100)
    [error] = authenticate(method, basic("alice", "pw-5e1f"))
    assert error.reason is AuthFailure.UNAVAILABLE
    assert "unusable" in caplog.text and "pw-5e1f" not in caplog.text
