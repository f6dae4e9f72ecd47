"""``kind = "relay"``: a ProxyStore-compatible WebSocket relay, hardened.

Wire-compatible with ``proxystore-relay`` (``proxystore.p2p.relay.client.RelayClient`` works
unchanged): see ``protocol.py`` for the messages and close codes, ``server.py`` for the
asyncio shell, relayd.toml(5) for the keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from relayd.component import Component, Context
from relayd.components.relay.cluster import ClusterBus
from relayd.components.relay.config import RelayConfig
from relayd.components.relay.server import RelayServer
from relayd.engines import EngineHealth, redact_url
from relayd.logsetup import access_logger
from relayd.metric_families import Metric, counter, gauge


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RelayComponent(Component):
    Config = RelayConfig
    config: RelayConfig

    def __init__(self, name: str, config: RelayConfig, context: Context) -> None:
        super().__init__(name, config, context)
        # Every attribute here, no I/O (relayd.lifecycle): stop() is safe after a failed start.
        self.server = RelayServer(config, context.auth_method(config.auth), self.log)
        self.server.access = access_logger(name) if config.access_log else None
        self.bus: ClusterBus | None = None
        self._logger: asyncio.Task | None = None

    async def start(self) -> None:
        cluster = self.context.cluster
        if cluster is not None and cluster.redis is not None:
            url = cluster.redis.get_secret_value()
            if self.context.engines is not None:
                health = self.context.engines.register("cluster", "redis", url)
            else:
                health = EngineHealth("cluster", "redis", redact_url(url))
            self.bus = ClusterBus(url, cluster.node, self.name, self.server.core, self.server.execute,
                                  health, self.log)
            self.server.core.clustered = True
            self.server.cluster = self.bus
            self.bus.start()
        listener = self.context.listener(self.config.listener)
        await self.server.start(listener)
        scheme = "wss" if listener.ssl_context else "ws"
        self.log.info("relay listening on %s (auth %s)",
                      ", ".join(f"{scheme}://{a}" for a in listener.addresses), self.config.auth)
        if self.config.current_clients_interval:
            self._logger = asyncio.get_running_loop().create_task(
                self._log_clients(self.config.current_clients_interval))

    async def stop(self, drain_timeout: float) -> None:
        if self._logger:
            self._logger.cancel()
        if self.bus is not None:
            self.bus.closing()
        await self.server.stop(drain_timeout)
        if self.bus is not None:
            await self.bus.stop()

    def listener_names(self) -> set[str]:
        return {self.config.listener}

    async def _log_clients(self, interval: float) -> None:
        """proxystore-relay's periodic log: the count, and the clients when 0 < N < limit."""
        limit = self.config.current_clients_limit
        while True:
            await asyncio.sleep(interval)
            clients = self.server.core.clients()
            lines = [f"Connected clients: {len(clients)}"]
            if limit is not None and 0 < len(clients) < limit:
                lines += [f"  {c.name!r} uuid={c.uuid} identity={c.identity_label} address={c.address} "
                          f"since={_iso(c.connected_at)} in={c.messages_in} out={c.messages_out}"
                          for c in clients]
            self.log.info("\n".join(lines))

    # -- introspection ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        core = self.server.core
        return {"clients": core.registered, "connections": len(core.connections),
                "forwarded": core.forwarded, "errors": core.echoed,
                "closes": {str(k): v for k, v in sorted(core.closes.items())},
                **({"cluster": self.bus.status()} if self.bus is not None else {})}

    def clients(self) -> list[dict[str, Any]]:
        rows = []
        for client in self.server.core.clients():
            row = client.row()
            row["connected_since"] = _iso(row["connected_since"])
            rows.append(row)
        return rows

    def metrics(self) -> Iterable[Metric]:
        core, labels, name = self.server.core, ["component"], [self.name]
        yield gauge("relayd_relay_clients", "Registered relay clients", labels, [(name, core.registered)])
        yield gauge("relayd_relay_connections", "Open relay WebSocket connections", labels,
                    [(name, len(core.connections))])
        counters = [
            ("relayd_relay_registrations", "Successful registrations", core.registrations),
            ("relayd_relay_forwarded", "peer_connection messages forwarded to a peer", core.forwarded),
            ("relayd_relay_errors", "peer_connection messages echoed back with an error "
             "(unknown peer, other identity)", core.echoed),
            ("relayd_relay_auth_failures", "Registrations refused by the auth method", self.server.auth_failures),
        ]
        if self.bus is not None:
            counters += [
                ("relayd_relay_cluster_sent", "peer_connection messages published to another node", self.bus.sent),
                ("relayd_relay_cluster_received", "peer_connection messages received from another node",
                 self.bus.received),
                ("relayd_relay_cluster_failed", "cross-node sends that failed (Redis unreachable); "
                 "the sender got an error", self.bus.failed),
                ("relayd_relay_cluster_dropped", "malformed or misaddressed messages dropped from this "
                 "node's channel", self.bus.dropped),
            ]
        for metric, help_text, value in counters:
            yield counter(metric, help_text, labels, [(name, value)])
        yield counter("relayd_relay_closes", "Connections closed by the relay, by close code", ["component", "code"],
                      (([self.name, str(code)], count) for code, count in sorted(core.closes.items())))
