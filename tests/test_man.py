"""The man pages render without warnings and document every config key, relayctl command and
relayd option that the installed code has."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from relayd.cli import ctl, daemon
from relayd.plugins import Registry
from relayd.schema import settings_schema

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
PAGES = ["relayd.8", "relayctl.1", "relayd.toml.5"]
GROFF = shutil.which("groff")


@pytest.mark.skipif(GROFF is None, reason="groff is not installed")
@pytest.mark.parametrize("page", PAGES)
def test_renders_without_warnings(page: str) -> None:
    result = subprocess.run(
        [GROFF, "-man", "-ww", "-z", str(MAN / page)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("page", PAGES)
def test_pages_are_ascii(page: str) -> None:
    # groff reads bytes as Latin-1 unless preconv runs first (man does, groff -z not): use
    # escapes such as \(em, \(lq, \(co instead of UTF-8 characters.
    bad = [f"{page}:{n}: {line}" for n, line in enumerate((MAN / page).read_text().splitlines(), 1)
           if not line.isascii()]
    assert not bad, "\n".join(bad)


@pytest.mark.skipif(GROFF is None, reason="groff is not installed")
def test_warnings_are_detected(tmp_path: Path) -> None:
    # Guards the test above: a broken page must produce output it would reject.
    bad = tmp_path / "bad.5"
    bad.write_text((MAN / "relayd.toml.5").read_text() + ".BOGUSMACRO\n\\fXoops\n")
    result = subprocess.run([GROFF, "-man", "-ww", "-z", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.stderr != ""


# -- what a page documents ---------------------------------------------------------------

_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ARGS = re.compile(r'"((?:[^"]|"")*)"|(\S+)')


def plain(text: str) -> str:
    """Roff text without font escapes; `\\-` as `-`."""
    text = _FONT.sub("", text)
    return text.replace("\\-", "-").replace("\\&", "").replace("\\(dq", '"').replace("\\e", "\\")


def item_text(line: str) -> str:
    """The text of a .TP tag line: a font macro with its arguments, or plain text."""
    if not line.startswith("."):
        return plain(line)
    macro, _, rest = line[1:].partition(" ")
    args = [m[1].replace('""', '"') if m[1] is not None else m[2] for m in _ARGS.finditer(rest)]
    # .B and .I join their arguments with spaces, the alternating macros (.BR, .BI...) without.
    joiner = " " if macro in ("B", "I", "SM", "SB") else ""
    return plain(joiner.join(args))


def items(page: str) -> list[str]:
    """The tag of every .TP item of a page (what an operator sees in bold at the margin)."""
    lines = (MAN / page).read_text().splitlines()
    tags = []
    for index, line in enumerate(lines[:-1]):
        if line.strip() == ".TP" or line.startswith(".TP "):
            nxt = index + 1
            while nxt < len(lines) and lines[nxt].startswith('.\\"'):
                nxt += 1
            tags.append(item_text(lines[nxt]).strip())
    return tags


def documented_keys(page: str) -> set[str]:
    """First word of every item (`bind = string` -> bind); dotted words count per segment."""
    keys = set()
    for tag in items(page):
        match = re.match(r"\[?([A-Za-z_][\w.*-]*)", tag)
        if match:
            word = match[1]
            keys.add(word)
            keys.update(word.split("."))
    return keys


def test_item_parsing() -> None:
    assert item_text('.BI "bind = " string') == "bind = string"
    assert item_text(".BR \\-c \", \" \\-\\-config \" \\fIPATH\\fR\"") == "-c, --config PATH"
    assert item_text(".B drain_timeout") == "drain_timeout"
    assert item_text("\\fBusers add\\fR \\fIUSER\\fR") == "users add USER"
    keys = documented_keys("relayd.toml.5")
    assert {"bind", "fd_name", "drain_timeout", "servers", "cert"} <= keys
    assert "nonexistent_key" not in keys


# -- config keys -------------------------------------------------------------------------


def schema_keys(schema: dict[str, Any]) -> dict[str, set[str]]:
    """Every key name any object of the schema has -> where it occurs (definition titles)."""
    found: dict[str, set[str]] = {}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            where = node.get("title", where) if "properties" in node else where
            for key in node.get("properties", {}) if isinstance(node.get("properties"), dict) else ():
                found.setdefault(key, set()).add(where)
            for key, value in node.items():
                walk(value, key if key in schema.get("$defs", {}) else where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    walk(schema, "top level")
    return found


def _fragment_hint(key: str) -> str:
    hits = [f.name for f in sorted((MAN / "fragments").glob("*.in")) if re.search(
        rf"^\.(B|BI|BR|IR|I)\s+\"?{re.escape(key)}\b", f.read_text(), re.M)]
    return f" [in man/fragments/{', '.join(hits)}: not merged yet]" if hits else ""


def test_every_config_key_is_documented() -> None:
    keys = schema_keys(settings_schema(Registry.discover()))
    documented = documented_keys("relayd.toml.5")
    missing = sorted(set(keys) - documented)
    report = "\n".join(f"  {key}  (in {', '.join(sorted(keys[key]))}){_fragment_hint(key)}" for key in missing)
    if missing:
        pytest.fail(
            "config keys without a .TP item in man/relayd.toml.5 (add '.TP' then '.BI \"KEY = \" TYPE' "
            f"in the section of your kind/method):\n{report}"
        )


# -- commands and options ----------------------------------------------------------------


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append(prefix + (name,))
                paths += command_paths(sub, prefix + (name,))
    return paths


def test_every_relayctl_command_is_documented() -> None:
    tags = [tag.split() for tag in items("relayctl.1")]
    missing = [" ".join(path) for path in command_paths(ctl.build_parser())
               if not any(tag[:len(path)] == list(path) for tag in tags)]
    assert not missing, (
        "relayctl commands without a .TP item in man/relayctl.1 (add one in your marked block, "
        f"its tag starting with the command words): {', '.join(missing)}"
    )


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")]


def test_every_relayd_option_is_documented() -> None:
    tags = " ".join(items("relayd.8"))
    missing = [opt for opt in _options(daemon.parser()) if not re.search(rf"{re.escape(opt)}\b", tags)]
    assert not missing, f"relayd options without a .TP item in man/relayd.8: {missing}"


def test_relayctl_global_options_are_documented() -> None:
    tags = " ".join(items("relayctl.1"))
    missing = [opt for opt in _options(ctl.build_parser()) if not re.search(rf"{re.escape(opt)}\b", tags)]
    assert not missing, f"relayctl options without a .TP item in man/relayctl.1: {missing}"


def test_environment_is_documented() -> None:
    text = plain((MAN / "relayd.8").read_text())
    for name in ("RELAYD_", "CONFIGURATION_DIRECTORY", "STATE_DIRECTORY", "CREDENTIALS_DIRECTORY",
                 "NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        assert name in text, name


def test_control_socket_default_is_the_documented_one() -> None:
    for page in ("relayd.8", "relayctl.1", "relayd.toml.5"):
        assert ctl.DEFAULT_SOCKET in plain((MAN / page).read_text()), page


def plugin_sections(page: str) -> dict[tuple[str, str], list[str]]:
    """(tag, name) -> source lines of each `.SS "kind = \\(dqNAME\\(dq"` (or method) section,
    up to the next such section or .SH (other .SS inside a section belong to it)."""
    heading = re.compile(r'^\.SS\s+"?(kind|method) = (?:\\\(dq|")?([\w-]+)')
    sections: dict[tuple[str, str], list[str]] = {}
    current: list[str] | None = None
    for line in (MAN / page).read_text().splitlines():
        match = heading.match(line)
        if match:
            current = sections.setdefault((match[1], match[2]), [])
        elif line.startswith(".SH"):
            current = None
        elif current is not None:
            current.append(line)
    return sections


def section_keys(lines: list[str]) -> set[str]:
    keys = set()
    for index, line in enumerate(lines[:-1]):
        if line.strip() == ".TP":
            match = re.match(r"\[?([A-Za-z_][\w.*-]*)", item_text(lines[index + 1]).strip())
            if match:
                keys.update([match[1], *match[1].split(".")])
    return keys


def test_each_plugin_documents_its_keys_in_its_own_section() -> None:
    # Stricter than the test above: `listener` documented for kind status does not count
    # for kind relay.
    registry = Registry.discover()
    sections = plugin_sections("relayd.toml.5")
    problems = []
    for group, tag in (("components", "kind"), ("auth", "method")):
        for name, cls in sorted(registry.usable(group).items()):
            lines = sections.get((tag, name))
            if lines is None:
                problems.append(f'{tag} = "{name}": no section .SS "{tag} = \\(dq{name}\\(dq"')
                continue
            wanted = set(schema_keys(cls.Config.model_json_schema())) - {tag}
            missing = sorted(wanted - section_keys(lines))
            if missing:
                problems.append(f'{tag} = "{name}": {", ".join(missing)}')
    if problems:
        pytest.fail("keys not documented in their plugin's section of man/relayd.toml.5:\n  "
                    + "\n  ".join(problems))
