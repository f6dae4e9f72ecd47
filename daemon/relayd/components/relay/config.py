"""``[components.NAME] kind = "relay"``: the configuration keys (documented in relayd.toml(5))."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from relayd.component import ComponentConfig
from relayd.config.types import AuthRef, ListenerRef, Seconds


class RelayConfig(ComponentConfig):
    kind: Literal["relay"]
    listener: ListenerRef = Field(description="listener to serve the WebSocket relay on (ws:// or wss:// with TLS)")
    auth: AuthRef = Field(
        description="auth method deciding registrations from the handshake's Authorization header; "
        "clients reach only clients of the same identity"
    )
    max_message_bytes: int | None = Field(
        None, ge=1,
        description="largest message in UTF-8 bytes; a longer one closes the sender with 4003 "
        "(messages over 1 MiB always close with 1009)",
    )
    max_clients: int | None = Field(
        None, ge=1, description="most concurrent connections; one more is closed with 4007 right after the handshake"
    )
    max_messages_per_second: float | None = Field(
        None, gt=0,
        description="per-connection message rate (token bucket, burst of one second's worth); "
        "exceeding it closes the client with 4006",
    )
    send_buffer_bytes: int = Field(
        1024 * 1024, ge=1024,
        description="most bytes queued for one client; a receiver that lets more pile up is closed with 4005 "
        "so it never stalls its senders",
    )
    keepalive_interval: Seconds | None = Field(
        20.0,
        description="ping a client after this long without traffic (1 to 1.25 of it); one from which "
        "nothing arrives within 3/4 of it after the ping is dropped (unset: no pings)",
    )
    open_timeout: Seconds = Field(
        10.0, gt=0,
        description="a new connection must complete its WebSocket handshake within this long, else it is "
        "dropped (like proxystore-relay's open_timeout)",
    )
    register_timeout: Seconds | None = Field(
        30.0, description="close connections that have not registered after this long with 4008 (unset: never)"
    )
    close_timeout: Seconds = Field(
        5.0, description="how long a closing client may take to answer the close before it is cut off"
    )
    access_log: bool = Field(
        False, description="log one line per connection to the logger relayd.access.NAME (identity, client name and uuid, peer, close code, messages, bytes, duration; never credentials)"
    )
    current_clients_interval: Seconds | None = Field(
        60.0, description="log 'Connected clients: N' this often (unset: never), like proxystore-relay"
    )
    current_clients_limit: int | None = Field(
        32, ge=0,
        description="also log one line per client when 0 < N < this limit (unset: never)",
    )
