"""relayctl commands of the http_proxy component.

    relayctl stats [SERVICE [USER]] [--history] [--component NAME] [--json]
    relayctl service list|info NAME [--component NAME]
    relayctl members list|add|remove SERVICE [USER] [--create] [--component NAME] [--json]
    relayctl import http-auth SERVICE.json [--component NAME] [--auth NAME] [-o FILE]

``import http-auth`` needs no running daemon: it converts a ya-runtime-http-auth service
definition into a configuration fragment (listeners + one service) for conf.d/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from relayd.cli.control_client import ControlClient
from relayd.cli.ctl import import_group


def _die(message: str, code: int = 1) -> int:
    print(f"relayctl: {message}", file=sys.stderr)
    return code


def _component(args: argparse.Namespace, client: ControlClient) -> str | None:
    if args.component:
        return args.component
    status, body = client.request("GET", "/v1/status")
    if status != 200 or not isinstance(body, dict):
        return None
    names = [n for n, c in body.get("components", {}).items() if c.get("kind") == "http_proxy"]
    if len(names) == 1:
        return names[0]
    if not names:
        _die("no http_proxy component is running")
    else:
        _die(f"several http_proxy components ({', '.join(names)}): pick one with --component")
    return None


def _get(client: ControlClient, component: str, path: str) -> tuple[int, Any]:
    return client.request("GET", f"/v1/components/{quote(component)}/{path}")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _classes(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in row["statuses"].items() if v)


def _row(row: dict[str, Any]) -> str:
    return (f"{row['requests']:>10}  in {_fmt_bytes(row['bytesIn']):>10}  out {_fmt_bytes(row['bytesOut']):>10}  "
            f"{_classes(row)}")


def _span(entry: dict[str, Any]) -> str:
    return f"{entry.get('createdAt') or '?'} .. {entry.get('deletedAt') or 'now'}"


def cmd_stats(args: argparse.Namespace, client: ControlClient) -> int:
    component = _component(args, client)
    if component is None:
        return 1
    route = "history" if args.history else "usage"
    path = route + "".join(f"/{quote(p, safe='')}" for p in (args.service, args.user) if p)
    status, body = _get(client, component, path)
    if status != 200:
        return _die(body.get("message", body) if isinstance(body, dict) else str(body))
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    if args.history:
        _print_history(component, body)
    else:
        _print_usage(component, body)
    if body.get("unsaved"):
        print(f"  ({body['unsaved']} counted requests not yet in the database"
              + (f": {body['saveError']}" if body.get("saveError") else "") + ")")
    return 0


def _print_usage(component: str, body: dict[str, Any]) -> None:
    print(f"{component}: {body['requests']} requests, in {_fmt_bytes(body['bytesIn'])}, "
          f"out {_fmt_bytes(body['bytesOut'])}, rejected {body['rejected']} "
          f"({body['users']} users, {body['services']} services; current incarnations)")
    for service, entry in body["perService"].items():
        print(f"  {service} #{entry['incarnation']}: {entry['requests']} requests, in {_fmt_bytes(entry['bytesIn'])}, "
              f"out {_fmt_bytes(entry['bytesOut'])}, rejected {entry['rejected']}  {_classes(entry)}")
        for user, row in entry["users"].items():
            label = f"{user} #{row['incarnation']}" + ("" if row["deletedAt"] is None else " (removed)")
            print(f"    {label:28} {_row(row)}")
    for endpoint, row in (body.get("endpoints") or {}).items():
        print(f"      {endpoint:40} {row['requests']:>10}  {_classes(row)}")


def _print_history(component: str, body: dict[str, Any]) -> None:
    print(f"{component}: every incarnation (a user or service created again starts a new one)")
    for entry in body["services"]:
        print(f"  {entry['name']} #{entry['incarnation']} ({entry['origin']}, {_span(entry)}): "
              f"{entry['requests']} requests, rejected {entry['rejected']}"
              + (f"  [{entry['note']}]" if entry.get("note") else ""))
        for user in entry["users"]:
            label = f"{user['username']} #{user['incarnation']}" + (" member" if user["member"] else "")
            print(f"    {label:28} {_span(user):60} {_row(user)}")
            for endpoint, row in (user.get("endpoints") or {}).items():
                print(f"      {endpoint:40} {row['requests']:>10}  {_classes(row)}")


def cmd_members(args: argparse.Namespace, client: ControlClient) -> int:
    component = _component(args, client)
    if component is None:
        return 1
    service = quote(args.service, safe="")
    base = f"/v1/components/{quote(component)}/services/{service}"
    if args.action == "list":
        status, body = client.request("GET", f"{base}/members")
        if status != 200:
            return _die(body.get("message", body) if isinstance(body, dict) else str(body))
        if args.json:
            print(json.dumps(body, indent=2))
        else:
            for member in body:
                print(f"{member['username']}\t{member['createdAt']}")
        return 0
    if not args.user:
        return _die(f"members {args.action} needs SERVICE and USER", 2)
    if args.action == "add":
        if args.create:
            from relayd.cli.auth_commands import _read_password

            try:
                password = _read_password(confirm=True)
            except ValueError as exc:
                return _die(str(exc))
            status, body = client.request("POST", f"{base}/users", {"username": args.user, "password": password})
        else:
            status, body = client.request("POST", f"{base}/members", {"username": args.user})
        if status != 200:
            return _die(body.get("message", body) if isinstance(body, dict) else str(body))
        print(f"{args.user} is a member of {args.service} (since {body['createdAt']}; counting from 0)")
        return 0
    status, body = client.request("DELETE", f"{base}/members/{quote(args.user, safe='')}")
    if status != 200:
        return _die(body.get("message", body) if isinstance(body, dict) else str(body))
    print(f"{args.user} is no longer a member of {args.service} (its counts are kept)")
    return 0


def cmd_service(args: argparse.Namespace, client: ControlClient) -> int:
    component = _component(args, client)
    if component is None:
        return 1
    if args.action == "list":
        status, body = _get(client, component, "services")
    else:
        if not args.name:
            return _die("service info needs a service NAME", 2)
        status, body = _get(client, component, f"services/{quote(args.name, safe='')}/info")
    if status != 200:
        return _die(body.get("message", body) if isinstance(body, dict) else str(body))
    if args.action == "list" and not args.json:
        for service in body:
            print(f"{service['name']:24} {service['from']:20} -> {service['to']:32} {service['origin']}")
        return 0
    print(json.dumps(body, indent=2))
    return 0


def cmd_import_http_auth(args: argparse.Namespace, client: None) -> int:
    from relayd.components.http_proxy.compat import CompatError, parse_service, to_toml

    try:
        data = json.loads(Path(args.file).read_text())
        parsed = parse_service(data)
    except OSError as exc:
        return _die(f"cannot read {args.file}: {exc.strerror}")
    except json.JSONDecodeError as exc:
        return _die(f"{args.file}: not JSON: {exc}")
    except CompatError as exc:
        return _die(f"{args.file}: {exc}")
    text = to_toml(parsed, args.component, args.auth)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}; check it with `relayd --check`, then `relayctl reload`", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def register(sub: Any) -> None:
    s = sub.add_parser("stats", help="http_proxy usage counters [SERVICE [USER]]")
    s.add_argument("service", nargs="?")
    s.add_argument("user", nargs="?")
    s.add_argument("--history", action="store_true",
                   help="every incarnation of the services and users, with created/deleted times")
    s.add_argument("--component", help="http_proxy component (default: the only one)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("members", help="http_proxy service members: list SERVICE, add|remove SERVICE USER")
    s.add_argument("action", choices=["list", "add", "remove"])
    s.add_argument("service")
    s.add_argument("user", nargs="?")
    s.add_argument("--create", action="store_true",
                   help="add: also create the user in the service's basic auth method (password from a "
                   "prompt or stdin)")
    s.add_argument("--component", help="http_proxy component (default: the only one)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_members)

    s = sub.add_parser("service", help="http_proxy services: list, info NAME")
    s.add_argument("action", choices=["list", "info"])
    s.add_argument("name", nargs="?")
    s.add_argument("--component", help="http_proxy component (default: the only one)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_service)

    s = import_group(sub).add_parser(
        "http-auth", help="ya-runtime-http-auth service JSON -> configuration fragment (no daemon needed)")
    s.add_argument("file", help="service definition (JSON)")
    s.add_argument("--component", default="http", help="http_proxy component name (default: http)")
    s.add_argument("--auth", default="users", help="auth method of the service (default: users)")
    s.add_argument("-o", "--output", help="write the fragment here instead of stdout")
    s.set_defaults(func=cmd_import_http_auth, no_daemon=True)
