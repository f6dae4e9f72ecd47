"""A small synchronous client for the control socket (stdlib http.client over AF_UNIX)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any


class Unreachable(Exception):
    pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("relayd", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        address = "\0" + self.unix_path[1:] if self.unix_path.startswith("@") else self.unix_path
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            raise Unreachable(f"cannot reach relayd at {self.unix_path}: {exc.strerror or exc}") from None
        self.sock = sock


class ControlClient:
    def __init__(self, path: str, timeout: float = 120.0) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, method: str, url: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, decoded JSON or text) of one request."""
        conn = _UnixConnection(self.path, self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            all_headers = {"Content-Type": "application/json"} if data is not None else {}
            all_headers.update(headers or {})
            conn.request(method, url, body=data, headers=all_headers)
            response = conn.getresponse()
            raw = response.read()
        except (ConnectionError, TimeoutError, http.client.HTTPException) as exc:
            raise Unreachable(f"relayd at {self.path} did not answer: {exc}") from None
        finally:
            conn.close()
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, json.loads(raw)
        return response.status, raw.decode("utf-8", "replace")
