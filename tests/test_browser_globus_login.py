"""Browser users of a globus_login service, in real headless Chromium (Selenium) against relayd
subprocesses and the local fake of Globus Auth: the pages a person sees, cookies, sign-out with
return, restarts, Globus outages, expiry. Every page is saved as a PNG in the test's tmp dir.

Needs Debian's ``chromium`` and ``chromium-driver`` and Selenium (``scripts/install --test``);
skipped without them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import configs
from polling import wait_for
from relayd.testing import free_port
from test_http_proxy import Upstream

webdriver = pytest.importorskip("selenium.webdriver")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("needs Debian chromium and chromium-driver", allow_module_level=True)

from selenium.webdriver.common.by import By

pytestmark = pytest.mark.slow

SUB = "11111111-2222-3333-4444-555555555555"


def config(tls_port: int, cert, key, upstream: str, fake, extra: str = "", proxy_extra: str = "") -> str:
    return configs.globus_login_proxy(
        tls_port, cert, key, upstream, fake, auth_extra="revoke_retry = 0.2\n" + extra, proxy_extra=proxy_extra,
        services=configs.service("web", "down", f"http://127.0.0.1:{free_port()}", listeners=["secure"], auth="open")
        + configs.service("web", "members", upstream, listeners=["secure"], members_only=True))


class Browser:
    """One Chromium with a fresh profile; ``shot(name)`` saves the page as a PNG."""

    def __init__(self, tmp_path: Path) -> None:
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        options = Options()
        options.binary_location = shutil.which("chromium")
        for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--ignore-certificate-errors", "--window-size=1000,760",
                    f"--user-data-dir={tmp_path / 'chromium-profile'}"):
            options.add_argument(arg)
        self.shots = tmp_path / "screenshots"
        self.shots.mkdir(exist_ok=True)
        self.driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        self.driver.set_page_load_timeout(30)
        self.count = 0

    def get(self, url: str, shot: str) -> None:
        self.driver.get(url)
        self.shot(shot)

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        assert self.driver.save_screenshot(str(path))
        return path

    @property
    def text(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "body").text

    @property
    def url(self) -> str:
        return self.driver.current_url

    def links(self) -> dict[str, str]:
        return {a.text: a.get_attribute("href") for a in self.driver.find_elements(By.TAG_NAME, "a")}

    def click(self, text: str, shot: str) -> None:
        self.driver.find_element(By.LINK_TEXT, text).click()
        self.shot(shot)

    def cookie(self, name: str) -> dict | None:
        return next((c for c in self.driver.get_cookies() if c["name"] == name), None)

    def post_form(self, url: str, shot: str) -> None:
        """Submit a form by POST, as a person would (the browser navigates to the answer)."""
        self.driver.get("about:blank")
        self.driver.execute_script(
            "const f = document.createElement('form'); f.method = 'POST'; f.action = arguments[0];"
            "document.body.appendChild(f); f.submit();", url)
        wait_for(lambda: self.driver.current_url == url and
                 self.driver.execute_script("return document.readyState") == "complete", "the POST answer")
        self.shot(shot)

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path)
    yield b
    b.close()


def test_browser_journey(relayd, fake_globus, tls_files, browser, tmp_path):
    cert, key, _ = tls_files
    tls_port = free_port()
    fake = fake_globus
    fake.login_identity.update(sub=SUB, username="alice@example.org", email="alice@example.org", name="Alice")
    with Upstream() as up:
        text = config(tls_port, cert, key, up.url, fake)
        daemon = relayd(text)
        base = f"https://127.0.0.1:{tls_port}"

        # Login: the protected page, through Globus, with a session cookie of the right flags.
        browser.get(base + "/app/page?q=1", "protected-page")
        assert browser.url == base + "/app/page?q=1"
        assert '"path": "/page?q=1"' in browser.driver.page_source
        cookie = browser.cookie("relayd_session")
        assert cookie and cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Lax"
        assert not browser.cookie("relayd_session_login")
        assert fake.calls["authorize"] == 1
        first_tokens = [t for t, rec in fake.tokens.items() if not rec["revoked"]]

        # Error pages, in HTML, each with a way on.
        browser.get(base + "/nothing/here", "404")
        assert "Page not found" in browser.text and "404 Not Found" in browser.text
        assert browser.links()["Go to the start page"] == base + "/"
        browser.get(base + "/down/x", "502")
        assert "Service unreachable" in browser.text and "502 Bad Gateway" in browser.text
        assert browser.links()["Try again"] == base + "/down/x"
        browser.get(base + "/members/x", "403")
        assert "Access denied" in browser.text and "may not use service 'members'" in browser.text
        assert browser.links()["Sign out"] == base + "/.relayd/logout"
        browser.get(base + "/.relayd/login?code=x&state=forged", "400")
        assert "400 Bad Request" in browser.text and "not valid here" in browser.text
        assert browser.links()["Sign in again"] == base + "/.relayd/login?rd=/app/"

        # Sign-out with a return to the page given in rd; the tokens are revoked.
        browser.get(base + "/.relayd/logout?rd=/public/bye", "signed-out-return")
        assert browser.url == base + "/public/bye"
        assert not browser.cookie("relayd_session")
        assert all(fake.tokens[t]["revoked"] for t in first_tokens)
        # Without rd: a page that says so, with a link to sign in again.
        browser.get(base + "/.relayd/logout", "signed-out")
        assert "You are signed out" in browser.text
        # The 401 of a POST without a session: a sign-in page (and WWW-Authenticate, tested below).
        browser.post_form(base + "/app/form", "401-signin")
        assert "Sign-in needed" in browser.text and "401 Unauthorized" in browser.text
        # Sign in again from the link: back on the page asked for.
        browser.get(base + "/.relayd/logout?rd=/app/again", "signed-out-then-app")
        # (rd=/app/again needs a session: the browser went through Globus again at once)
        assert browser.url == base + "/app/again"
        browser.get(base + "/.relayd/logout", "signed-out-2")
        browser.click("Sign in again", "signed-in-again")
        assert browser.url == base + "/app/"  # no rd nor Referer: the service using this sign-in
        assert browser.cookie("relayd_session")
        browser.get(base + "/app/after", "app-after-sign-in")
        assert '"path": "/after"' in browser.driver.page_source
        calls = fake.calls["authorize"]

        # A restart of relayd keeps the session: no trip to Globus.
        daemon.stop()
        daemon = relayd(text)
        browser.get(base + "/app/after-restart", "after-restart")
        assert '"path": "/after-restart"' in browser.driver.page_source
        assert fake.calls["authorize"] == calls

        # Globus down at sign-out: signed out here, and the page says the tokens are not revoked.
        held = [t for t, rec in fake.tokens.items() if not rec["revoked"]]
        assert held
        fake.down = True
        browser.get(base + "/.relayd/logout?rd=/public/x", "signed-out-globus-down")
        assert "not yet revoked" in browser.text and "keeps trying" in browser.text
        assert browser.links()["Continue"] == base + "/public/x"
        assert not any(fake.tokens[t]["revoked"] for t in held)
        # Globus down at sign-in: an honest page, not the browser's "site can't be reached".
        browser.get(base + "/app/while-down", "sign-in-globus-down")
        assert "Globus sign-in is unreachable" in browser.text and "503 Service Unavailable" in browser.text
        assert browser.url == base + "/app/while-down"
        fake.down = False
        # Revocation is retried in the background until Globus answers.
        wait_for(lambda: all(fake.tokens[t]["revoked"] for t in held), "the background revocation")
        browser.click("Try again", "sign-in-after-outage")
        assert browser.url == base + "/app/while-down"
        assert '"path": "/while-down"' in browser.driver.page_source

        # Consent refused at Globus: a page saying so, with a way to try again.
        browser.get(base + "/.relayd/logout", "signed-out-3")
        fake.consent_error = "access_denied"
        browser.get(base + "/app/consent", "consent-refused")
        assert "Sign-in was not completed" in browser.text and "declined" in browser.text
        assert browser.links()["Try again"] == base + "/.relayd/login?rd=/app/consent"
        fake.consent_error = None
        browser.click("Try again", "consent-given")
        assert browser.url == base + "/app/consent"
    print("screenshots in", browser.shots)


def test_browser_expired_session_and_refused_identity(relayd, fake_globus, tls_files, browser):
    cert, key, _ = tls_files
    tls_port = free_port()
    fake = fake_globus
    fake.login_identity.update(username="bob@example.org")
    with Upstream() as up:
        relayd(config(tls_port, cert, key, up.url, fake, 'session_lifetime = 2\nallowed_domains = ["example.org"]'))
        base = f"https://127.0.0.1:{tls_port}"
        browser.get(base + "/app/one", "expiring-session")
        assert '"path": "/one"' in browser.driver.page_source
        first = browser.cookie("relayd_session")["value"]
        tokens = [t for t, rec in fake.tokens.items() if not rec["revoked"]]
        # The session ends by itself; its tokens are revoked without anyone signing out.
        wait_for(lambda: all(fake.tokens[t]["revoked"] for t in tokens), "revocation at expiry")
        browser.get(base + "/app/two", "after-expiry")
        assert fake.calls["authorize"] == 2  # a fresh sign-in
        assert browser.cookie("relayd_session")["value"] != first
        # An identity the allow-list refuses, with a name that tries to inject HTML.
        browser.get(base + "/.relayd/logout", "signed-out")
        fake.login_identity.update(username="<b>mallory</b><script>document.title='pwned'</script>@evil.example")
        browser.get(base + "/app/three", "identity-refused")
        assert "403 Forbidden" in browser.text and "may not use this service" in browser.text
        assert "<script>document.title='pwned'</script>" in browser.text  # shown as text...
        assert browser.driver.title != "pwned"  # ...never run
        assert not browser.driver.find_elements(By.CSS_SELECTOR, "main b")
        assert browser.links()["Sign in with another identity"] == base + "/.relayd/login?rd=/app/three"
