"""``relayctl``: drive a running relayd through its control socket.

Exit status: 0 success, 1 refused or failed (e.g. a rejected reload), 2 relayd unreachable
or bad usage. Command groups of components live in their own modules and come in through
the ``relayd.cli`` entry point group, the built-ins exactly as a plugin's: each entry point
names a ``register(subparsers)`` function whose commands set ``func(args, client) -> int``
(and ``no_daemon=True`` when they need no running relayd).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from relayd import __version__
from relayd.cli.control_client import ControlClient, Unreachable

DEFAULT_SOCKET = "/run/relayd-control.sock"  # = ControlConfig.socket and systemd/relayd-control.socket
CLI_GROUP = "relayd.cli"
# The built-in command groups, declared as relayd.cli entry points in pyproject.toml; listed here
# too so that a source tree run without (current) package metadata still has them. A module in
# this list that no entry point names is loaded as if one did.
COMMAND_MODULES: list[str] = ["relayd.cli.auth_commands", "relayd.cli.stream_commands",
                                 "relayd.cli.http_commands", "relayd.cli.relay_commands",
                                 "relayd.cli.browser_commands", "relayd.cli.db_commands"]


def die(message: str, code: int = 1) -> int:
    print(f"relayctl: {message}", file=sys.stderr)
    return code


def socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    if os.environ.get("RELAYD_CONTROL__SOCKET"):
        return os.environ["RELAYD_CONTROL__SOCKET"]
    if args.config:
        from relayd.config import load_config
        from relayd.plugins import Registry

        return load_config(args.config, registry=Registry.discover()).settings.control.socket
    return DEFAULT_SOCKET


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def cmd_status(args: argparse.Namespace, client: ControlClient) -> int:
    status, body = client.request("GET", "/v1/status")
    if status != 200 or not isinstance(body, dict):
        return die(f"status failed: HTTP {status}: {body}")
    if args.json:
        _print_json(body)
        return 0
    print(f"relayd {body['version']}  pid {body['pid']}  up {_duration(body['uptime'])}  "
          f"generation {body['generation']}")
    last = body.get("last_reload")
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["at"]))
        verdict = "ok" if last["ok"] else "REJECTED"
        print(f"last reload: {verdict} at {when}: {last['message']}")
        for error in last.get("errors", []):
            print(f"  {error}")
    print("listeners:")
    for name, info in body["listeners"].items():
        extra = " tls" if info["tls"] else ""
        extra += " (socket-activated)" if info["activated"] else ""
        if info.get("max_connections") is not None:
            open_ = info.get("connections")
            extra += f"  connections {'-' if open_ is None else open_}/{info['max_connections']}"
            extra += "" if info.get("accepting", True) else " (AT LIMIT: not accepting)"
        print(f"  {name:16} {', '.join(info['addresses'])}{extra}")
    engines = body.get("engines") or {}
    if engines:
        print(f"node: {body.get('node')}")
        print("engines:")
        for name, info in engines.items():
            state = "up" if info["up"] else "DOWN"
            since = time.strftime("%H:%M:%S", time.localtime(info["since"]))
            print(f"  {name:16} {info['engine']:12} {state:5} since {since}  {info['url']}  ({info['detail']})")
    print("components:")
    for name, info in body["components"].items():
        counts = ", ".join(f"{k}={v}" for k, v in info.items()
                           if k not in ("kind", "state", "warnings") and not isinstance(v, (dict, list)))
        print(f"  {name:16} {info['kind']:12} {info['state']:9} {counts}")
        for warning in info.get("warnings", []):
            print(f"  !! {warning}")
    if body.get("draining"):
        print(f"draining (replaced or removed): {', '.join(body['draining'])}")
    return 0


def cmd_reload(args: argparse.Namespace, client: ControlClient) -> int:
    status, body = client.request("POST", "/v1/reload")
    if not isinstance(body, dict):
        return die(f"reload failed: HTTP {status}: {body}")
    if args.json:
        _print_json(body)
    elif body["ok"]:
        changed = ", ".join(body.get("changed") or []) or "no changes"
        print(f"reloaded: generation {body['generation']} ({changed})")
    else:
        print(f"relayctl: reload rejected: {body['message']}", file=sys.stderr)
        for error in body["errors"]:
            print(f"  {error}", file=sys.stderr)
    return 0 if body["ok"] else 1


def cmd_check(args: argparse.Namespace, client: ControlClient) -> int:
    status, body = client.request("POST", "/v1/check")
    if not isinstance(body, dict):
        return die(f"check failed: HTTP {status}: {body}")
    if body["ok"]:
        print("configuration on disk is valid")
        return 0
    for error in body["errors"]:
        print(error, file=sys.stderr)
    return 1


def cmd_config(args: argparse.Namespace, client: ControlClient) -> int:
    status, body = client.request("GET", "/v1/config" + ("?origins=1" if args.origins else ""))
    if status != 200:
        return die(f"config failed: HTTP {status}: {body}")
    for warning in body.get("warnings", []):
        print(f"relayctl: warning: {warning}", file=sys.stderr)
    if args.json:
        _print_json(body)
    elif args.origins:
        rows = body["origins"]
        width = max((len(r[0]) for r in rows), default=0)
        for key, value, origin in rows:
            print(f"{key:{width}} = {json.dumps(value)}    # {origin}")
    else:
        print(_to_toml(body["config"]).strip())
    return 0


def _to_toml(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """Render the effective config as TOML that tomllib reads back; nulls are omitted (TOML has none)."""
    out: list[str] = []
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, dict) and v is not None]
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict)]
    # An empty table still gets its header: [scope_maps.x] with no servers must not vanish.
    if prefix and (scalars or not tables):
        out.append(f"[{'.'.join(_key(p) for p in prefix)}]")
    out += [f"{_key(k)} = {_toml_value(v)}" for k, v in scalars]
    if out:
        out.append("")
    for key, value in tables:
        out.append(_to_toml(value, prefix + (key,)))
    return "\n".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + items + "}"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    """A TOML basic string (json.dumps would write surrogate pairs, which TOML forbids)."""
    escaped = []
    for char in text:
        if char in "\\\"":
            escaped.append("\\" + char)
        elif char < " " or char == "\x7f":
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else _toml_string(key)


def cmd_plugins(args: argparse.Namespace, client: ControlClient | None) -> int:
    if args.local or client is None:
        from relayd.plugins import Registry

        rows = Registry.discover().describe()
    else:
        status, body = client.request("GET", "/v1/plugins")
        if status != 200 or not isinstance(body, dict):
            return die(f"plugins failed: HTTP {status}: {body}")
        rows = body["plugins"]
    if args.json:
        _print_json(rows)
        return 0
    for row in rows:
        state = f"BROKEN: {row['error']}" if row["error"] else "ok"
        print(f"{row['group']:18} {row['name']:14} {row['distribution']:22} {row['target']:45} {state}")
    return 1 if any(r["error"] for r in rows) else 0


def cmd_clients(args: argparse.Namespace, client: ControlClient) -> int:
    status, body = client.request("GET", f"/v1/components/{args.component}/clients")
    if status != 200:
        return die(body.get("message", body) if isinstance(body, dict) else str(body))
    if args.json:
        _print_json(body)
        return 0
    rows = body["clients"]
    if not rows:
        print(f"{args.component}: no clients")
        return 0
    keys = list(rows[0])
    print("  ".join(keys))
    for row in rows:
        print("  ".join(str(row.get(k, "")) for k in keys))
    return 0


def cmd_metrics(args: argparse.Namespace, client: ControlClient) -> int:
    status, body = client.request("GET", "/v1/metrics")
    print(body, end="")
    return 0 if status == 200 else 1


def import_group(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """`relayctl import FORMAT ...`, shared by every component's importer (first one creates it)."""
    parser = subparsers.choices.get("import")
    if parser is None:
        parser = subparsers.add_parser("import", help="convert other tools' configuration to relayd's")
        parser.add_subparsers(dest="import_format", required=True, metavar="FORMAT")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError("the 'import' command has no sub-commands")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayctl", description="control a running relayd")
    p.add_argument("--socket", help=f"control socket (default: $RELAYD_CONTROL__SOCKET or {DEFAULT_SOCKET})")
    p.add_argument("--config", type=Path, help="read the control socket path from this configuration")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for relayd")
    p.add_argument("--version", action="version", version=f"relayctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("status", help="generation, uptime, last reload, components")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("reload", help="reload the configuration; exit 1 if it was rejected")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_reload)
    s = sub.add_parser("check", help="ask relayd to validate the configuration on disk")
    s.set_defaults(func=cmd_check)
    s = sub.add_parser("config", help="print the effective configuration (secrets redacted)")
    s.add_argument("--origins", action="store_true", help="show the file or variable of each value")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_config)
    s = sub.add_parser("plugins", help="list installed component kinds and auth methods")
    s.add_argument("--json", action="store_true")
    s.add_argument("--local", action="store_true", help="inspect this Python environment, not the daemon")
    s.set_defaults(func=cmd_plugins, offline_ok=True)
    s = sub.add_parser("clients", help="list the live clients of a component")
    s.add_argument("component")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_clients)
    s = sub.add_parser("metrics", help="print Prometheus metrics")
    s.set_defaults(func=cmd_metrics)
    for module, load in command_groups():
        # One broken command group must not take status/reload away from the operator.
        try:
            load()(sub)
        except Exception as exc:
            print(f"relayctl: commands from {module} are unavailable: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
    return p


def command_groups() -> list[tuple[str, Callable[[], Callable[[Any], None]]]]:
    """(module, loader of its register function) of every relayctl command group: relayd's own
    entry points in COMMAND_MODULES order, then other distributions' by name, then
    COMMAND_MODULES that no entry point named."""
    order = {module: index for index, module in enumerate(COMMAND_MODULES)}  # metadata sorts by name
    points = list(entry_points(group=CLI_GROUP))
    points.sort(key=lambda ep: (ep.dist is None or ep.dist.name != "relayd", order.get(ep.module, len(order)),
                                ep.dist.name if ep.dist else "", ep.name))
    groups: list[tuple[str, Callable[[], Callable[[Any], None]]]] = []
    seen: set[str] = set()
    for ep in points:
        if ep.module in seen:
            continue
        seen.add(ep.module)
        groups.append((ep.module, ep.load))
    for module in COMMAND_MODULES:
        if module not in seen:
            seen.add(module)
            groups.append((module, _register_of(module)))
    return groups


def _register_of(module: str) -> Callable[[], Callable[[Any], None]]:
    def load() -> Callable[[Any], None]:
        register: Callable[[Any], None] = importlib.import_module(module).register
        return register

    return load


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "no_daemon", False):
        return args.func(args, None)
    from relayd.config import ConfigError

    try:
        client = ControlClient(socket_path(args), args.timeout)
        return args.func(args, client)
    except ConfigError as exc:  # --config names a file relayctl could not read
        return die("cannot find the control socket from --config:\n  " + "\n  ".join(
            str(p) for p in exc.problems), 2)
    except Unreachable as exc:
        if getattr(args, "offline_ok", False):
            return args.func(args, None)
        return die(str(exc), 2)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
