"""Listening sockets that outlive configuration generations.

The pool owns one socket object per listening fd, whether relayd bound it or systemd passed
it. Components never get these objects: ``Listener.serving_sockets()`` hands out dups, so a
component's asyncio server can close its copy (asyncio's Server.close() closes the fd it
serves on) while the listening socket stays open and queued connections wait in the kernel
backlog for the next generation. Reloads therefore never refuse a connection.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.accept_gate import UNLIMITED, AcceptGate
from relayd.config.model import ListenerConfig, TLSConfig

log = logging.getLogger("relayd.listeners")


class ListenerError(Exception):
    pass


def parse_bind(bind: str) -> tuple[int, Any]:
    """(family, address) for a bind string; see ListenerConfig.bind."""
    if bind.startswith("unix:"):
        path = bind.removeprefix("unix:")
        return socket.AF_UNIX, ("\0" + path[1:] if path.startswith("@") else path)
    host, _, port = bind.rpartition(":")
    if host.startswith("["):
        return socket.AF_INET6, (host[1:-1], int(port))
    if not host:
        return socket.AF_INET6, ("::", int(port))
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


def port_of(address: str) -> int | None:
    """The TCP port of a listener address as shown in status ("127.0.0.1:80", "[::]:443");
    None for a unix socket."""
    if address.startswith("unix:"):
        return None
    try:
        return int(address.rsplit(":", 1)[1])
    except ValueError:
        return None


def bind_socket(bind: str, backlog: int) -> socket.socket:
    family, address = parse_bind(bind)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:  # e.g. IPv6 disabled on this host, for "PORT" or "[::]:PORT"
        raise ListenerError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    try:
        if family == socket.AF_UNIX:
            # Abstract names ("\0name") have no file to clean up (and Path() rejects NUL).
            if isinstance(address, str) and not address.startswith("\0"):
                _remove_stale_unix_socket(Path(address))
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and address[0] == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    except ListenerError:  # from the stale-socket check: do not leak the fd (a reload may retry)
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _remove_stale_unix_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(mode):
        raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left over from a crash
    else:
        raise ListenerError(f"{path} is in use by another process")
    finally:
        probe.close()


def make_server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(tls.cert), str(tls.key))
        if tls.client_ca:
            context.load_verify_locations(str(tls.client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ListenerError(f"cannot load TLS certificate/key: {exc}") from None
    return context


class ServerTLS:
    """The server certificate of a listener, owned by the SocketPool rather than by a generation.

    Servers are started with *front* contexts (``front()``) whose SNI callback, run at every
    handshake whether or not the client sends SNI, hands the connection the current context.
    A reload re-reads cert and key (``SocketPool.build`` stages the new context, the daemon
    installs it after the swap): components the reload kept serve the renewed certificate to new
    connections, open connections keep the one they shook hands with. One current context per
    ALPN list (OpenSSL selects ALPN with the switched-to context, so it must offer the same).
    """

    def __init__(self, config: TLSConfig, context: ssl.SSLContext) -> None:
        self.config = config
        self._current: dict[tuple[str, ...], ssl.SSLContext] = {(): context}

    def current(self, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        context = self._current.get(alpn)
        if context is None:
            context = self._current[alpn] = _with_alpn(make_server_ssl_context(self.config), alpn)
        return context

    def front(self, alpn: tuple[str, ...] = (), hook: Any = None) -> ssl.SSLContext:
        """A context to start a server with. `hook(sslobj, server_name)` may pick a context
        first (http_proxy's per-service certificates) and return True."""
        front = _with_alpn(make_server_ssl_context(self.config), alpn)
        self.current(alpn)  # made now: a handshake never reads files

        def switch(sslobj: Any, server_name: str | None, context: ssl.SSLContext) -> None:
            if hook is not None and hook(sslobj, server_name):
                return
            current = self._current.get(alpn)
            if current is not None and current is not context:
                sslobj.context = current

        front.sni_callback = switch
        return front

    def install(self, context: ssl.SSLContext) -> None:
        """New handshakes get `context` (freshly loaded from the same files) from now on."""
        renewed: dict[tuple[str, ...], ssl.SSLContext] = {(): context}
        for alpn in self._current:
            if alpn:
                try:
                    renewed[alpn] = _with_alpn(make_server_ssl_context(self.config), alpn)
                except ListenerError as exc:
                    log.error("keeping the old certificate (ALPN %s): %s", ",".join(alpn), exc)
                    renewed[alpn] = self._current[alpn]
        self._current = renewed


def _with_alpn(context: ssl.SSLContext, alpn: tuple[str, ...]) -> ssl.SSLContext:
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def describe_socket(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):
            return "unix:@" + name[1:].decode(errors="replace")
        return f"unix:{name}" if not name.startswith("\0") else "unix:@" + name[1:]
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


@dataclass
class Listener:
    """A named listener of one generation: shared sockets plus this generation's TLS."""

    name: str
    config: ListenerConfig
    sockets: list[socket.socket]
    ssl_context: ssl.SSLContext | None
    activated: bool  # passed by systemd rather than bound by relayd
    tls: ServerTLS | None = None  # the pool's certificate of these sockets (see ServerTLS)
    # Connection count and cap, shared by every generation serving these sockets (SocketPool);
    # a Listener made outside a pool gets its own, capped only by an explicit max_connections.
    gate: AcceptGate | None = None

    def __post_init__(self) -> None:
        if self.gate is None:
            self.gate = AcceptGate(self.name, self.config.max_connections or UNLIMITED, self.sockets)

    def serving_sockets(self) -> list[socket.socket]:
        """Fresh dups of the listening sockets for one server to own and close."""
        dups = []
        for sock in self.sockets:
            dup = socket.socket(fileno=os.dup(sock.fileno()))
            dup.setblocking(False)
            dups.append(dup)
        return dups

    @property
    def backlog(self) -> int:
        """The listen(2) backlog to serve with: asyncio and uvloop call listen() again on the
        (shared) socket when they serve on it, with 100 unless told otherwise. A socket-activated
        TCP socket keeps its unit's Backlog= (Linux reports it in tcp_info.tcpi_sacked)."""
        if self.activated:
            for sock in self.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_INFO"):
                    try:
                        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
                    except OSError:
                        break
                    if len(info) >= 32 and (current := struct.unpack_from("I", info, 28)[0]) > 0:
                        return current
                    break
        return self.config.backlog

    @property
    def addresses(self) -> list[str]:
        return [describe_socket(s) for s in self.sockets]

    @property
    def is_loopback(self) -> bool:
        for sock in self.sockets:
            if sock.family == socket.AF_UNIX:
                continue
            host = sock.getsockname()[0]
            if not (host.startswith("127.") or host == "::1"):
                return False
        return True

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context else "http"


class SocketPool:
    """Every listening socket of the process, keyed by what opened it."""

    def __init__(self, activated: dict[str, list[socket.socket]] | None = None) -> None:
        self.activated = activated or {}
        self._bound: dict[tuple[str, str], list[socket.socket]] = {}  # ("bind", ADDRESS)
        self.gates: dict[tuple[str, object], AcceptGate] = {}
        self.tls: dict[tuple[tuple[str, object], str], ServerTLS] = {}  # (socket key, TLS config)
        self._staged: dict[tuple[tuple[str, object], str], ssl.SSLContext] = {}

    def resolve(self, config: ListenerConfig) -> tuple[tuple[str, object], list[socket.socket], bool]:
        """(key, sockets, activated) for a listener config; binds if needed."""
        if config.fd_name and config.fd_name in self.activated:
            return ("fd", config.fd_name), self.activated[config.fd_name], True
        if config.bind is None:
            passed = ", ".join(sorted(self.activated)) or "none"
            raise ListenerError(
                f"socket {config.fd_name!r} was not passed by systemd (passed: {passed}) and no "
                "'bind' fallback is set"
            )
        key = ("bind", config.bind)
        if key not in self._bound:
            self._bound[key] = [bind_socket(config.bind, config.backlog)]
        return key, self._bound[key], False

    def build(self, name: str, config: ListenerConfig, limit: int = UNLIMITED) -> tuple[tuple[str, object], Listener]:
        """`limit` applies to sockets opened now; those already open keep theirs until the
        daemon applies the new generation's limits (AcceptGate.set_limit) after the swap."""
        key, sockets, activated = self.resolve(config)
        tls = front = None
        if config.tls:
            fresh = make_server_ssl_context(config.tls)  # read now: a bad file rejects the reload
            tls_key = (key, config.tls.model_dump_json())
            tls = self.tls.get(tls_key)
            if tls is None:
                tls = self.tls[tls_key] = ServerTLS(config.tls, fresh)
            else:
                self._staged[tls_key] = fresh  # installed if this generation is swapped in
            front = tls.front()
        gate = self.gates.get(key)
        if gate is None:
            gate = self.gates[key] = AcceptGate(name, limit, sockets)
        return key, Listener(name, config, sockets, front, activated, tls=tls, gate=gate)

    def install_tls(self, in_use: set[tuple[str, object]]) -> None:
        """The generation built last serves: its re-read certificates go to new handshakes."""
        for tls_key, context in self._staged.items():
            if tls_key in self.tls:
                self.tls[tls_key].install(context)
        self._staged.clear()
        # Replaced certificates stay alive as long as a server's front context refers to them.
        self.tls = {k: v for k, v in self.tls.items() if k[0] in in_use}

    def discard_tls(self) -> None:
        """The generation built last was rejected: keep serving the certificates in use."""
        self._staged.clear()

    def release_unused(self, in_use: set[tuple[str, object]]) -> None:
        """Close sockets relayd bound that no generation uses any more."""
        for key in [k for k in self.gates if k not in in_use and k[0] != "fd"]:
            del self.gates[key]
        for key in [k for k in self._bound if k not in in_use]:
            for sock in self._bound.pop(key):
                _close_bound(sock)

    def close_all(self) -> None:
        self.release_unused(set())
        for sockets in self.activated.values():
            for sock in sockets:
                sock.close()  # systemd keeps its own copy; never unlink its paths


def _close_bound(sock: socket.socket) -> None:
    path = sock.getsockname() if sock.family == socket.AF_UNIX else None
    sock.close()
    if isinstance(path, str) and path and not path.startswith("\0"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
