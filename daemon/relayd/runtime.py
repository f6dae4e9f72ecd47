"""The server core: configuration generations, atomic reloads, graceful shutdown.

A generation is the set of listeners, auth methods and components built from one validated
configuration. A reload builds the next generation beside the running one, reusing every
object whose configuration (including what it refers to) did not change, starts what is
new, and only then swaps. Whatever fails while building is torn down and the old generation
keeps serving. Replaced objects are stopped after the swap, in the background.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relayd import __version__
from relayd.auth.base import AuthMethod
from relayd.component import Component, Context
from relayd.config import ConfigError, LoadedConfig, Problem, load_config
from relayd.control import ControlServer
from relayd.daemon_status import StatusReport
from relayd.engines import Engines
from relayd.fd_limits import nofile_limit, plan_limits, raise_nofile_limit
from relayd.generation import (
    Generation,
    ReloadResult,
    apply_limits,
    component_fingerprint,
    engines_key,
    fingerprint_of,
    secret_values,
)
from relayd.lifecycle import Lifecycle, State
from relayd.listeners import Listener, ListenerError, SocketPool
from relayd.logsetup import configure_logging
from relayd.plugins import GROUPS, Registry
from relayd.systemd import Notifier, listen_fds, watchdog_interval

log = logging.getLogger("relayd")
EXIT_STOP_FAILED = 74  # EX_IOERR: a component could not stop cleanly (e.g. counts held in a journal)


@dataclass
class DaemonOptions:
    config_path: Path
    overrides: list[str] = field(default_factory=list)
    environ: dict[str, str] | None = None


class Daemon(StatusReport):
    def __init__(self, options: DaemonOptions, registry: Registry | None = None) -> None:
        self.options = options
        self.registry = registry or Registry.discover()
        # Take the passed fds before opening anything: a new fd would otherwise land on 3..
        # if the service manager passed fewer fds than LISTEN_FDS claims.
        self.pool = SocketPool(listen_fds())
        self.notifier = Notifier()
        self.generation: Generation | None = None
        self.started_at = time.time()
        self.engines = Engines()
        self.last_reload: ReloadResult | None = None
        self.reload_counts = {"ok": 0, "rejected": 0}
        self.stopping = False
        self._reload_lock = asyncio.Lock()
        self._draining: set[asyncio.Task] = set()
        self.retiring: set[str] = set()  # "components.NAME" of replaced objects still draining
        self._shutdown = asyncio.Event()
        self.stop_failures: list[str] = []  # objects that could not stop cleanly during shutdown
        self._reload_after_start = False
        self.control: ControlServer | None = None
        # Where each component and auth method is in its lifecycle: the runtime alone writes it.
        self.states: weakref.WeakKeyDictionary[Lifecycle, State] = weakref.WeakKeyDictionary()

    # -- configuration ---------------------------------------------------------------------

    def load(self) -> LoadedConfig:
        return load_config(
            self.options.config_path,
            registry=self.registry,
            environ=self.options.environ,
            overrides=self.options.overrides,
        )

    async def _build(self, config: LoadedConfig, old: Generation | None) -> tuple[Generation, list[str]]:
        """Build the next generation; on error, stop what was newly made and re-raise."""
        settings = config.settings
        number = old.number + 1 if old else 1
        listeners: dict[str, Listener] = {}
        listener_keys: dict[str, tuple[str, object]] = {}
        problems = []
        limits = plan_limits({n: l.max_connections for n, l in settings.listeners.items()}, nofile_limit())
        for name, lconf in settings.listeners.items():
            try:
                listener_keys[name], listeners[name] = self.pool.build(name, lconf, limits.limits[name])
            except ListenerError as exc:
                problems.append(Problem(str(exc), config.origins.get(("listeners", name)), f"listeners.{name}"))
        if problems:
            self._release_sockets(old)
            raise ConfigError(problems)

        context = Context(listeners, {}, settings.scope_maps, Path(settings.state_dir), daemon=self,
                          state=settings.state, cluster=settings.cluster, engines=self.engines)
        fingerprints: dict[str, str] = {}
        auth: dict[str, AuthMethod] = {}
        components: dict[str, Component] = {}
        new_auth: list[AuthMethod] = []
        new_components: list[Component] = []
        changed: list[str] = []
        building = ("auth", "?")  # what a failure is attributed to, set before each step

        async def build(group: str, tables: dict[str, Any], fingerprint: Callable[[str, Any], str],
                        kept: Mapping[str, Any], built: dict[str, Any], new: list[Any]) -> None:
            """Auth methods and components alike: keep the object of an unchanged table,
            else construct and start a new one (relayd.lifecycle)."""
            nonlocal building
            for name, table in tables.items():
                building = (group, name)
                key = f"{group}.{name}"
                fingerprints[key] = fingerprint(name, table)
                if old and old.fingerprints.get(key) == fingerprints[key]:
                    built[name] = kept[name]
                    continue
                cls = self.registry.usable(group)[getattr(table, GROUPS[group][1])]
                obj = cls(name, table, context)
                new.append(obj)
                await self._start_one(obj)
                built[name] = obj
                changed.append(key)

        try:
            await build("auth", settings.auth,
                        lambda _, t: fingerprint_of(t.model_dump(mode="json"), secret_values(t),
                                                    engines_key(settings)),
                        old.auth if old else {}, auth, new_auth)
            context.auth = auth
            await build("components", settings.components,
                        lambda n, t: component_fingerprint(settings, n, t, fingerprints),
                        old.components if old else {}, components, new_components)
        except Exception as exc:
            await self._stop_all(new_components, new_auth, drain_timeout=0)
            self._release_sockets(old)
            if isinstance(exc, ConfigError):
                raise
            # Attribute the failure to what was being built (an object whose constructor raised
            # is not in new_*, so the last new object would be the wrong culprit).
            group, where = building
            log.debug("building %s.%s failed", group, where, exc_info=True)
            message = f"failed to start: {type(exc).__name__}: {exc}" if not isinstance(exc, OSError) \
                else f"failed to start: {exc}"
            raise ConfigError(
                [Problem(message, config.origins.get((group, where)), f"{group}.{where}")]
            ) from None
        removed = [f"components.{n}" for n in (old.components if old else {}) if n not in components]
        removed += [f"auth.{n}" for n in (old.auth if old else {}) if n not in auth]
        generation = Generation(number, config, listeners, listener_keys, auth, components, fingerprints, limits)
        return generation, changed + [f"{r} (removed)" for r in removed]

    def _release_sockets(self, keep: Generation | None) -> None:
        in_use = set(keep.listener_keys.values()) if keep else set()
        self.pool.discard_tls()  # certificates re-read for a generation that will not serve
        self.pool.release_unused(in_use)

    def serving_component(self, name: str) -> Component | None:
        return self.generation.components.get(name) if self.generation is not None else None

    async def _start_one(self, obj: Lifecycle) -> None:
        self.states[obj] = State.CREATED
        try:
            await obj.start()
        except BaseException:
            self.states[obj] = State.FAILED
            raise
        self.states[obj] = State.SERVING

    async def _stop_all(self, components: list[Component], auth: list[AuthMethod], drain_timeout: float) -> None:
        """Stop (one lifecycle for both, relayd.lifecycle): components first, since they use auth
        methods, then auth methods; also the ones whose start() failed."""
        groups: list[tuple[str, list[Lifecycle]]] = [("component", [*components]), ("auth", [*auth])]
        for what, objects in groups:
            results = await asyncio.gather(
                *(self._stop_one(obj, drain_timeout) for obj in objects), return_exceptions=True
            )
            for obj, result in zip(objects, results):
                if isinstance(result, BaseException):
                    log.error("stopping %s %s failed: %s", what, obj.name, result)
                    if self.stopping:  # e.g. state it could not save: the exit status says so
                        self.stop_failures.append(f"{what} {obj.name}: {result}")

    async def _stop_one(self, obj: Lifecycle, drain_timeout: float) -> None:
        self.states[obj] = State.DRAINING
        try:
            await obj.stop(drain_timeout)
        finally:
            self.states[obj] = State.STOPPED

    async def reload(self) -> ReloadResult:
        """Load, validate, build and swap; the old generation stays on any failure."""
        async with self._reload_lock:
            if self.stopping:
                return ReloadResult(False, self.generation.number if self.generation else 0, "shutting down")
            self.notifier.reloading()
            old = self.generation
            assert old is not None
            try:
                config = await asyncio.to_thread(self.load)
                new, changed = await self._build(config, old)
            except Exception as exc:
                if not isinstance(exc, ConfigError):
                    # A bug, not a bad config; still keep serving and answer READY=1, or
                    # systemd would wait in "reloading" for ever.
                    log.exception("reload failed unexpectedly")
                    exc = ConfigError([Problem(f"internal error: {type(exc).__name__}: {exc}")])
                errors = [str(p) for p in exc.problems]
                result = ReloadResult(False, old.number, "configuration rejected; still serving "
                                      f"generation {old.number}", errors)
                self.reload_counts["rejected"] += 1
                self.last_reload = result
                log.error("reload rejected, keeping generation %d:\n  %s", old.number, "\n  ".join(errors))
                self.notifier.notify(READY=1, STATUS=f"reload rejected: {errors[0]}")
                return result
            configure_logging(new.config.settings.logging)
            self._log_config_warnings(new.config)
            if new.config.settings.control != old.config.settings.control:
                log.warning("[control] changes take effect at the next restart, not on reload")
            self.generation = new
            self._forget_unused_engines(new)
            self.pool.install_tls(set(new.listener_keys.values()))
            apply_limits(new)
            self._renewed(old, new)
            self._retire(old, new)
            result = ReloadResult(True, new.number, f"generation {new.number} serving", [], changed)
            self.reload_counts["ok"] += 1
            self.last_reload = result
            log.info("reloaded: generation %d (%s)", new.number, ", ".join(changed) or "no changes")
            self.notifier.ready(self.status_line())
            return result

    @staticmethod
    def _log_config_warnings(config: LoadedConfig) -> None:
        for warning in config.warnings:
            log.warning("configuration: %s", warning)

    def _renewed(self, old: Generation, new: Generation) -> None:
        """Components the reload kept re-read what they cache from files (Component.reloaded)."""
        for component in new.components.values():
            if any(component is c for c in old.components.values()):
                try:
                    component.reloaded()
                except Exception:  # a plugin's failure must not fail the reload
                    log.exception("component %s: re-reading its files failed", component.name)

    def _retire(self, old: Generation, new: Generation) -> None:
        """Stop what the new generation no longer uses, in the background."""
        kept_components = {id(c) for c in new.components.values()}
        kept_auth = {id(a) for a in new.auth.values()}
        components = [c for c in old.components.values() if id(c) not in kept_components]
        auth = [a for a in old.auth.values() if id(a) not in kept_auth]
        timeout = new.config.settings.drain_timeout

        names = [f"components.{c.name}" for c in components] + [f"auth.{a.name}" for a in auth]
        self.retiring.update(names)

        async def retire() -> None:
            try:
                await self._stop_all(components, auth, timeout)
            finally:
                self.retiring.difference_update(names)
            if names:
                log.info("stopped %s (from generation %d)", ", ".join(names), old.number)
            # Release against the generation serving *now*, under the reload lock: a reload
            # that finished (or is building) meanwhile may use sockets `new` did not have, and
            # releasing against `new` would close them under its feet.
            async with self._reload_lock:
                self._release_sockets(self.generation)

        task = asyncio.get_running_loop().create_task(retire())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def _forget_unused_engines(self, gen: Generation) -> None:
        """An engine removed from the configuration leaves status and /healthz (its last record,
        perhaps "down", would otherwise say "degraded" for ever)."""
        settings = gen.config.settings
        if settings.cluster.redis is None:
            self.engines.unregister("cluster")
        if settings.state.url is None:
            self.engines.unregister("state")

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        config = await asyncio.to_thread(self.load)
        configure_logging(config.settings.logging)
        self._log_config_warnings(config)
        before, now = raise_nofile_limit()
        if now != before:
            log.info("raised the open file limit (RLIMIT_NOFILE) from %d to %d", before, now)
        self.generation, _ = await self._build(config, None)
        apply_limits(self.generation)
        self.control = ControlServer(self)
        await self.control.start(config.settings.control, self.pool.activated)
        self.last_reload = ReloadResult(True, 1, "started")
        used = {l.fd_name for l in config.settings.listeners.values()} | {config.settings.control.fd_name}
        for name in sorted(set(self.pool.activated) - used):
            log.warning("socket-activated fd name %r is not used by any listener (fd_name = %r?)", name, name)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # Handlers first: `systemctl stop` (or reload) during a slow start-up must not kill
        # relayd with the default SIGTERM/SIGHUP action.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._shutdown.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        starting = loop.create_task(self.start())
        stop_requested = loop.create_task(self._shutdown.wait())
        await asyncio.wait({starting, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stop requested during start-up")
            self.notifier.stopping()
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            if self.control:
                await self.control.stop()
            self.pool.close_all()
            return 0
        stop_requested.cancel()
        try:
            starting.result()
        except ConfigError as exc:
            log.error("configuration rejected:\n  %s", "\n  ".join(str(p) for p in exc.problems))
            self.notifier.notify(STATUS=f"configuration rejected: {exc.problems[0]}", ERRNO=22)
            return 1
        except ListenerError as exc:
            log.error("%s", exc)
            self.notifier.notify(STATUS=str(exc))
            return 1
        watchdog = self._start_watchdog()
        log.info("relayd %s ready: %s", __version__, self.status_line())
        self.notifier.ready(self.status_line())
        if self._reload_after_start:
            self._on_sighup()
        await self._shutdown.wait()
        await self.shutdown()
        if watchdog:
            watchdog.cancel()
        if self.stop_failures:
            log.error("exiting with status %d: %s", EXIT_STOP_FAILED, "; ".join(self.stop_failures))
            return EXIT_STOP_FAILED
        return 0

    def _on_sighup(self) -> None:
        if self.generation is None:
            # Still starting: the files may have changed after they were read, so reload
            # once the start-up is done.
            log.info("SIGHUP during start-up: will reload once started")
            self._reload_after_start = True
            return
        log.info("SIGHUP: reloading configuration")
        task = asyncio.get_running_loop().create_task(self.reload())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def _start_watchdog(self) -> asyncio.Task | None:
        interval = watchdog_interval(os.environ, os.getpid())
        if interval is None or not self.notifier.enabled:
            return None

        async def ping() -> None:
            # Pinged from the event loop on purpose: a blocked loop misses pings and systemd
            # restarts us, which is what a watchdog is for.
            while True:
                self.notifier.watchdog()
                await asyncio.sleep(interval)

        return asyncio.get_running_loop().create_task(ping())

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def shutdown(self) -> None:
        self.stopping = True
        self.notifier.stopping()
        gen = self.generation
        timeout = gen.config.settings.drain_timeout if gen else 0
        self.notifier.extend_timeout(timeout + 5)
        log.info("stopping: draining for up to %.1fs", timeout)
        if self.control:
            await self.control.stop()
        if gen:
            await self._stop_all(list(gen.components.values()), list(gen.auth.values()), timeout)
        # Objects a reload replaced may still be draining: let them finish (an http_proxy saves
        # its counters last) before cancelling what is left.
        if self._draining:
            await asyncio.wait(list(self._draining), timeout=timeout + 5)
        for task in list(self._draining):
            task.cancel()
        self.pool.close_all()
        log.info("stopped")
        self.notifier.close()
