"""Shared fixtures: real relayd subprocesses on 127.0.0.1 with a fake service manager."""

from __future__ import annotations

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
def fake_globus() -> Iterator:
    """A local fake of Globus Auth on 127.0.0.1 (see tests/fake_globus.py for its API)."""
    from fake_globus import FakeGlobus

    fake = FakeGlobus()
    yield fake
    fake.stop()
