"""relayctl commands of the relay component: ``relayctl import proxystore-relay relay.toml``.

Works without a running relayd (``no_daemon``): it only reads the given file and writes a
conf.d fragment (to stdout, or to --output), then lists on stderr what it could not carry over.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path

from relayd.cli.ctl import import_group


def cmd_import(args: argparse.Namespace, client: object) -> int:
    from relayd.components.relay.importer import ConversionError, convert

    try:
        text = Path(args.file).read_text()
    except OSError as exc:
        print(f"relayctl: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    name = args.name or "relay"
    try:
        result = convert(text, name)
    except ConversionError as exc:
        print(f"relayctl: {args.file}: {exc}", file=sys.stderr)
        return 1
    if args.output:
        path = Path(args.output)
        if path.exists() and not args.force:
            print(f"relayctl: {path} exists (use --force to replace it)", file=sys.stderr)
            return 1
        # Another file of the configuration with the same table names: of two conf.d files the
        # later one silently wins key by key (the shipped 60-relay.toml after a 50-relay.toml).
        taken = names_elsewhere(path)
        clashes = _clashes(result.fragment, taken)
        if clashes and args.name is not None:
            print(f"relayctl: {_describe(clashes, taken)}: the imported values would be overridden or "
                  "mixed with those; choose another --name", file=sys.stderr)
            return 1
        if clashes:
            for candidate in _candidates():
                renamed = convert(text, candidate)
                if not _clashes(renamed.fragment, taken):
                    break
            print(f"relayctl: {_describe(clashes, taken)}: naming the imported relay {candidate!r} "
                  f"instead of {name!r} (--name to choose)", file=sys.stderr)
            result = renamed
        for bind, other in _same_binds(result.fragment, path):
            print(f"relayctl: warning: {other} also binds {bind}: disable one of them (e.g. rename "
                  f"{other.name} to {other.name}.disabled)", file=sys.stderr)
        # The fragment may hold a client secret: create it readable by the owner only.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(result.fragment)
        print(f"wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(result.fragment)
    if result.not_carried:
        print("not carried over / changed:", file=sys.stderr)
        for note in result.not_carried:
            print(f"  - {note}", file=sys.stderr)
    return 0


_TABLES = ("listeners", "auth", "components")


def _sibling_files(output: Path) -> list[Path]:
    """The other files of the configuration `output` joins (its directory, and relayd.toml
    above a conf.d directory)."""
    directory = output.parent
    files = [p for p in sorted(directory.glob("*.toml")) if p.resolve() != output.resolve()]
    if directory.name == "conf.d" and (directory.parent / "relayd.toml").is_file():
        files.insert(0, directory.parent / "relayd.toml")
    return files


def _tables(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}


def names_elsewhere(output: Path) -> dict[tuple[str, str], Path]:
    """(table, name) -> the first other file defining [table.name]."""
    found: dict[tuple[str, str], Path] = {}
    for path in _sibling_files(output):
        data = _tables(path)
        for table in _TABLES:
            for key in data.get(table) or {}:
                found.setdefault((table, key), path)
    return found


def _clashes(fragment: str, taken: dict[tuple[str, str], Path]) -> list[tuple[str, str]]:
    data = tomllib.loads(fragment)
    return [(table, key) for table in _TABLES for key in data.get(table) or {} if (table, key) in taken]


def _describe(clashes: list[tuple[str, str]], taken: dict[tuple[str, str], Path]) -> str:
    by_file: dict[Path, list[str]] = {}
    for table, key in clashes:
        by_file.setdefault(taken[(table, key)], []).append(f"[{table}.{key}]")
    return "; ".join(f"{path} already defines {', '.join(names)}" for path, names in by_file.items())


def _candidates():
    yield "proxystore-relay"
    yield "relay-imported"
    for n in range(2, 100):
        yield f"relay-imported-{n}"


def _same_binds(fragment: str, output: Path) -> list[tuple[str, Path]]:
    binds = {str(l.get("bind")) for l in (tomllib.loads(fragment).get("listeners") or {}).values() if l.get("bind")}
    same = []
    for path in _sibling_files(output):
        for listener in (_tables(path).get("listeners") or {}).values():
            if isinstance(listener, dict) and str(listener.get("bind")) in binds:
                same.append((str(listener.get("bind")), path))
    return same


def register(subparsers: argparse._SubParsersAction) -> None:
    p = import_group(subparsers).add_parser(
        "proxystore-relay", help="proxystore-relay TOML -> configuration fragment (no daemon needed)")
    p.add_argument("file", help="the TOML file proxystore-relay was given with --config")
    p.add_argument("--name", default=None, help="name of the relay component, listener and auth (default: "
                   "relay, or proxystore-relay when another file of --output's directory uses relay)")
    p.add_argument("-o", "--output", help="write the fragment here (e.g. /etc/relayd/conf.d/50-relay.toml) "
                   "instead of stdout")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=cmd_import, no_daemon=True)
