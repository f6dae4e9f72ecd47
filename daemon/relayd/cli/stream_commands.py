"""``relayctl stream ...`` (the s2uc workflow against any scistream.Control server) and
``relayctl sessions NAME`` (sessions of a local stream component).

    relayctl stream inbound-request --s2cs HOST:PORT [--num_conn N] [--rate R]
        [--remote_ip IP] [--receiver_ports P1,P2] [--server_cert F] [--scope S] [--json]
    relayctl stream outbound-request --s2cs HOST:PORT [...] UID PROD_LSTN[,PROD_LSTN...]
    relayctl stream release --s2cs HOST:PORT [--server_cert F] [--scope S] UID

The token comes from ``relayctl login`` (relayd.auth.client): the server's scope is --scope,
else the client file's scope maps; an unmapped server is an error that says how to map it
(never SciStream's silent "INVALID_TOKEN"). --no-auth sends no token (auth-less servers).
Exit status: 0 ok, 1 refused by the server or bad input, 2 server unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

S2UC_RECEIVER_PORTS = "5074,5075,5076,37000,47000"


class CommandError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _token(args: argparse.Namespace) -> str | None:
    if args.no_auth:
        return None
    from relayd.auth import scopes
    from relayd.auth.client import ClientConfigError, ClientSettings, NeedLogin, token_for_scope

    try:
        settings = ClientSettings.load()
        scope = args.scope
        if not scope:
            # No discovery: a gRPC control server has no /.well-known document to ask.
            scope = scopes.lookup(settings.scope_maps, args.s2cs,
                                  where=f"[scope_maps.NAME.servers] in {settings.path}")
        return token_for_scope(scope, settings=settings)
    except scopes.UnmappedServer as exc:
        raise CommandError(f"{exc}; or pass --scope SCOPE, or --no-auth if {args.s2cs} runs without "
                           "authentication") from None
    except (NeedLogin, ClientConfigError, ValueError) as exc:
        raise CommandError(str(exc)) from None


def _client(args: argparse.Namespace) -> Any:
    from relayd.components.stream.client import StreamClient, client_ssl

    try:
        context = None if args.insecure else client_ssl(args.server_cert)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise CommandError(f"--server_cert {args.server_cert}: {exc}") from None
    try:
        return StreamClient(args.s2cs, ssl_context=context, token=_token(args), timeout=args.rpc_timeout)
    except ValueError as exc:
        raise CommandError(f"--s2cs: {exc}") from None


def _ports(text: str) -> list[int]:
    try:
        ports = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise CommandError(f"--receiver_ports: expected comma-separated ports, not {text!r}") from None
    if not ports or not all(0 < p < 65536 for p in ports):
        raise CommandError("--receiver_ports: ports must be 1-65535")
    return ports


def _endpoints(ip: str, ports: list[int]) -> list[str]:
    host = f"[{ip}]" if ":" in ip else ip
    return [f"{host}:{p}" for p in ports]


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    client = _client(args)
    async with client:
        if args.stream_command == "release":
            await client.release(args.uid)
            return {"uid": args.uid, "s2cs": args.s2cs, "released": True}
        apps = _endpoints(args.remote_ip, _ports(args.receiver_ports))
        if args.stream_command == "inbound-request":
            uid = args.uid or str(uuid.uuid4())
            result = await client.open_session(uid, "PROD", args.num_conn, args.rate, apps, apps)
        else:
            targets = [t.strip() for t in args.prod_listeners.split(",") if t.strip()]
            result = await client.open_session(args.uid, "CONS", args.num_conn, args.rate, apps, targets)
        return {"uid": result.uid, "s2cs": args.s2cs, "role": result.role,
                "listeners": result.listeners, "targets": result.targets}


def cmd_stream(args: argparse.Namespace, _client_unused: Any) -> int:
    from grpclib.const import Status
    from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

    try:
        out = asyncio.run(_run(args))
    except CommandError as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return exc.code
    except GRPCError as exc:
        if exc.status is Status.UNAUTHENTICATED:
            print(f"relayctl: Please obtain new credentials: {exc.message} "
                  "(relayctl login --scope SCOPE)", file=sys.stderr)
        else:
            print(f"relayctl: {args.stream_command} refused by {args.s2cs}: {exc.status.name}: {exc.message}",
                  file=sys.stderr)
        return 1
    except (TimeoutError, OSError) as exc:
        print(f"relayctl: cannot reach {args.s2cs}: {exc or type(exc).__name__}", file=sys.stderr)
        return 2
    except (StreamTerminatedError, ProtocolError) as exc:
        hint = " (a TLS server? drop --insecure)" if args.insecure else ""
        print(f"relayctl: {args.s2cs} closed the connection: {exc}{hint}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2))
    elif "released" in out:
        print(f"released {out['uid']}")
    else:
        print(f"uid: {out['uid']}")
        print(f"role: {out['role']}")
        print(f"listeners: {','.join(out['listeners'])}")
        print(f"targets: {','.join(out['targets'])}")
    return 0


def cmd_sessions(args: argparse.Namespace, client: Any) -> int:
    status, body = client.request("GET", f"/v1/components/{args.component}/sessions")
    if status != 200:
        message = body.get("message", body) if isinstance(body, dict) else body
        print(f"relayctl: {args.component}: {message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    rows = body["sessions"]
    if not rows:
        print(f"{args.component}: no sessions")
        return 0
    keys = ["uid", "role", "state", "owner", "listeners", "targets", "bytes_to_target",
            "bytes_from_target", "connections", "rate"]
    table = [keys] + [[str(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(keys))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"(rate in {body.get('rate_unit', '?')}, 0 = unlimited)")
    return 0


def _common(p: argparse.ArgumentParser, default_s2cs: str) -> None:
    p.add_argument("--s2cs", default=default_s2cs, help=f"control server HOST:PORT (default {default_s2cs})")
    p.add_argument("--server_cert", "--server-cert", type=Path,
                   help="CA/certificate the control server's TLS certificate must chain to (default: system CAs)")
    p.add_argument("--insecure", action="store_true", help="plain-text gRPC (development servers only)")
    p.add_argument("--scope", help="Globus scope of the server (default: from the client scope maps)")
    p.add_argument("--no-auth", action="store_true", help="send no token (server without authentication)")
    p.add_argument("--rpc-timeout", type=float, default=200.0,
                   help="seconds to wait for each call (req waits for the hello)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stream, no_daemon=True)


def _session_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num_conn", "--num-conn", type=int, default=5, help="ports (port mappings) of the session")
    p.add_argument("--rate", type=int, default=0,
                   help="rate limit per direction in the server's rate unit (relayd: kB/s); 0 = unlimited")
    p.add_argument("--remote_ip", "--remote-ip", default="localhost", help="the application's host")
    p.add_argument("--receiver_ports", "--receiver-ports", default=S2UC_RECEIVER_PORTS,
                   help="the application's ports, comma-separated")


def register(sub: argparse._SubParsersAction) -> None:
    stream = sub.add_parser("stream", help="SciStream client (s2uc): open and release stream sessions")
    ss = stream.add_subparsers(dest="stream_command", required=True, metavar="COMMAND")
    p = ss.add_parser("inbound-request", help="producer facility: proxy ports to the application's ports")
    _common(p, "localhost:5000")
    _session_options(p)
    p.add_argument("--uid", help="session id (default: a random uuid4)")
    p = ss.add_parser("outbound-request", help="consumer facility: proxy ports to the inbound listeners")
    _common(p, "localhost:6000")
    _session_options(p)
    p.add_argument("uid", help="the uid printed by inbound-request")
    p.add_argument("prod_listeners", help="the listeners printed by inbound-request, comma-separated")
    p = ss.add_parser("release", help="end a session and free its ports")
    _common(p, "localhost:5000")
    p.add_argument("uid")

    p = sub.add_parser("sessions", help="list the sessions of a stream component")
    p.add_argument("component")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sessions)
