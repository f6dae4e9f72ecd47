"""The fake Globus Auth refuses what the real one refuses (so tests against it mean something).

Driven with globus-sdk itself, pointed at the fake by base_url.
"""

from __future__ import annotations

import http.client
import urllib.parse

import globus_sdk
import pytest
from globus_sdk.transport import RetryConfig

NO_RETRY = RetryConfig(max_retries=0)


def authorize(fake, url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request("GET", f"{parts.path}?{parts.query}")
    response = connection.getresponse()
    assert response.status == 302, response.read()
    return urllib.parse.parse_qs(urllib.parse.urlsplit(response.getheader("Location")).query)["code"][0]


def native(fake) -> globus_sdk.NativeAppAuthClient:
    return globus_sdk.NativeAppAuthClient(fake.native_client_id, base_url=fake.base_url, retry_config=NO_RETRY)


def test_pkce_code_exchange_checks_the_verifier_and_is_single_use(fake_globus):
    scope = f"https://auth.globus.org/scopes/{fake_globus.client_id}/relay"
    client = native(fake_globus)
    client.oauth2_start_flow(requested_scopes=[scope], refresh_tokens=True)
    code = authorize(fake_globus, client.oauth2_get_authorize_url())

    impostor = native(fake_globus)
    impostor.oauth2_start_flow(requested_scopes=[scope])  # its own, different verifier
    with pytest.raises(globus_sdk.AuthAPIError) as info:
        impostor.oauth2_exchange_code_for_tokens(code)
    assert info.value.http_status == 401 and info.value.raw_json["error"] == "invalid_grant"

    code = authorize(fake_globus, client.oauth2_get_authorize_url())
    tokens = client.oauth2_exchange_code_for_tokens(code)
    data = tokens.by_resource_server[fake_globus.client_id]
    assert data["scope"] == scope and data["refresh_token"]
    with pytest.raises(globus_sdk.AuthAPIError):
        client.oauth2_exchange_code_for_tokens(code)  # codes are single use

    refreshed = client.oauth2_refresh_token(data["refresh_token"])
    assert refreshed.by_resource_server[fake_globus.client_id]["access_token"] != data["access_token"]


def test_introspection_needs_the_confidential_clients_credentials(fake_globus):
    token = fake_globus.issue_token(scopes=["openid"])
    good = globus_sdk.ConfidentialAppAuthClient(fake_globus.client_id, fake_globus.client_secret,
                                                base_url=fake_globus.base_url, retry_config=NO_RETRY)
    meta = good.oauth2_token_introspect(token, include="identity_set")
    assert meta["active"] is True and meta["aud"] == [fake_globus.client_id] and meta["identity_set"]
    bad = globus_sdk.ConfidentialAppAuthClient(fake_globus.client_id, "wrong", base_url=fake_globus.base_url,
                                               retry_config=NO_RETRY)
    with pytest.raises(globus_sdk.AuthAPIError) as info:
        bad.oauth2_token_introspect(token)
    assert info.value.http_status == 401 and info.value.raw_json["error"] == "invalid_client"
    good.oauth2_revoke_token(token)
    assert good.oauth2_token_introspect(token).data == {"active": False}


def test_native_clients_must_use_pkce(fake_globus):
    query = urllib.parse.urlencode({"client_id": fake_globus.native_client_id, "response_type": "code",
                                    "redirect_uri": fake_globus.url("/v2/web/auth-code"), "scope": "openid"})
    connection = http.client.HTTPConnection("127.0.0.1", fake_globus.port, timeout=10)
    connection.request("GET", f"/v2/oauth2/authorize?{query}")
    response = connection.getresponse()
    assert response.status == 400 and b"PKCE" in response.read()
