"""Logging to stderr (journald adds time and unit), as text or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_HANDLER_NAME = "relayd-stderr"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(config: Any = None) -> None:
    """Apply a [logging] table; safe to call again on reload."""
    level = (getattr(config, "level", None) or "info").upper()
    fmt = getattr(config, "format", "text")
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        root.addHandler(handler)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.setLevel(level)
    # Quiet chatty libraries unless asked for.
    for name in ("websockets", "aiohttp.access", "asyncio"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    for name, value in (getattr(config, "loggers", None) or {}).items():
        logging.getLogger(name).setLevel(value.upper())
