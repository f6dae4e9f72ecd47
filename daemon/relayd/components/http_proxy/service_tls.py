"""Services' own certificates on a TLS listener, chosen by SNI among their server_names.

The listener's certificate is the listener pool's (re-read on every reload); a service with
``cert``/``key`` gets its own context for its names, looked up in the handshake. ``load`` is
called at start (strict: a bad certificate fails the start), after services change, and on
reload (a bad certificate then keeps the service's old one and is logged).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relayd.listeners import ListenerError, make_server_ssl_context

if TYPE_CHECKING:
    from relayd.listeners import Listener

    from .config import ServiceConfig


def tls_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    from relayd.config.model import TLSConfig

    context = make_server_ssl_context(TLSConfig(cert=cert, key=key, client_ca=client_ca))
    context.set_alpn_protocols(["http/1.1"])
    return context


class ServiceCertificates:
    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.contexts: dict[tuple[str, str], ssl.SSLContext] = {}  # (listener, SNI name)

    def server_context(self, listener: Listener, lname: str) -> ssl.SSLContext:
        """The listener's server context, which hands a service's names their own certificate."""
        assert listener.tls is not None

        def service_certificate(sslobj: Any, server_name: str | None) -> bool:
            context = self.contexts.get((lname, (server_name or "").lower()))
            if context is None:
                return False
            sslobj.context = context
            return True

        return listener.tls.front(("http/1.1",), hook=service_certificate)

    def load(self, services: list[tuple[str, ServiceConfig]], strict: bool = False) -> None:
        contexts: dict[tuple[str, str], ssl.SSLContext] = {}
        for name, scfg in services:
            if scfg.cert is None or scfg.key is None:
                continue
            try:
                context = tls_context(scfg.cert, scfg.key)
            except ListenerError as exc:
                if strict:
                    raise ValueError(f"service {name}: {exc}") from None
                self.log.error("service %s: keeping its old certificate: %s", name, exc)
                old = [k for k, v in self.contexts.items() if k[1] in scfg.server_names]
                contexts.update({k: self.contexts[k] for k in old})
                continue
            for lname in scfg.listeners:
                for server_name in scfg.server_names:
                    contexts[(lname, server_name)] = context
        self.contexts = contexts
