"""``relayd``: run the daemon, or check its configuration (``relayd --check``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from relayd import __version__
from relayd.config import DEFAULT_CONFIG, ConfigError, load_config
from relayd.plugins import Registry


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayd", description="relayd: relay, proxy and stream daemon")
    p.add_argument("-c", "--config", type=Path, default=None, metavar="PATH",
                   help="configuration file or directory (default: $CONFIGURATION_DIRECTORY or /etc/relayd)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one setting; highest precedence; repeatable")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit 0 (ok) or 1")
    p.add_argument("--schema", choices=["full", "fragment"], help="print the JSON Schema of the configuration")
    p.add_argument("--version", action="version", version=f"relayd {__version__}")
    return p


def default_config_path() -> Path:
    import os

    directory = os.environ.get("CONFIGURATION_DIRECTORY")  # set by ConfigurationDirectory=
    return Path(directory.split(":")[0]) if directory else DEFAULT_CONFIG


def check(config_path: Path, overrides: list[str], registry: Registry) -> int:
    from relayd.listeners import ListenerError, make_server_ssl_context

    try:
        loaded = load_config(config_path, registry=registry, overrides=overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"relayd: {problem}", file=sys.stderr)
        print(f"relayd: configuration {config_path} is invalid", file=sys.stderr)
        return 1
    failed = False
    for name, listener in loaded.settings.listeners.items():
        if listener.tls:
            try:
                make_server_ssl_context(listener.tls)
            except ListenerError as exc:
                origin = loaded.origins.get(("listeners", name, "tls"), "")
                print(f"relayd: {origin}: listeners.{name}.tls: {exc}", file=sys.stderr)
                failed = True
    if failed:
        return 1
    for warning in loaded.warnings:
        print(f"relayd: warning: {warning}", file=sys.stderr)
    settings = loaded.settings
    print(f"relayd: configuration {config_path} is valid: {len(loaded.files)} file(s), "
          f"{len(settings.listeners)} listener(s), {len(settings.auth)} auth method(s), "
          f"{len(settings.components)} component(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    registry = Registry.discover()
    config_path = args.config or default_config_path()
    if args.schema:
        from relayd.schema import settings_schema

        print(json.dumps(settings_schema(registry, fragment=args.schema == "fragment"), indent=2))
        return 0
    if args.check:
        return check(config_path, args.set, registry)

    import uvloop

    from relayd.logsetup import configure_logging
    from relayd.runtime import Daemon, DaemonOptions

    configure_logging()
    try:
        daemon = Daemon(DaemonOptions(config_path, args.set), registry)
    except ValueError as exc:  # a malformed NOTIFY_SOCKET or LISTEN_FDS from the service manager
        logging.getLogger("relayd").error("%s", exc)
        return 1
    try:
        return uvloop.run(daemon.run())
    except KeyboardInterrupt:
        return 0
    except Exception:
        logging.getLogger("relayd").critical("relayd crashed", exc_info=True)
        return 70  # EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
