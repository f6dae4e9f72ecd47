"""method = "globus": token introspection against the local fake of Globus Auth."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from relayd.auth.base import AuthError, AuthFailure
from relayd.auth.globus import GlobusAuth, GlobusAuthConfig
from relayd.component import Context
from relayd.testing import free_port

SCOPE_SUFFIX = "relay"


def scope_of(fake) -> str:
    return f"https://auth.globus.org/scopes/{fake.client_id}/{SCOPE_SUFFIX}"


def make(fake, tmp_path: Path, **overrides) -> GlobusAuth:
    settings = {"method": "globus", "client_id": fake.client_id, "client_secret": fake.client_secret,
                "auth_base_url": fake.base_url, "required_scopes": [scope_of(fake)], **overrides}
    return GlobusAuth("globus", GlobusAuthConfig(**settings), Context({}, {}, {}, tmp_path))


def run(method: GlobusAuth, *headers: str | None) -> list[object]:
    """Authenticate each header in one event loop; AuthError instances are returned, not raised."""
    async def main() -> list[object]:
        await method.start()
        try:
            return [await _try(method, h) for h in headers]
        finally:
            await method.close()
    return asyncio.run(main())


async def _try(method: GlobusAuth, header: str | None) -> object:
    try:
        return await method.authenticate(header)
    except AuthError as exc:
        return exc


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_valid_token_gives_the_globus_identity(fake_globus, tmp_path):
    token = fake_globus.issue_token(sub="8a1b9c52-0000-4000-8000-000000000001", username="ada@uni.example",
                                    name="Ada", email="ada@uni.example",
                                    scopes=[scope_of(fake_globus), "openid"])
    [identity] = run(make(fake_globus, tmp_path), bearer(token))
    assert identity.sub == "8a1b9c52-0000-4000-8000-000000000001"
    assert (identity.username, identity.name, identity.email) == ("ada@uni.example", "Ada", "ada@uni.example")
    assert identity.method == "globus"
    assert identity.scopes == {scope_of(fake_globus), "openid"}


@pytest.mark.parametrize("header, reason", [
    (None, AuthFailure.MISSING),
    ("", AuthFailure.MISSING),
    ("Basic YTpi", AuthFailure.MALFORMED),
    ("Bearer", AuthFailure.MALFORMED),
    ("Bearer tok en", AuthFailure.MALFORMED),
    ("Bearer " + "a" * 5000, AuthFailure.MALFORMED),
])
def test_missing_or_malformed_header_never_reaches_globus(fake_globus, tmp_path, header, reason):
    [error] = run(make(fake_globus, tmp_path), header)
    assert isinstance(error, AuthError) and error.reason is reason
    assert fake_globus.calls["introspect"] == 0


def test_inactive_unknown_and_revoked_tokens_are_invalid(fake_globus, tmp_path):
    inactive = fake_globus.issue_token(scopes=[scope_of(fake_globus)], active=False)
    revoked = fake_globus.issue_token(scopes=[scope_of(fake_globus)])
    fake_globus.revoke(revoked)
    results = run(make(fake_globus, tmp_path), bearer(inactive), bearer(revoked), bearer("AgUnknownToken"))
    assert [r.reason for r in results] == [AuthFailure.INVALID] * 3


def test_expired_token(fake_globus, tmp_path):
    # Globus itself reports an expired token inactive ...
    expired = fake_globus.issue_token(scopes=[scope_of(fake_globus)], expires_in=-60)
    # ... and if it did not (clocks apart), relayd's own exp/nbf checks still refuse it.
    expired_but_active = fake_globus.issue_token(scopes=[scope_of(fake_globus)], expires_in=-60,
                                                 force_active=True)
    not_yet = fake_globus.issue_token(scopes=[scope_of(fake_globus)], nbf=time.time() + 600)
    results = run(make(fake_globus, tmp_path), bearer(expired), bearer(expired_but_active), bearer(not_yet))
    assert [r.reason for r in results] == [AuthFailure.INVALID] * 3
    assert [r.message for r in results[1:]] == ["token has expired", "token is not valid yet"]


def test_wrong_audience_is_forbidden(fake_globus, tmp_path):
    other = fake_globus.issue_token(scopes=[scope_of(fake_globus)], audience=["some-other-service"])
    custom = fake_globus.issue_token(scopes=[scope_of(fake_globus)], audience=["relay-rs"])
    default_method = run(make(fake_globus, tmp_path), bearer(other), bearer(custom))
    assert [r.reason for r in default_method] == [AuthFailure.FORBIDDEN] * 2
    assert "audience" in default_method[0].message
    [ok] = run(make(fake_globus, tmp_path, audience="relay-rs"), bearer(custom))
    assert not isinstance(ok, AuthError)


def test_missing_required_scope_is_forbidden(fake_globus, tmp_path):
    token = fake_globus.issue_token(scopes=["openid", "email"])
    two = make(fake_globus, tmp_path, required_scopes=[scope_of(fake_globus), "email"])
    partial = fake_globus.issue_token(scopes=[scope_of(fake_globus)])
    [error] = run(make(fake_globus, tmp_path), bearer(token))
    assert error.reason is AuthFailure.FORBIDDEN and scope_of(fake_globus) in error.message
    [error] = run(two, bearer(partial))
    assert error.reason is AuthFailure.FORBIDDEN and error.message.endswith("email")


def test_allowlists(fake_globus, tmp_path):
    scope = [scope_of(fake_globus)]
    linked = fake_globus.issue_token(sub="id-primary", identity_set=["id-primary", "id-linked"], scopes=scope)
    stranger = fake_globus.issue_token(sub="id-x", username="x@evil.example", scopes=scope)
    by_id = run(make(fake_globus, tmp_path, allowed_identities=["id-linked"]), bearer(linked), bearer(stranger))
    assert by_id[0].sub == "id-primary"
    assert by_id[1].reason is AuthFailure.FORBIDDEN
    ada = fake_globus.issue_token(username="ada@uni.example", scopes=scope)
    bob = fake_globus.issue_token(username="bob@uni.example", scopes=scope)
    by_name = run(make(fake_globus, tmp_path, allowed_usernames=["ada@uni.example"]), bearer(ada), bearer(bob))
    assert by_name[0].username == "ada@uni.example" and by_name[1].reason is AuthFailure.FORBIDDEN
    by_domain = run(make(fake_globus, tmp_path, allowed_domains=["@UNI.example"]), bearer(bob), bearer(stranger))
    assert by_domain[0].username == "bob@uni.example" and by_domain[1].reason is AuthFailure.FORBIDDEN


def test_wrong_client_secret_is_unavailable_and_logged_without_the_secret(fake_globus, tmp_path, caplog):
    token = fake_globus.issue_token(scopes=[scope_of(fake_globus)])
    caplog.set_level(logging.DEBUG)
    [error] = run(make(fake_globus, tmp_path, client_secret="not-the-secret"), bearer(token))
    assert error.reason is AuthFailure.UNAVAILABLE
    assert "client credentials" in caplog.text and fake_globus.client_id in caplog.text
    assert "not-the-secret" not in caplog.text and token not in caplog.text


def test_globus_down_denies_with_unavailable_and_is_not_cached(fake_globus, tmp_path, caplog):
    token = fake_globus.issue_token(scopes=[scope_of(fake_globus)])
    method = make(fake_globus, tmp_path)
    caplog.set_level(logging.ERROR)

    async def main():
        await method.start()
        fake_globus.down = True
        first = await _try(method, bearer(token))
        fake_globus.down = False
        second = await _try(method, bearer(token))
        await method.close()
        return first, second

    first, second = asyncio.run(main())
    assert first.reason is AuthFailure.UNAVAILABLE and "try again" in first.message
    assert second.sub  # the outage was not remembered
    assert "HTTP 503" in caplog.text and token not in caplog.text


def test_globus_unreachable_denies_with_unavailable(fake_globus, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    [error] = run(make(fake_globus, tmp_path, auth_base_url=dead), bearer("AgSomeToken"))
    assert error.reason is AuthFailure.UNAVAILABLE
    assert "introspection" in caplog.text and "AgSomeToken" not in caplog.text


def test_cache_hits_and_negative_cache(fake_globus, tmp_path):
    good = fake_globus.issue_token(scopes=[scope_of(fake_globus)])
    bad = fake_globus.issue_token(scopes=["openid"])
    method = make(fake_globus, tmp_path)
    results = run(method, *[bearer(good)] * 5, *[bearer(bad)] * 3)
    assert fake_globus.calls["introspect"] == 2
    assert all(r.sub for r in results[:5])
    assert all(r.reason is AuthFailure.FORBIDDEN for r in results[5:])
    assert method.stats["cache_hits"] == 6


def test_cache_lifetime_is_min_of_ttl_and_exp(fake_globus, tmp_path):
    short = fake_globus.issue_token(scopes=[scope_of(fake_globus)], expires_in=30)
    long = fake_globus.issue_token(scopes=[scope_of(fake_globus)], expires_in=3600)
    method = make(fake_globus, tmp_path, cache_ttl=300, clock_skew=0)
    now = [time.time()]
    method.clock = lambda: now[0]

    async def main():
        await method.start()
        await method.authenticate(bearer(short))
        await method.authenticate(bearer(long))
        assert fake_globus.calls["introspect"] == 2
        now[0] += 60  # past short's exp, within the TTL for long
        assert (await method.authenticate(bearer(long))).sub
        assert fake_globus.calls["introspect"] == 2
        error = await _try(method, bearer(short))
        assert fake_globus.calls["introspect"] == 3  # asked again, not served from cache
        now[0] += 300  # past the TTL
        await method.authenticate(bearer(long))
        assert fake_globus.calls["introspect"] == 4
        await method.close()
        return error

    error = asyncio.run(main())
    assert error.reason is AuthFailure.INVALID


def test_concurrent_checks_of_one_token_share_one_introspection(fake_globus, tmp_path):
    token = fake_globus.issue_token(scopes=[scope_of(fake_globus)])
    method = make(fake_globus, tmp_path)

    async def main():
        await method.start()
        fake_globus.hold()
        tasks = [asyncio.create_task(method.authenticate(bearer(token))) for _ in range(25)]
        deadline = time.monotonic() + 10
        while fake_globus.calls["introspect"] < 1:  # the request reached Globus: every task has run
            assert time.monotonic() < deadline, "introspection never arrived"
            await asyncio.sleep(0.005)
        assert len(method.inflight) == 1
        fake_globus.release()
        identities = await asyncio.gather(*tasks)
        await method.close()
        return identities

    identities = asyncio.run(main())
    assert len({i.sub for i in identities}) == 1 and len(identities) == 25
    assert fake_globus.calls["introspect"] == 1


def test_a_cancelled_waiter_does_not_cancel_the_shared_check(fake_globus, tmp_path):
    token = fake_globus.issue_token(scopes=[scope_of(fake_globus)])
    method = make(fake_globus, tmp_path)

    async def main():
        await method.start()
        fake_globus.hold()
        first = asyncio.create_task(method.authenticate(bearer(token)))
        second = asyncio.create_task(method.authenticate(bearer(token)))
        deadline = time.monotonic() + 10
        while fake_globus.calls["introspect"] < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        first.cancel()
        fake_globus.release()
        identity = await second
        with pytest.raises(asyncio.CancelledError):
            await first
        await method.close()
        return identity

    assert asyncio.run(main()).sub
    assert fake_globus.calls["introspect"] == 1


def test_describe_and_challenge_publish_scope_without_secrets(fake_globus, tmp_path):
    method = make(fake_globus, tmp_path)
    described = method.describe()
    assert described == {"method": "globus", "scope": scope_of(fake_globus), "audience": fake_globus.client_id,
                         "auth_base_url": fake_globus.base_url.rstrip("/")}
    assert fake_globus.client_secret not in repr(described) + method.challenge()
    assert f'scope="{scope_of(fake_globus)}"' in method.challenge()


def test_client_secret_from_a_file(fake_globus, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(fake_globus.client_secret + "\n")
    token = fake_globus.issue_token(scopes=[scope_of(fake_globus)])
    [identity] = run(make(fake_globus, tmp_path, client_secret=f"file:{secret_file}"), bearer(token))
    assert identity.sub


def test_an_empty_client_secret_is_a_configuration_error_not_auth_off():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must not be empty"):
        GlobusAuthConfig(method="globus", client_id="x", client_secret="")
