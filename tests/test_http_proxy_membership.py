"""Membership through the management API decides who is admitted (a real relayd and upstream).

A member added through the API is admitted at once; one removed (the user stays in the auth
method's store) is refused; deleting a service drops its members, so the same name created
again starts with none.
"""

from __future__ import annotations

from pathlib import Path

from test_http_proxy import basic, control, proxy_config, request, upstream  # noqa: F401 - fixture


def test_members_added_and_removed_through_the_api_are_admitted_then_refused(relayd, port, upstream):  # noqa: F811
    daemon = relayd(proxy_config(port, upstream.url, auth="users", service_extra="members_only = true"))
    from relayd.auth.users import UserStore

    UserStore(Path(daemon.env["RELAYD_STATE_DIR"]) / "users-users.sqlite3").add("bob", "pw2")
    assert request(port, "GET", "/acme/x", basic("bob", "pw2"))[0] == 403  # a user, not a member

    status, body = control(daemon, "POST", "services/acme/members", {"username": "bob"})
    assert status == 200 and body["username"] == "bob", body
    assert request(port, "GET", "/acme/x", basic("bob", "pw2"))[0] == 200
    assert [u["username"] for u in control(daemon, "GET", "services/acme/members")[1]] == ["bob"]

    assert control(daemon, "DELETE", "services/acme/members/bob") == (200, None)
    assert request(port, "GET", "/acme/x", basic("bob", "pw2"))[0] == 403  # still a user: refused
    assert control(daemon, "GET", "services/acme/members/bob")[0] == 404
    assert control(daemon, "GET", "services/acme/members")[1] == []


def test_deleting_a_service_drops_its_members(relayd, port, upstream):  # noqa: F811
    daemon = relayd(proxy_config(port, upstream.url, auth="users", extra='extra_listeners = ["web"]'))
    service = {"name": "lab", "bindHttp": [f"127.0.0.1:{port}"], "from": "/lab", "to": upstream.url}
    assert control(daemon, "POST", "services", service)[0] == 200
    assert control(daemon, "POST", "services/lab/users", {"username": "carol", "password": "pw3"})[0] == 200
    assert request(port, "GET", "/lab/x", basic("carol", "pw3"))[0] == 200

    assert control(daemon, "DELETE", "services/lab") == (200, None)
    assert request(port, "GET", "/lab/x", basic("carol", "pw3"))[0] == 404
    assert control(daemon, "POST", "services", service)[0] == 200
    assert control(daemon, "GET", "services/lab/users")[1] == []
    assert request(port, "GET", "/lab/x", basic("carol", "pw3"))[0] == 403  # in the store, no member
