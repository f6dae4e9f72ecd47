"""The published JSON Schemas: fresh, usable by editors, and precise in their errors."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from relayd.plugins import Registry
from relayd.schema import settings_schema

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = {"full": ROOT / "schemas/relayd.schema.json", "fragment": ROOT / "schemas/relayd.fragment.schema.json"}
EXAMPLES = ROOT / "etc/relayd"
FRAGMENTS = sorted((EXAMPLES / "conf.d").glob("*.toml"))


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.discover()


@pytest.fixture(scope="module")
def validators(registry: Registry) -> dict[str, jsonschema.Draft202012Validator]:
    out = {}
    for kind in SCHEMAS:
        schema = settings_schema(registry, fragment=kind == "fragment")
        jsonschema.Draft202012Validator.check_schema(schema)
        out[kind] = jsonschema.Draft202012Validator(schema)
    return out


def messages(validator: jsonschema.Draft202012Validator, instance: Any) -> list[str]:
    return [error.message for error in validator.iter_errors(instance)]


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_committed_schema_is_fresh(kind: str, registry: Registry) -> None:
    fresh = settings_schema(registry, fragment=kind == "fragment")
    committed = json.loads(SCHEMAS[kind].read_text()) if SCHEMAS[kind].exists() else None
    if committed != fresh:
        old_defs, new_defs = (committed or {}).get("$defs", {}), fresh["$defs"]
        changed = sorted(n for n in old_defs.keys() | new_defs.keys() if old_defs.get(n) != new_defs.get(n))
        pytest.fail(
            f"{SCHEMAS[kind].relative_to(ROOT)} is stale (a config model or the installed plugins "
            f"changed; differing definitions: {', '.join(changed) or 'top level'}): "
            "run scripts/gen-schemas and commit the result"
        )


def test_example_config_validates(validators) -> None:
    data = tomllib.loads((EXAMPLES / "relayd.toml").read_text())
    assert messages(validators["full"], data) == []


def test_yaml_example_validates(validators) -> None:
    data = yaml.safe_load((EXAMPLES / "relayd.yaml.example").read_text())
    assert messages(validators["full"], data) == []


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=[f.name for f in FRAGMENTS])
def test_confd_examples_validate(fragment: Path, validators) -> None:
    data = tomllib.loads(fragment.read_text())
    assert messages(validators["fragment"], data) == []


def test_there_are_confd_examples() -> None:
    assert FRAGMENTS


def _directive(path: Path, pattern: str) -> Path:
    match = re.match(pattern, path.read_text())
    assert match, f"{path} does not start with a schema directive"
    return (path.parent / match[1]).resolve()


def test_directives_resolve_next_to_the_file() -> None:
    # Editors resolve the directive relative to the file; etc/relayd carries symlinks to
    # schemas/ so the same relative path works in the tree and on an installed host.
    toml_directive = r"#:schema (\S+)\n"
    assert _directive(EXAMPLES / "relayd.toml", toml_directive) == SCHEMAS["full"].resolve()
    yaml_directive = r"# yaml-language-server: \$schema=(\S+)\n"
    assert _directive(EXAMPLES / "relayd.yaml.example", yaml_directive) == SCHEMAS["full"].resolve()
    for fragment in FRAGMENTS:
        assert _directive(fragment, toml_directive) == SCHEMAS["fragment"].resolve()


def test_misspelt_component_key_is_named(validators) -> None:
    config = {"components": {"health": {"kind": "status", "listner": "status"}}}
    for kind in SCHEMAS:
        found = messages(validators[kind], config)
        assert any("'listner'" in m and "not allowed" in m for m in found), found


def test_every_plugin_rejects_a_misspelt_key_by_name(validators, registry: Registry) -> None:
    # The if/then rewrite must reach every installed kind and method, not only status.
    for group, tag in (("components", "kind"), ("auth", "method")):
        for name in registry.usable(group):
            config = {group: {"x": {tag: name, "zz_misspelt": 1}}}
            found = messages(validators["fragment"], config)
            assert any("'zz_misspelt'" in m for m in found), (group, name, found)


def test_unknown_kind_lists_the_known_ones(validators) -> None:
    found = messages(validators["full"], {"components": {"x": {"kind": "stauts"}}})
    assert len(found) == 1 and "'stauts' is not one of" in found[0] and "'status'" in found[0], found


def test_missing_kind_is_one_error(validators) -> None:
    found = messages(validators["fragment"], {"components": {"x": {"listener": "a"}}})
    assert found == ["'kind' is a required property"], found


def test_table_names_are_checked(validators) -> None:
    found = messages(validators["full"], {"listeners": {"Public": {"bind": "8080"}}})
    assert any("'Public'" in m for m in found), found


def test_durations_accept_what_the_loader_accepts(validators) -> None:
    assert messages(validators["fragment"], {"drain_timeout": "30s"}) == []
    assert messages(validators["fragment"], {"drain_timeout": 2.5}) == []
    assert messages(validators["fragment"], {"drain_timeout": "soon"}) != []
    assert messages(validators["fragment"], {"drain_timeout": -1}) != []


def test_example_config_passes_check(capsys, tmp_path: Path) -> None:
    from relayd.cli.daemon import main

    assert main(["--check", "--config", str(EXAMPLES)]) == 0, capsys.readouterr().err
    # The YAML example describes the same configuration, once renamed to relayd.yaml.
    (tmp_path / "relayd.yaml").write_text((EXAMPLES / "relayd.yaml.example").read_text())
    assert main(["--check", "--config", str(tmp_path)]) == 0, capsys.readouterr().err
