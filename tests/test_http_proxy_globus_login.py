"""Browser login with Globus in front of a service, end to end against the local fake Globus Auth:
a real HTTP client follows the redirects (proxy -> Globus authorize -> proxy callback -> page)."""

from __future__ import annotations

import asyncio
import json
import ssl

import aiohttp

import configs
from relayd.testing import free_port
from test_http_proxy import Upstream, echoed_headers


def _config(port: int, tls_port: int, cert, key, upstream: str, fake, extra: str = "") -> str:
    return configs.globus_login_proxy(tls_port, cert, key, upstream, fake, auth_extra=extra)


async def _browse(url: str, context: ssl.SSLContext, steps):
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
    async with aiohttp.ClientSession(cookie_jar=jar, connector=aiohttp.TCPConnector(ssl=context)) as session:
        return await steps(session)


def test_globus_login_session_identity_headers_and_logout(relayd, fake_globus, tls_files):
    cert, key, client_context = tls_files
    tls_port = free_port()
    fake_globus.login_identity.update(sub="11111111-2222-3333-4444-555555555555",
                                      username="alice@example.org", email="alice@example.org", name="Alice")
    with Upstream() as up:
        relayd(_config(0, tls_port, cert, key, up.url, fake_globus))
        base = f"https://127.0.0.1:{tls_port}"

        async def steps(session: aiohttp.ClientSession):
            # An API-style request is refused, not redirected.
            async with session.post(base + "/app/x", data=b"1") as r:
                assert r.status == 401 and "message" in await r.json()
            # The first visit logs in through Globus and lands on the page asked for.
            async with session.get(base + "/app/page?q=1") as r:
                assert r.status == 200, await r.text()
                history = [str(h.url) for h in r.history]
                body = await r.read()
            assert any("/v2/oauth2/authorize" in h for h in history)
            assert any("/.relayd/login?code=" in h for h in history)
            assert json.loads(body)["path"] == "/page?q=1"
            headers = echoed_headers(body)
            assert headers["x-forwarded-user"] == ["alice@example.org"]
            assert headers["x-forwarded-email"] == ["alice@example.org"]
            assert "relayd_session" not in ";".join(headers.get("cookie", []))
            cookie = next(c for c in session.cookie_jar if c.key == "relayd_session")
            assert cookie["httponly"] and cookie["secure"] and cookie["samesite"] == "Lax"
            # Session cookies never reach an upstream, whichever service; the app's own do.
            session.cookie_jar.update_cookies({"app": "1"}, response_url=aiohttp.client.URL(base))
            for path in ("/app/c", "/public/c"):
                async with session.get(base + path) as r:
                    sent = echoed_headers(await r.read()).get("cookie", [])
                    assert sent == ["app=1"], (path, sent)
            # The session is reused without Globus.
            async with session.get(base + "/app/again", allow_redirects=False) as r:
                assert r.status == 200
            issued = [t for t, rec in fake_globus.tokens.items() if not rec["revoked"]]
            assert issued
            # Logout revokes the tokens and ends the session.
            async with session.get(base + "/.relayd/logout") as r:
                assert r.status == 200
            assert all(fake_globus.tokens[t]["revoked"] for t in issued)
            async with session.get(base + "/app/again", allow_redirects=False) as r:
                assert r.status == 302 and "/v2/oauth2/authorize" in r.headers["Location"]
            # A forged or foreign session cookie is not accepted.
            session.cookie_jar.update_cookies({"relayd_session": "abc.123.forged"}, response_url=aiohttp.client.URL(base))
            async with session.get(base + "/app/again", allow_redirects=False) as r:
                assert r.status == 302

        asyncio.run(_browse(base, client_context, steps))


def test_globus_login_state_must_match_and_allowlist(relayd, fake_globus, tls_files):
    cert, key, client_context = tls_files
    tls_port = free_port()
    fake_globus.login_identity.update(username="mallory@evil.example")
    with Upstream() as up:
        relayd(_config(0, tls_port, cert, key, up.url, fake_globus, 'allowed_domains = ["example.org"]'))
        base = f"https://127.0.0.1:{tls_port}"

        async def steps(session: aiohttp.ClientSession):
            async with session.get(base + "/.relayd/login?code=x&state=forged") as r:
                assert r.status == 400 and "state" in (await r.json())["message"]
            async with session.get(base + "/app/") as r:
                assert r.status == 403 and "domain" in (await r.json())["message"]
            assert not [c for c in session.cookie_jar if c.key == "relayd_session"]
            assert all(rec["revoked"] for rec in fake_globus.tokens.values())

        asyncio.run(_browse(base, client_context, steps))
