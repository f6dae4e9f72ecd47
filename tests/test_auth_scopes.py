"""Scope maps: address normalisation, lookup precedence, and the unmapped-address error."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from relayd.auth import scopes
from relayd.auth.discovery import globus_scopes
from relayd.config.model import ScopeMapConfig


@pytest.mark.parametrize("address, expected", [
    ("Host.Example.ORG", "host.example.org"),
    ("host.example.org.:5000", "host.example.org:5000"),
    ("127.0.0.1:80", "127.0.0.1:80"),
    ("2001:DB8:0:0::1", "[2001:db8::1]"),
    ("[2001:db8::1]:5000", "[2001:db8::1]:5000"),
    ("[::1]", "[::1]"),
    ("https://relay.example.org:8443/path", "relay.example.org:8443"),
    ("wss://relay.example.org", "relay.example.org"),
])
def test_normalize(address, expected):
    assert scopes.normalize_address(address) == expected


@pytest.mark.parametrize("address", ["", "host:0", "host:70000", "host:http", "[zz::1]:5", "a:b:c:5000",
                                     "[::1]x", "bad host", "-x.example"])
def test_bad_addresses(address):
    with pytest.raises(ValueError):
        scopes.split_address(address)


MAPS = {
    "site": ScopeMapConfig(servers={
        "s2cs.example.org": "scope-host",
        "s2cs.example.org:6000": "scope-host-port",
        "10.16.42.61:5000": "scope-v4",
        "[2001:db8::5]:5000": "scope-v6",
        "2001:db8::6": "scope-v6-any-port",
    }),
}


@pytest.mark.parametrize("address, scope", [
    ("s2cs.example.org:5000", "scope-host"),
    ("S2CS.example.org:6000", "scope-host-port"),
    ("s2cs.example.org", "scope-host"),
    ("10.16.42.61:5000", "scope-v4"),
    ("[2001:db8:0::5]:5000", "scope-v6"),
    ("[2001:db8::6]:1234", "scope-v6-any-port"),
])
def test_lookup(address, scope):
    assert scopes.lookup(MAPS, address) == scope


def test_unmapped_address_names_it_and_how_to_add_it():
    with pytest.raises(scopes.UnmappedServer) as info:
        scopes.lookup(MAPS, "10.16.42.61:5001")
    message = str(info.value)
    assert "'10.16.42.61:5001'" in message
    assert '"10.16.42.61:5001" = "<scope string>" under [scope_maps.site.servers]' in message
    with pytest.raises(scopes.UnmappedServer):
        scopes.lookup(MAPS, "localhost:5000")  # names are never resolved: not 127.0.0.1


def test_config_normalises_keys_and_rejects_bad_or_duplicate_ones():
    assert ScopeMapConfig(servers={"HOST:1": "s"}).servers == {"host:1": "s"}
    with pytest.raises(ValidationError, match="IPv6 with a port needs brackets"):
        ScopeMapConfig(servers={"2001:db8::1:5000:5000:5000:5000:5000": "s"})
    with pytest.raises(ValidationError, match="both mean"):
        ScopeMapConfig(servers={"Host": "a", "host.": "b"})
    with pytest.raises(ValidationError, match="empty scope"):
        ScopeMapConfig(servers={"host": " "})


def test_loading_a_config_with_a_bad_scope_map_fails(tmp_path):
    from relayd.config import ConfigError, load_config
    from relayd.plugins import Registry
    from relayd.testing import write_config

    directory = write_config(tmp_path / "etc", """
        [scope_maps.site.servers]
        "bad host:5000" = "x"
    """)
    with pytest.raises(ConfigError, match="bad host"):
        load_config(directory / "relayd.toml", registry=Registry.discover())


def test_discovery_scopes_parsing():
    doc = {"service": "relayd", "auth": [{"method": "basic"}, {"method": "globus", "scope": "S"}]}
    assert globus_scopes(doc) == ["S"]
    with pytest.raises(ValueError):
        globus_scopes({"auth": []})


from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.auth.base import AuthError
from relayd.auth.basic import parse_basic
from relayd.auth.globus import parse_bearer


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_address_text_parses_or_raises_value_error(text):
    try:
        host, port = scopes.split_address(text)
    except ValueError:
        return
    assert scopes.normalize_address(scopes.format_address(host, port)) == scopes.format_address(host, port)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=200), st.text(max_size=100).map(lambda t: "Basic " + t),
                 st.text(max_size=100).map(lambda t: "Bearer " + t)))
def test_any_authorization_header_parses_or_raises_auth_error(header):
    for parse in (parse_basic, parse_bearer):
        try:
            parse(header)
        except AuthError:
            pass
