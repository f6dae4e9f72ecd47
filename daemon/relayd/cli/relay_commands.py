"""relayctl commands of the relay component: ``relayctl import proxystore-relay relay.toml``.

Works without a running relayd (``no_daemon``): it only reads the given file and writes a
conf.d fragment (to stdout, or to --output), then lists on stderr what it could not carry over.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from relayd.cli.ctl import import_group


def cmd_import(args: argparse.Namespace, client: object) -> int:
    from relayd.components.relay.importer import ImportError_, convert

    try:
        text = Path(args.file).read_text()
    except OSError as exc:
        print(f"relayctl: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        result = convert(text, args.name)
    except ImportError_ as exc:
        print(f"relayctl: {args.file}: {exc}", file=sys.stderr)
        return 1
    if args.output:
        path = Path(args.output)
        if path.exists() and not args.force:
            print(f"relayctl: {path} exists (use --force to replace it)", file=sys.stderr)
            return 1
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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = import_group(subparsers).add_parser(
        "proxystore-relay", help="proxystore-relay TOML -> configuration fragment (no daemon needed)")
    p.add_argument("file", help="the TOML file proxystore-relay was given with --config")
    p.add_argument("--name", default="relay", help="name of the relay component, listener and auth (default: relay)")
    p.add_argument("-o", "--output", help="write the fragment here (e.g. /etc/relayd/conf.d/50-relay.toml) "
                   "instead of stdout")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    p.set_defaults(func=cmd_import, no_daemon=True)
