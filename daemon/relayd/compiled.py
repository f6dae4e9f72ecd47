"""Which modules are compiled to C with mypyc at install, and the guard against stale builds.

``setup.py`` compiles the modules in ``COMPILED`` (the small-request path of http_proxy: most of
its CPU was CPython's interpreter loop) unless ``RELAYD_PURE_PYTHON=1`` is set at install time,
and records the SHA-256 of each source it compiled in ``compiled-sources.json`` beside this file.
An extension module beside its ``.py`` is imported instead of it, so after an edit, a checkout
or a rebase the old compiled code would run silently; ``refuse_stale`` (called when the
``relayd`` package is imported) refuses to start instead and names the fix. It reads only the
standard library, because ``setup.py`` loads this file before relayd's dependencies exist.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
from pathlib import Path

COMPILED = (
    "relayd.components.http_proxy.admission",
    "relayd.components.http_proxy.core",
    "relayd.components.http_proxy.counter_reads",
    "relayd.components.http_proxy.counters",
    "relayd.components.http_proxy.exchange",
    "relayd.components.http_proxy.http1",
    "relayd.components.http_proxy.mapping",
    "relayd.components.http_proxy.proxy",
    "relayd.components.http_proxy.response_reader",
    "relayd.components.http_proxy.responses",
    "relayd.components.http_proxy.routes",
    "relayd.components.http_proxy.upstream",
)
# mypyc's shared library for the group (its runtime and the modules' code), a top-level module.
GROUP = "relayd_native"
RECORD = "compiled-sources.json"
REBUILD = ("rebuild it with `.venv/bin/pip install -e .` (a host install: scripts/install --system "
           "again), or install with RELAYD_PURE_PYTHON=1 to run without compiled modules")

PACKAGE_DIR = Path(__file__).resolve().parent


def source_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path:
    """The ``.py`` of a ``relayd.*`` module in the package directory ``package_dir``."""
    return package_dir.joinpath(*module.split(".")[1:]).with_suffix(".py")


def extension_paths(module: str, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The compiled forms of ``module`` that exist beside its source (normally none or one)."""
    source = source_path(module, package_dir)
    stem = source.with_suffix("")
    return [p for p in (Path(f"{stem}{suffix}") for suffix in importlib.machinery.EXTENSION_SUFFIXES)
            if p.exists()]


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class StaleCompiledModule(ImportError):
    """A compiled module would run instead of a source that changed since it was compiled."""


def refuse_stale(package_dir: Path = PACKAGE_DIR) -> None:
    """Raise ``StaleCompiledModule`` if any compiled module is not built from today's source."""
    compiled = [m for m in COMPILED if extension_paths(m, package_dir)]
    if not compiled:
        return
    try:
        recorded = json.loads((package_dir / RECORD).read_text())
    except (OSError, ValueError):
        recorded = {}
    for module in compiled:
        source = source_path(module, package_dir)
        if not source.exists():  # a wheel could leave out sources; then nothing can be stale
            continue
        if recorded.get(module) != source_digest(source):
            shadow = extension_paths(module, package_dir)[0].name
            raise StaleCompiledModule(
                f"relayd: {source} changed since it was compiled, and the compiled {shadow} "
                f"beside it would run instead of it; {REBUILD}")
