"""Shared fixtures: real relayd subprocesses on 127.0.0.1 with a fake service manager."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.testing import RelaydProcess, free_port, start_relayd, write_config

# Fixtures for real engines live in their own modules (tests/ is on sys.path).
pytest_plugins = ["pg_server", "redis_server", "haproxy_front"]


@pytest.fixture
def relayd(tmp_path: Path) -> Iterator:
    """Factory: relayd(config_text, fragments=None, **start_kwargs) -> RelaydProcess."""
    started: list[RelaydProcess] = []

    def start(main: str, fragments: dict[str, str] | None = None, **kwargs) -> RelaydProcess:
        config_dir = write_config(tmp_path / f"etc{len(started)}", main, fragments)
        daemon = start_relayd(tmp_path, config_dir, **kwargs)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A directory to put on PYTHONPATH, holding the installed test plugins (plugin_package.py)."""
    from plugin_package import build_plugin_site

    return build_plugin_site(tmp_path_factory.mktemp("plugins"))


@pytest.fixture
def port() -> int:
    return free_port()



@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 from a throwaway CA: (cert.pem, key.pem, a client context
    that trusts the CA)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    return tmp_path / "cert.pem", tmp_path / "key.pem", ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))


@pytest.fixture
def fake_globus() -> Iterator:
    """A local fake of Globus Auth on 127.0.0.1 (see tests/fake_globus.py for its API)."""
    from fake_globus import FakeGlobus

    fake = FakeGlobus()
    yield fake
    fake.stop()
