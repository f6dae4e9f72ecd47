"""Build relayd; everything but the extension modules is declared in pyproject.toml.

The modules listed in daemon/relayd/compiled.py are compiled to C with mypyc (needs a C
compiler and Python's headers). ``RELAYD_PURE_PYTHON=1`` at install time builds without
compiling (for platforms without a compiler) and removes compiled modules an earlier editable
install left beside the sources.
"""

import json
import os
import runpy
import sys
from pathlib import Path

from setuptools import setup

PACKAGE_DIR = Path(__file__).resolve().parent / "daemon" / "relayd"
compiled = runpy.run_path(str(PACKAGE_DIR / "compiled.py"))  # stdlib only: no relayd import


def remove_in_place_builds() -> None:
    for module in compiled["COMPILED"]:
        for path in compiled["extension_paths"](module, PACKAGE_DIR):
            path.unlink()
    for path in PACKAGE_DIR.parent.glob(f"{compiled['GROUP']}__mypyc.*"):
        path.unlink()
    (PACKAGE_DIR / compiled["RECORD"]).unlink(missing_ok=True)


# pip runs this file for metadata (egg_info, dist_info) before it builds: only a build needs
# mypyc's type check and C generation (minutes), not each of those runs.
BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def extension_modules() -> list:
    if not BUILDS.intersection(sys.argv[1:]):
        return []
    if os.environ.get("RELAYD_PURE_PYTHON") == "1":
        remove_in_place_builds()
        return []
    from mypyc.build import mypycify

    sources = [compiled["source_path"](m, PACKAGE_DIR) for m in compiled["COMPILED"]]
    (PACKAGE_DIR / compiled["RECORD"]).write_text(json.dumps(
        {m: compiled["source_digest"](s) for m, s in zip(compiled["COMPILED"], sources)}, indent=1) + "\n")
    # Not pyproject's [tool.mypy] (CI's type check): its pydantic plugin is absent from pip's
    # isolated build environment, where relayd's dependencies are untyped (Any) to mypyc.
    # --warn-unreachable fails the build where mypy thinks code unreachable: mypyc compiles such
    # code to `raise RuntimeError("Reached allegedly unreachable code!")`.
    options = ["--config-file", "", "--ignore-missing-imports", "--follow-imports=silent", "--warn-unreachable"]
    return mypycify([*options, *(str(s.relative_to(PACKAGE_DIR.parents[1])) for s in sources)],
                    group_name=compiled["GROUP"])


setup(ext_modules=extension_modules())
