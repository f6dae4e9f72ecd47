"""Read-only Apache htpasswd files with bcrypt entries (``htpasswd -B``).

Only bcrypt (``$2y$``, ``$2b$``, ``$2a$``) is accepted: the other htpasswd formats (apr1 MD5,
{SHA}, crypt, plain) are too weak to trust, so their lines are skipped with a warning naming
the line and user (never the hash). The file is re-read when its mtime or size changes, so
``htpasswd -B file user`` takes effect without a reload; relayd never writes it.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import bcrypt

log = logging.getLogger("relayd.auth.htpasswd")

_BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")


class HtpasswdError(Exception):
    pass


class Htpasswd:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries: dict[str, bytes] = {}
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """(Re)read the file if it changed; raises HtpasswdError if it cannot be read."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise HtpasswdError(f"cannot read htpasswd file {self.path}: {exc.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                text = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise HtpasswdError(f"cannot read htpasswd file {self.path}: {exc}") from None
            self._entries = parse(text, str(self.path))
            self._stamp = stamp

    def users(self) -> list[str]:
        self._reload_quietly()
        return sorted(self._entries)

    def get(self, username: str) -> bytes | None:
        self._reload_quietly()
        return self._entries.get(username)

    def _reload_quietly(self) -> None:
        try:
            self.load()
        except HtpasswdError as exc:
            # Keep serving the last good copy; a vanished file should not lock everyone out
            # silently, hence the log line.
            log.warning("%s (keeping %d users from the last read)", exc, len(self._entries))


def parse(text: str, origin: str = "htpasswd") -> dict[str, bytes]:
    entries: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, digest = line.partition(":")
        if not sep or not user:
            log.warning("%s:%d: not 'user:hash', skipped", origin, number)
            continue
        if not digest.startswith(_BCRYPT_PREFIXES):
            log.warning("%s:%d: user %r does not have a bcrypt hash (use htpasswd -B), skipped",
                        origin, number, user)
            continue
        entries[user] = digest.encode("ascii", "replace")
    return entries


def check(digest: bytes, password: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode("utf-8"), digest)
    except ValueError:  # malformed hash, or a password over bcrypt's 72-byte limit
        return False
