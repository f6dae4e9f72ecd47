"""Logging to stderr, as text or one JSON object per line.

Text lines start with a timestamp when run by hand. Under journald (``JOURNAL_STREAM`` names
the device and inode of our stderr, sd-daemon(3)), journald adds the time itself, and each
line starts with a ``<N>`` syslog priority instead, so ``journalctl -p err`` finds errors;
every line of a multi-line message carries it (journald stores each line as an entry).
JSON is the same in both cases.

Access logs (``access_log = true`` in a component) go to the logger
``relayd.access.<component>`` at INFO, one ``key=value`` line per request, relay connection or
stream session, through the same handler.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_HANDLER_NAME = "relayd-stderr"

# logging level -> syslog priority (sd-daemon(3): <3> error, <4> warning, <6> info, <7> debug)
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def _priority(levelno: int) -> int:
    for level, prio in _PRIORITY.items():  # from the most severe down
        if levelno >= level:
            return prio
    return 7


def stream_is_journal(stream: Any = None, environ: dict[str, str] | None = None) -> bool:
    """True if `stream` (default stderr) is the journal's stream socket (JOURNAL_STREAM)."""
    value = (environ if environ is not None else os.environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


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


class TextFormatter(logging.Formatter):
    """``2026-11-29T15:04:05.123+0000 INFO relayd: message`` (local time with its offset)."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}" + time.strftime("%z", t)
        return f"{stamp} {super().format(record)}"


class JournalFormatter(logging.Formatter):
    """``<6>INFO relayd: message``: the priority prefix on every line, no timestamp."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        text = super().format(record)
        return prefix + text.replace("\n", "\n" + prefix)


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
    elif stream_is_journal(getattr(handler, "stream", None)):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root.setLevel(level)
    # Quiet chatty libraries unless asked for.
    for name in ("websockets", "aiohttp.access", "asyncio"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # Access lines are INFO whatever the level: a component's access_log = true asks for them.
    logging.getLogger("relayd.access").setLevel(logging.INFO)
    for name, value in (getattr(config, "loggers", None) or {}).items():
        logging.getLogger(name).setLevel(value.upper())


def access_logger(component: str) -> logging.Logger:
    return logging.getLogger(f"relayd.access.{component}")


def quote(value: object) -> str:
    """A logfmt value: bare when safe, else double-quoted with escapes."""
    text = str(value)
    if text and all(c.isprintable() and c not in ' "=\\' for c in text):
        return text
    return json.dumps(text, ensure_ascii=True)
