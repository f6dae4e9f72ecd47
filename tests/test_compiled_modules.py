"""The guard against stale mypyc builds (relayd.compiled): an extension module beside its source
shadows it, so a compiled module whose source changed since the build must stop the import.

Each test lays out a package directory of real files; the "extension module" is only a file
with the right name (the guard looks at names and sources, it never loads one)."""

from __future__ import annotations

import importlib.machinery
import json
from pathlib import Path

import pytest

from relayd import compiled

MODULE = compiled.COMPILED[0]


def _package(tmp_path: Path, *, built: bool, recorded: str | None) -> Path:
    package = tmp_path / "relayd"
    source = compiled.source_path(MODULE, package)
    source.parent.mkdir(parents=True)
    source.write_text("VALUE = 1\n")
    if built:
        source.with_suffix(importlib.machinery.EXTENSION_SUFFIXES[0]).write_bytes(b"\x7fELF")
    if recorded is not None:
        (package / compiled.RECORD).write_text(json.dumps({MODULE: recorded}))
    return package


def test_source_unchanged_since_the_build_passes(tmp_path: Path) -> None:
    package = _package(tmp_path, built=True, recorded=None)
    digest = compiled.source_digest(compiled.source_path(MODULE, package))
    (package / compiled.RECORD).write_text(json.dumps({MODULE: digest}))
    compiled.refuse_stale(package)


def test_edited_source_refuses_and_names_the_fix(tmp_path: Path) -> None:
    package = _package(tmp_path, built=True, recorded=None)
    source = compiled.source_path(MODULE, package)
    (package / compiled.RECORD).write_text(json.dumps({MODULE: compiled.source_digest(source)}))
    source.write_text("VALUE = 2\n")
    with pytest.raises(compiled.StaleCompiledModule) as caught:
        compiled.refuse_stale(package)
    message = str(caught.value)
    assert str(source) in message and "changed since it was compiled" in message
    assert "pip install -e ." in message and "RELAYD_PURE_PYTHON=1" in message


def test_compiled_module_without_a_record_refuses(tmp_path: Path) -> None:
    package = _package(tmp_path, built=True, recorded=None)
    with pytest.raises(compiled.StaleCompiledModule):
        compiled.refuse_stale(package)


def test_pure_python_install_has_nothing_to_check(tmp_path: Path) -> None:
    package = _package(tmp_path, built=False, recorded="not the digest")
    compiled.refuse_stale(package)


def test_every_compiled_module_exists() -> None:
    for module in compiled.COMPILED:
        assert compiled.source_path(module).is_file(), module
