"""The lifecycle contract of relayd.lifecycle, held by every built-in plugin, with real objects.

A component or auth method is constructed with every attribute and no I/O; its start() may
fail; stop() after that failure must not raise, and must leave no task and no file descriptor
behind. Each case below makes start() fail the way an operator would: a listener that is not
there, a database path under a regular file, a Redis nobody listens on. No mock of relayd.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relayd.component import Context
from relayd.config.model import ClusterConfig
from relayd.lifecycle import Lifecycle
from relayd.plugins import Registry

REGISTRY = Registry.discover()


def _builtin(group: str) -> dict[str, Any]:
    return {name: p.cls for name, p in REGISTRY.plugins[group].items()
            if p.distribution == "relayd" and p.cls is not None}


def _not_a_directory(tmp_path: Path) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("databases cannot live under a regular file\n")
    return blocker


# How each built-in kind's start() is made to fail: (config table, context changes).
COMPONENT_FAILURES: dict[str, Callable[[Path], tuple[dict[str, Any], dict[str, Any]]]] = {
    # The listener it names is not in the context (as if its socket could not be had).
    "status": lambda tmp: ({"kind": "status", "listener": "gone"}, {}),
    "relay": lambda tmp: ({"kind": "relay", "listener": "gone", "auth": "open"}, {}),
    "stream": lambda tmp: ({"kind": "stream", "listener": "gone", "auth": "open", "data_bind": "127.0.0.1"}, {}),
    # Its counters database cannot be created.
    "http_proxy": lambda tmp: ({"kind": "http_proxy"}, {"state_dir": _not_a_directory(tmp) / "state"}),
}

AUTH_FAILURES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "basic": lambda tmp: {"method": "basic", "users_db": str(_not_a_directory(tmp) / "users.sqlite3")},
    "globus_login": lambda tmp: {"method": "globus_login", "client_id": "c", "client_secret": "s",
                                 "sessions_db": str(_not_a_directory(tmp) / "sessions.sqlite3")},
}
# start() of these opens nothing that can fail (an HTTP client session at most): they are
# started and stopped, and stopped without a start, with the same checks.
AUTH_NO_FAILURE: dict[str, dict[str, Any]] = {
    "none": {"method": "none"},
    "globus": {"method": "globus", "client_id": "c", "client_secret": "s"},
}


def _fds() -> set[str]:
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


def _run_checked(body: Callable[[], Any]) -> None:
    """Run body() in a fresh loop; no task may be left, no fd may leak."""
    async def main() -> None:
        before = _fds()
        await body()
        await asyncio.sleep(0)  # let callbacks of closed transports run
        others = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        assert not others, f"tasks left after stop(): {others}"
        leaked = _fds() - before
        assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}

    asyncio.run(main())


def _context(tmp_path: Path, **changes: Any) -> Context:
    base: dict[str, Any] = {"listeners": {}, "auth": {}, "scope_maps": {}, "state_dir": tmp_path / "state"}
    base.update(changes)
    return Context(**base)


def test_every_builtin_has_a_case():
    assert set(_builtin("components")) == set(COMPONENT_FAILURES)
    assert set(_builtin("auth")) == set(AUTH_FAILURES) | set(AUTH_NO_FAILURE)


async def _open_auth(context: Context) -> None:
    """An auth method for components to refer to ("open"), started like the runtime would."""
    cls = _builtin("auth")["none"]
    method = cls("open", cls.Config.model_validate({"method": "none"}), context)
    await method.start()
    context.auth = {"open": method}


@pytest.mark.parametrize("kind", sorted(COMPONENT_FAILURES))
def test_component_stop_after_failed_start(kind, tmp_path):
    table, changes = COMPONENT_FAILURES[kind](tmp_path)
    cls = _builtin("components")[kind]

    async def body() -> None:
        context = _context(tmp_path, **changes)
        await _open_auth(context)
        component = cls("c", cls.Config.model_validate(table), context)
        assert isinstance(component, Lifecycle)
        with pytest.raises(Exception):  # noqa: B017 - any failure will do; the point is what follows
            await component.start()
        await component.stop(0.5)  # must not raise
        component.status()  # and the object still answers what the runtime asks of it
        component.clients()
        list(component.metrics())
        await context.auth["open"].stop(0)

    _run_checked(body)


def test_relay_stop_after_failed_start_with_an_unreachable_cluster(tmp_path):
    """The relay's Redis bus is started before the listener is looked up: stop() stops it."""
    cls = _builtin("components")["relay"]

    async def body() -> None:
        context = _context(tmp_path, cluster=ClusterConfig(redis="redis://127.0.0.1:9/0", node="n1"))
        await _open_auth(context)
        relay = cls("r", cls.Config.model_validate({"kind": "relay", "listener": "gone", "auth": "open"}),
                    context)
        with pytest.raises(KeyError):
            await relay.start()
        await relay.stop(0.5)
        await context.auth["open"].stop(0)

    _run_checked(body)


@pytest.mark.parametrize("method", sorted(AUTH_FAILURES))
def test_auth_stop_after_failed_start(method, tmp_path):
    cls = _builtin("auth")[method]
    table = AUTH_FAILURES[method](tmp_path)

    async def body() -> None:
        auth = cls("a", cls.Config.model_validate(table), _context(tmp_path))
        assert isinstance(auth, Lifecycle)
        with pytest.raises(OSError):
            await auth.start()
        await auth.stop(0)

    _run_checked(body)


@pytest.mark.parametrize("method", sorted(AUTH_NO_FAILURE))
def test_auth_stop_with_and_without_start(method, tmp_path):
    cls = _builtin("auth")[method]
    config = cls.Config.model_validate(AUTH_NO_FAILURE[method])

    async def body() -> None:
        started = cls("a", config, _context(tmp_path))
        await started.start()
        await started.stop(0)
        never_started = cls("b", config, _context(tmp_path))
        await never_started.stop(0)

    _run_checked(body)
