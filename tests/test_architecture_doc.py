"""docs/architecture.md names only modules (and module attributes) that exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
NAME = re.compile(r"\brelayd(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _resolves(dotted: str) -> bool:
    """A module, or an attribute (class, function, nested attribute) of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_relayd_name_in_the_architecture_doc_exists():
    names = set(NAME.findall(DOC.read_text())) - {"relayd.toml", "relayd.yaml"}  # files, not modules
    # (The entry point groups relayd.components, relayd.auth and relayd.cli are named after
    # packages that exist, so they pass as modules.)
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"
    assert len(names) > 20  # the check looked at something


def test_the_checker_rejects_a_made_up_name():
    assert _resolves("relayd.lifecycle.State") and _resolves("relayd.runtime")
    assert not _resolves("relayd.no_such_module") and not _resolves("relayd.lifecycle.NoSuchThing")
