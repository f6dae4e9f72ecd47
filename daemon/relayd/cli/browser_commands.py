"""relayctl commands for browser sessions (``globus_login`` on http_proxy components).

    relayctl sessions --browser COMPONENT [--json]   live sessions: identity, created, last seen, expiry
    relayctl logout-user IDENTITY [--component NAME] end an identity's sessions (id or username)

Never shows tokens or session ids: the daemon does not send them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from relayd.cli.control_client import ControlClient


def _die(message: str, code: int = 1) -> int:
    print(f"relayctl: {message}", file=sys.stderr)
    return code


def _when(value: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value)) if value else "-"


def cmd_sessions(args: argparse.Namespace, client: ControlClient) -> int:
    status, body = client.request("GET", f"/v1/components/{args.browser}/browser-sessions")
    if status != 200:
        return _die(body.get("message", body) if isinstance(body, dict) else str(body))
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    rows = body["sessions"]
    if not rows:
        print(f"{args.browser}: no browser sessions")
        return 0
    print(f"{'AUTH':12} {'IDENTITY':38} {'USERNAME':30} {'CREATED':19}  {'LAST SEEN':19}  {'ENDS':19}")
    for row in rows:
        ends = min(x for x in (row["expires"], row.get("idle_expires")) if x)
        print(f"{row['auth']:12} {row['sub']:38} {row.get('username') or '-':30} {_when(row['created'])}  "
              f"{_when(row['last_seen'])}  {_when(ends)}")
    return 0


def _components(args: argparse.Namespace, client: ControlClient) -> list[str]:
    if args.component:
        return [args.component]
    status, body = client.request("GET", "/v1/status")
    if status != 200 or not isinstance(body, dict):
        return []
    return [n for n, c in body.get("components", {}).items() if c.get("kind") == "http_proxy"]


def cmd_logout_user(args: argparse.Namespace, client: ControlClient) -> int:
    names = _components(args, client)
    if not names:
        return _die("no http_proxy component is running")
    ended: dict[str, Any] = {}
    for name in names:
        status, body = client.request("POST", f"/v1/components/{name}/browser-sessions/logout",
                                      {"identity": args.identity})
        if status != 200:
            return _die(body.get("message", body) if isinstance(body, dict) else str(body))
        ended[name] = body["ended"]
    if args.json:
        print(json.dumps({"identity": args.identity, "ended": ended}, indent=2))
    else:
        total = sum(ended.values())
        print(f"{args.identity}: {total} browser session(s) ended; their Globus tokens are being revoked")
    return 0 if sum(ended.values()) else 1


def register(sub: Any) -> None:
    browser_help = "list the live browser sessions (globus_login) of this http_proxy component"
    s = sub.choices.get("sessions")
    if s is None:
        s = sub.add_parser("sessions", help="live browser sessions (globus_login) of an http_proxy component")
        s.add_argument("--browser", metavar="COMPONENT", required=True, help=browser_help)
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=cmd_sessions)
    else:
        # `relayctl sessions COMPONENT` (the stream component's) gains `--browser COMPONENT`.
        s.add_argument("--browser", metavar="COMPONENT", help=browser_help)
        for action in s._actions:
            if action.dest == "component" and not action.option_strings:
                action.nargs = "?"
                action.default = None
        other = s.get_default("func")

        def either(args: argparse.Namespace, client: ControlClient) -> int:
            if args.browser:
                return cmd_sessions(args, client)
            if not args.component:
                return _die("name a component, or --browser COMPONENT", 2)
            return other(args, client)

        s.set_defaults(func=either)
    s = sub.add_parser("logout-user", help="end every browser session of an identity (id or username) "
                       "and revoke its Globus tokens")
    s.add_argument("identity")
    s.add_argument("--component", help="http_proxy component (default: all)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_logout_user)
