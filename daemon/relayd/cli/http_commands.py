"""relayctl commands of the http_proxy component.

    relayctl stats [SERVICE [USER]] [--component NAME] [--json]
    relayctl service list|info NAME [--component NAME]
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


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _classes(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in row["statuses"].items() if v)


def cmd_stats(args: argparse.Namespace, client: ControlClient) -> int:
    component = _component(args, client)
    if component is None:
        return 1
    path = "stats" + "".join(f"/{quote(p, safe='')}" for p in (args.service, args.user) if p)
    status, body = _get(client, component, path)
    if status != 200:
        return _die(body.get("message", body) if isinstance(body, dict) else str(body))
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print(f"{component}: {body['requests']['requests']} requests, in {_fmt_bytes(body['bytesIn'])}, "
          f"out {_fmt_bytes(body['bytesOut'])}, rejected {body['rejected']}")
    for service, entry in body["perService"].items():
        print(f"  {service}: {entry['requests']} requests, in {_fmt_bytes(entry['bytesIn'])}, "
              f"out {_fmt_bytes(entry['bytesOut'])}  {_classes(entry)}")
        for user, row in entry["users"].items():
            print(f"    {user:24} {row['requests']:>10}  in {_fmt_bytes(row['bytesIn']):>10}  "
                  f"out {_fmt_bytes(row['bytesOut']):>10}  {_classes(row)}")
    for endpoint, row in (body.get("endpoints") or {}).items():
        print(f"      {endpoint:40} {row['requests']:>10}  {_classes(row)}")
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
    s.add_argument("--component", help="http_proxy component (default: the only one)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)

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
