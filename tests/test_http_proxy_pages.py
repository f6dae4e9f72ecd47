"""The proxy's own answers as pages for browsers and as the same JSON as before for API clients;
rd= open redirects refused; reflected values escaped; operator templates, sandboxed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from relayd.auth.globus_login import safe_return
from relayd.components.http_proxy.pages import Pages, wants_html
from relayd.testing import free_port
from test_browser_globus_login import config
from test_http_proxy import Upstream

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


# -- units ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rd, expected", [
    ("/app/x?y=1", "/app/x?y=1"),
    ("https://127.0.0.1:8443/app/", "/app/"),
    ("https://127.0.0.1:8443", "/"),
    ("//evil.example/x", None),
    ("/\\evil.example", None),
    ("https://evil.example/", None),
    ("http://127.0.0.1:8443/app/", None),  # another scheme: another origin
    ("https://127.0.0.1:8443@evil.example/", None),
    ("https://user@127.0.0.1:8443/", None),
    ("javascript:alert(1)", None),
    ("/x\r\nSet-Cookie: a=b", None),
    ("/\t/evil.example", None),
    ("", None),
    (None, None),
    ("evil.example", None),
])
def test_safe_return(rd, expected):
    assert safe_return(rd, "https", "127.0.0.1:8443") == expected


@pytest.mark.parametrize("accept, html", [
    ("text/html", True),
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
    ("application/json", False),
    ("*/*", False),
    ("text/html;q=0", False),
    ("application/json, text/html;q=0.1", True),
    ("text/htmlx", False),
    ("text/html;q=1.000", True),
    ("text/html;q=0.000", False),
    # not qvalues (RFC 9110 section 12.4.2): never a preference for pages
    ("text/html;q=nan", False),
    ("text/html;q=inf", False),
    ("text/html;q=-1", False),
    ("text/html;q=1_0", False),
    ("text/html;q=2", False),
    ("text/html;q=0.0001", False),
    ("text/html;q=", False),
])
def test_wants_html(accept, html):
    assert wants_html([(b"accept", b"Accept", accept.encode())]) is html
    assert not wants_html([])


def test_pages_escape_and_operator_templates_are_sandboxed(tmp_path: Path):
    pages = Pages()
    body = pages.render("error.html", 403, message="<script>x()</script>", links=[('/a"b', "<i>go</i>")])
    assert b"<script>x()" not in body and b"&lt;script&gt;x()" in body
    assert b'href="/a&#34;b"' in body and b"&lt;i&gt;go" in body
    (tmp_path / "error.html").write_text("<p>custom {{ status }} {{ message }}</p>")
    custom = Pages(tmp_path)
    custom.check()
    assert custom.render("error.html", 404, message="<b>") == b"<p>custom 404 &lt;b&gt;</p>"
    # Templates the operator did not replace stay the built-in ones.
    assert b"Sign-in needed" in custom.render("signin.html", 401)
    # The sandbox: no way to Python internals; the built-in page instead of a crash or a leak.
    (tmp_path / "error.html").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    sandboxed = Pages(tmp_path)
    page = sandboxed.render("error.html", 500, message="m")
    assert b"subclasses" not in page and b"Something went wrong" in page


# -- end to end ----------------------------------------------------------------------------------

@pytest.fixture
def proxy(relayd, fake_globus, tls_files):
    cert, key, client_context = tls_files
    tls_port = free_port()
    with Upstream() as up:
        daemon = relayd(config(tls_port, cert, key, up.url, fake_globus))
        yield f"https://127.0.0.1:{tls_port}", client_context, fake_globus, daemon


def run(base, context, steps):
    async def main():
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar, connector=aiohttp.TCPConnector(ssl=context)) as s:
            return await steps(s)
    return asyncio.run(main())


async def login(session, base):
    async with session.get(base + "/app/x") as r:
        assert r.status == 200


def test_api_clients_get_the_same_json(proxy):
    base, context, _, _ = proxy

    async def steps(s: aiohttp.ClientSession):
        async with s.get(base + "/nothing", allow_redirects=False) as r:
            assert r.status == 404 and r.reason == "Not Found"
            assert r.headers["Content-Type"] == "application/json"
            assert await r.read() == b'{"message": "no service at this address"}'
        async with s.post(base + "/app/x", data=b"1") as r:
            assert r.status == 401 and r.reason == "Unauthorized"
            assert await r.read() == b'{"message": "log in with a web browser first"}'
            assert r.headers["WWW-Authenticate"] == \
                'Cookie realm="relayd", form-action="/.relayd/login", cookie-name="relayd_session"'
        async with s.get(base + "/.relayd/login?code=x&state=forged") as r:
            assert r.status == 400
            assert await r.read() == b'{"message": "login state does not match this browser; start again"}'
        async with s.get(base + "/down/x") as r:
            assert r.status == 502 and r.reason == "Bad Gateway"
            assert json.loads(await r.read())["message"].startswith("upstream refused the connection")
        async with s.get(base + "/app/x", allow_redirects=False) as r:
            assert r.status == 302 and r.reason == "Found"
            assert "/v2/oauth2/authorize?" in r.headers["Location"]
        await login(s, base)
        async with s.get(base + "/.relayd/logout") as r:
            assert r.status == 200 and await r.read() == b'{"message": "logged out"}'
        # The same errors for a browser are pages.
        async with s.get(base + "/nothing", headers=HTML) as r:
            assert r.status == 404 and r.headers["Content-Type"] == "text/html; charset=utf-8"
            assert r.headers["Vary"] == "Accept" and "default-src 'none'" in r.headers["Content-Security-Policy"]
            assert "<h1>Page not found</h1>" in await r.text()
        async with s.head(base + "/nothing", headers=HTML) as r:
            assert r.status == 404 and int(r.headers["Content-Length"]) > 0 and await r.read() == b""
        async with s.post(base + "/app/x", data=b"1", headers=HTML) as r:
            assert r.status == 401 and "WWW-Authenticate" in r.headers
            assert 'href="/.relayd/login?rd=/app/"' in await r.text()

    run(base, context, steps)


def test_open_redirect_through_rd_is_refused(proxy):
    base, context, _, _ = proxy
    evil = ["https://evil.example/", "//evil.example/", "/\\evil.example/", "https:evil.example",
            f"{base}@evil.example/", "http://" + base.removeprefix("https://") + "/app/",
            "javascript:alert(1)", "/x\r\nSet-Cookie: a=b"]

    async def steps(s: aiohttp.ClientSession):
        for rd in evil:
            await login(s, base)
            async with s.get(base + "/.relayd/logout", params={"rd": rd}, headers=HTML,
                             allow_redirects=False) as r:
                text = await r.text()
                assert r.status == 200, (rd, r.status, r.headers.get("Location"))
                assert "Location" not in r.headers
                assert "evil.example" not in text and "javascript" not in text, rd
                assert "Continue" not in text
            async with s.get(base + "/.relayd/login", params={"rd": rd}, allow_redirects=False) as r:
                assert r.status == 302
                # Whatever Globus is asked, the sign-in ends on this origin's start page.
                pending = r.headers["Location"]
                assert "evil" not in pending
        # A good rd is followed (303 See Other), only on this origin.
        await login(s, base)
        async with s.get(base + "/.relayd/logout", params={"rd": base + "/public/x?y=1"},
                         allow_redirects=False) as r:
            assert r.status == 303 and r.reason == "See Other" and r.headers["Location"] == "/public/x?y=1"
        # Line breaks (percent-encoded in the query) are refused: no header injection.
        await login(s, base)
        async with s.get(aiohttp.client.URL(base + "/.relayd/logout?rd=/%0d%0aSet-Cookie:%20a=b", encoded=True),
                         allow_redirects=False) as r:
            assert r.status == 200 and "Location" not in r.headers
            assert r.headers.getall("Set-Cookie") == [
                "relayd_session=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax"]

    run(base, context, steps)


def test_reflected_values_are_escaped(proxy):
    base, context, fake, _ = proxy
    fake.login_identity.update(username='"><script>alert(1)</script>@example.org')

    async def steps(s: aiohttp.ClientSession):
        # A path: the sign-in link carries it, quoted.
        async with s.post(base + '/app/"><script>alert(2)</script>', data=b"", headers=HTML) as r:
            text = await r.text()
            assert r.status == 401 and "<script>" not in text
        async with s.get(base + '/app/"><img src=x onerror=alert(3)>', headers=HTML, allow_redirects=False) as r:
            assert r.status == 302 and "<img" not in r.headers["Location"]
        # Error text from Globus.
        fake.consent_error = "access_denied"
        fake.consent_description = "<img src=x onerror=alert(4)>"
        async with s.get(base + "/app/", headers=HTML) as r:
            text = await r.text()
            assert r.status == 403 and "<img" not in text and "&lt;img src=x onerror=alert(4)&gt;" in text
        fake.consent_error = None
        # A username, on the sign-out page.
        await login(s, base)
        async with s.get(base + "/.relayd/logout", headers=HTML) as r:
            text = await r.text()
            assert "<script>" not in text and "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;@example.org" in text

    run(base, context, steps)


def test_sessions_are_stored_without_tokens_in_the_cookie(proxy, tmp_path):
    base, context, fake, _ = proxy

    async def steps(s: aiohttp.ClientSession):
        await login(s, base)
        return next(c.value for c in s.cookie_jar if c.key == "relayd_session")

    cookie = run(base, context, steps)
    tokens = [t for t, rec in fake.tokens.items() if not rec["revoked"]]
    assert tokens and not any(t in cookie for t in tokens)
    sid = cookie.split(".")[0]
    db = tmp_path / "state" / "browser-sessions-browser.sqlite3"
    assert db.stat().st_mode & 0o077 == 0
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT sid_hash, identity, expires FROM sessions").fetchall()
    conn.close()
    assert len(rows) == 1 and sid not in rows[0][0] and rows[0][2] > time.time()


def test_relayctl_sessions_and_logout_user(proxy):
    base, context, fake, daemon = proxy
    fake.login_identity.update(sub="11111111-2222-3333-4444-555555555555", username="alice@example.org")

    async def steps(s: aiohttp.ClientSession):
        await login(s, base)
        listed = daemon.ctl("sessions", "--browser", "web", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)["sessions"]
        assert [(r["auth"], r["sub"], r["username"]) for r in rows] == \
            [("browser", "11111111-2222-3333-4444-555555555555", "alice@example.org")]
        assert rows[0]["created"] <= rows[0]["last_seen"] < rows[0]["expires"]
        tokens = [t for t, rec in fake.tokens.items() if not rec["revoked"]]
        assert tokens and not any(t in listed.stdout for t in tokens)
        assert not any(c.value.split(".")[0] in listed.stdout for c in s.cookie_jar)
        text = daemon.ctl("sessions", "--browser", "web")
        assert "alice@example.org" in text.stdout
        ended = daemon.ctl("logout-user", "alice@example.org")
        assert ended.returncode == 0 and "1 browser session(s) ended" in ended.stdout, ended.stderr
        async with s.get(base + "/app/x", allow_redirects=False) as r:
            assert r.status == 302  # signed out: to Globus again
        deadline = time.monotonic() + 20
        while not all(fake.tokens[t]["revoked"] for t in tokens):
            assert time.monotonic() < deadline, "tokens not revoked after logout-user"
            await asyncio.sleep(0.05)
        assert daemon.ctl("logout-user", "alice@example.org").returncode == 1
        assert json.loads(daemon.ctl("sessions", "--browser", "web", "--json").stdout)["sessions"] == []

    run(base, context, steps)


def test_operator_pages_dir(relayd, fake_globus, tls_files, tmp_path):
    cert, key, context = tls_files
    tls_port = free_port()
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "error.html").write_text('<!DOCTYPE html><html lang="en"><title>{{ title }}</title>'
                                      "<p>ACME help desk: {{ status }} {{ message }}</p></html>")
    with Upstream() as up:
        relayd(config(tls_port, cert, key, up.url, fake_globus, proxy_extra=f'pages_dir = "{pages}"'))
        base = f"https://127.0.0.1:{tls_port}"

        async def steps(s: aiohttp.ClientSession):
            async with s.get(base + "/nothing", headers=HTML) as r:
                assert r.status == 404
                assert await r.text() == ('<!DOCTYPE html><html lang="en"><title>Page not found</title>'
                                          "<p>ACME help desk: 404 no service at this address</p></html>")
            async with s.get(base + "/nothing") as r:  # API clients: the JSON as ever
                assert await r.read() == b'{"message": "no service at this address"}'
            async with s.post(base + "/app/x", data=b"", headers=HTML) as r:  # not replaced: built in
                assert r.status == 401 and "Sign-in needed" in await r.text()

        run(base, context, steps)


def test_reloading_the_callback_repeats_its_outcome(proxy):
    base, context, fake, _ = proxy

    async def steps(s: aiohttp.ClientSession):
        async with s.get(base + "/app/page", headers=HTML) as r:
            assert r.status == 200
            callback = next(str(h.url) for h in r.history if "/.relayd/login?" in str(h.url))
        # Reloaded while signed in: back to the page, not "400 login state does not match".
        async with s.get(callback, headers=HTML, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/app/page"
        # A refused sign-in reloaded: the same page again.
        async with s.get(base + "/.relayd/logout"):
            pass
        fake.consent_error = "access_denied"
        async with s.get(base + "/app/other", headers=HTML) as r:
            assert r.status == 403
            callback = str(r.url)
            first = await r.text()
        async with s.get(callback, headers=HTML) as r:
            assert r.status == 403 and await r.text() == first
        # A sign-out after a sign-in: its callback no longer signs anyone in.
        fake.consent_error = None
        async with s.get(base + "/app/third") as r:
            callback = next(str(h.url) for h in r.history if "/.relayd/login?" in str(h.url))
        async with s.get(base + "/.relayd/logout"):
            pass
        async with s.get(callback, headers=HTML, allow_redirects=False) as r:
            assert r.status == 400 and "Sign in again" in await r.text()
        assert not [c for c in s.cookie_jar if c.key == "relayd_session" and c.value]

    run(base, context, steps)


def test_sign_in_again_returns_to_the_referring_page(proxy):
    base, context, _, _ = proxy

    async def steps(s: aiohttp.ClientSession):
        await login(s, base)
        async with s.get(base + "/.relayd/logout", headers={**HTML, "Referer": base + "/app/where?x=1"}) as r:
            assert 'href="/.relayd/login?rd=/app/where%3Fx%3D1"' in await r.text()
        async with s.get(base + "/.relayd/logout", headers={**HTML, "Referer": "https://evil.example/x"}) as r:
            text = await r.text()
            assert "evil" not in text and 'href="/.relayd/login?rd=/app/"' in text

    run(base, context, steps)


def test_pending_revocations_survive_a_restart(relayd, fake_globus, tls_files):
    cert, key, context = tls_files
    tls_port = free_port()
    fake = fake_globus
    with Upstream() as up:
        text = config(tls_port, cert, key, up.url, fake)
        daemon = relayd(text)
        base = f"https://127.0.0.1:{tls_port}"

        async def sign_in_and_out_while_down(s: aiohttp.ClientSession):
            await login(s, base)
            fake.down = True
            async with s.get(base + "/.relayd/logout", headers=HTML) as r:
                assert r.status == 200 and "not yet revoked" in await r.text()
            async with s.get(base + "/.relayd/logout") as r:  # API clients: the same JSON as ever
                assert await r.read() == b'{"message": "logged out"}'

        run(base, context, sign_in_and_out_while_down)
        held = [t for t, rec in fake.tokens.items() if not rec["revoked"]]
        assert held
        daemon.stop()
        fake.down = False
        relayd(text)  # the new process finds the queued revocations in the database
        deadline = time.monotonic() + 20
        while not all(fake.tokens[t]["revoked"] for t in held):
            assert time.monotonic() < deadline, "revocations lost across the restart"
            time.sleep(0.05)


def test_idle_sessions_end(relayd, fake_globus, tls_files):
    cert, key, context = tls_files
    tls_port = free_port()
    fake = fake_globus
    with Upstream() as up:
        relayd(config(tls_port, cert, key, up.url, fake, "session_idle = 1.5\nsession_lifetime = 3600"))
        base = f"https://127.0.0.1:{tls_port}"

        async def steps(s: aiohttp.ClientSession):
            await login(s, base)
            tokens = [t for t, rec in fake.tokens.items() if not rec["revoked"]]
            async with s.get(base + "/app/y", allow_redirects=False) as r:
                assert r.status == 200  # in use: alive
            last_use = time.time()
            deadline = time.monotonic() + 20
            # Unused for longer than session_idle: ended, its tokens revoked, the next visit signs in.
            while not all(fake.tokens[t]["revoked"] for t in tokens):
                assert time.monotonic() < deadline, "idle session not ended"
                await asyncio.sleep(0.05)
            assert time.time() - last_use >= 1.5
            async with s.get(base + "/app/z", allow_redirects=False) as r:
                assert r.status == 302 and "/v2/oauth2/authorize" in r.headers["Location"]

        run(base, context, steps)
