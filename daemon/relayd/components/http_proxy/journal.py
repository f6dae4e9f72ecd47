"""Counts the database could not take, kept on disk until it can (the "held counts" journal).

Each component object that counts (one per generation: during a reload the old one drains
while the new one serves) is a *writer* with a random id. It owns two files next to the
database, ``<db>.held-<writer>.0`` and ``.1``, created and preallocated (posix_fallocate) when
it starts, while there is room: writing into them later needs no new disk blocks, so they can
still be written when the disk is full. A *snapshot* is everything the writer holds that is not
in the database (counter deltas, rejected counts), numbered 1, 2, ...; snapshot ``seq`` goes to
file ``seq % 2`` in one pwrite + fdatasync, header first (magic, seq, length, CRC-32 over both),
so a torn write leaves the previous snapshot in the other file intact.

A writer snapshots after every flush that failed (a crash then loses at most one flush
interval) and when it stops with counts the database could not take. Its flushes record, in
the same transaction as the counts, the last snapshot they include (table journal_applied), so
a snapshot is applied exactly once however the process dies: replaying a writer's latest valid
snapshot is skipped when journal_applied already has its seq, and is otherwise added together
with that mark in one transaction; the files are deleted only after that commit, and a crash
before the deletion finds the mark at the next start.

A writer holds an exclusive flock on its file .0 while it lives; files of writers whose lock
is free (a process that ended, an object that stopped) are replayed by the next component that
opens the database (at its start, and every few seconds while it runs).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Self

from .store import NCOL, OVERFLOW, Inc, Store

MAGIC = b"RLYDHLD1"
_HEADER = struct.Struct("<8sQQI")  # magic, seq, payload length, crc32(magic+seq+length+payload)
MIN_RESERVE = 64 * 1024
MAX_RESERVE = 16 << 20
ORPHAN_AGE = 60.0  # seconds before files without a valid snapshot are garbage


# Here, not in counters.py (which raises it): mypyc compiles counters.py, and a compiled class
# cannot derive from RuntimeError.
class CountsNotSaved(RuntimeError):
    """Raised by ``Counters.close``: counted requests are not in the database (the message says where)."""

    def __init__(self, message: str, requests: int, path: Path | None) -> None:
        super().__init__(message)
        self.requests = requests
        self.path = path


def new_writer_id() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc(seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(MAGIC + struct.pack("<QQ", seq, len(payload))))


def _rows(counters: dict[tuple[Inc, str], list[int]], fold: bool) -> dict[tuple[Inc, str], list[int]]:
    rows: dict[tuple[Inc, str], list[int]] = {}
    for (inc, endpoint), values in counters.items():
        key = (inc, OVERFLOW if fold and endpoint else endpoint)
        row = rows.setdefault(key, [0] * NCOL)
        for i, v in enumerate(values):
            row[i] += v
    return rows


def _counter_list(rows: dict[tuple[Inc, str], list[int]]) -> list[list[Any]]:
    return [[inc.service, inc.user, inc.sgen, inc.gen, inc.created, e, v] for (inc, e), v in rows.items()]


def encode(writer: str, seq: int, counters: dict[tuple[Inc, str], list[int]],
           rejected: dict[tuple[str, int | None], int], fold: bool = False, unsure: Any = None) -> bytes:
    """A snapshot's payload. ``fold`` merges per-endpoint rows into each incarnation's
    '(other)' row (totals stay exact; used only when the detailed form does not fit).
    ``unsure``: a failed flush (flush seq, counters, rejected) that may have committed; kept
    apart, replayed idempotently under its flush seq (Store.add ``flush``)."""
    rows = _rows(counters, fold)
    requests = sum(v[0] for (_, e), v in rows.items() if e == "")
    doc: dict[str, Any] = {
        "version": 1, "writer": writer, "seq": seq, "time": time.time(),
        "counters": _counter_list(rows),
        "rejected": [[s, g, n] for (s, g), n in rejected.items()],
    }
    if unsure is not None:
        flush_seq, unsure_counters, unsure_rejected = unsure
        urows = _rows(unsure_counters, fold)
        requests += sum(v[0] for (_, e), v in urows.items() if e == "")
        doc["unsure"] = {"flush": flush_seq, "counters": _counter_list(urows),
                         "rejected": [[s, g, n] for (s, g), n in unsure_rejected.items()]}
    doc["requests"] = requests
    return zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 6)


def decode_unsure(payload: bytes) -> tuple[int, dict[tuple[Inc, str], list[int]],
                                           dict[tuple[str, int | None], int]] | None:
    """The failed flush a snapshot holds apart, if any: (flush seq, counters, rejected)."""
    doc = json.loads(zlib.decompress(payload))
    unsure = doc.get("unsure")
    if not unsure:
        return None
    counters, rejected = _decode_counters(unsure)
    return int(unsure["flush"]), counters, rejected


def decode(payload: bytes) -> tuple[dict[tuple[Inc, str], list[int]], dict[tuple[str, int | None], int], int]:
    """(counters, rejected, requests) of a snapshot, apart from its unsure flush (requests
    counts both); incarnations are fresh Inc objects."""
    doc = json.loads(zlib.decompress(payload))
    counters, rejected = _decode_counters(doc)
    return counters, rejected, int(doc.get("requests", 0))


def _decode_counters(doc: dict[str, Any]) -> tuple[dict[tuple[Inc, str], list[int]], dict[tuple[str, int | None], int]]:
    incs: dict[tuple[str, str, int | None, int | None, float], Inc] = {}
    counters: dict[tuple[Inc, str], list[int]] = {}
    for service, user, sgen, gen, created, endpoint, values in doc["counters"]:
        ident = (service, user, sgen, gen, created)
        inc = incs.get(ident)
        if inc is None:
            inc = incs[ident] = Inc(service, user, sgen, gen, created)
        row = counters.setdefault((inc, endpoint), [0] * NCOL)
        for i, v in enumerate(values):
            row[i] += v
    rejected = {(s, g): n for s, g, n in doc["rejected"]}
    return counters, rejected


class Journal:
    """This writer's two snapshot files (blocking; used from the component's worker thread)."""

    def __init__(self, db_path: Path, writer: str) -> None:
        self.db_path = db_path
        self.writer = writer
        self.paths = [db_path.parent / f"{db_path.name}.held-{writer}.{i}" for i in (0, 1)]
        self.fds: list[int | None] = [None, None]
        self.reserved = 0  # bytes preallocated in each file
        self.last: Path | None = None  # file of the last snapshot written

    def open(self) -> None:
        # Lock .0 before anything else exists: a scan by another writer that opens it in
        # between waits or skips it (and never removes files younger than ORPHAN_AGE).
        self.fds[0] = fd = os.open(self.paths[0], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.fds[1] = os.open(self.paths[1], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _fsync_dir(self.db_path.parent)

    def reserve(self, size: int) -> None:
        """Preallocate both files to ``size`` bytes (raises OSError, e.g. ENOSPC)."""
        size = max(MIN_RESERVE, min(MAX_RESERVE, size))
        if size <= self.reserved:
            return
        for i, fd in enumerate(self.fds):
            if fd is None:
                raise OSError(f"{self.paths[i]} could not be created")
            os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        self.reserved = size

    def write(self, seq: int, payload: bytes) -> Path:
        fd = self.fds[seq % 2]
        if fd is None:
            raise OSError(f"{self.paths[seq % 2]} could not be created")
        data = _HEADER.pack(MAGIC, seq, len(payload), _crc(seq, payload)) + payload
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        if len(data) > self.reserved:
            os.fsync(fd)  # the file grew: its size is metadata
        else:
            os.fdatasync(fd)
        self.last = self.paths[seq % 2]
        return self.last

    def close(self, remove: bool) -> None:
        """Release the lock; with ``remove`` (nothing held) delete the files first. Files exist
        only if open() got as far as the first one (a failed start may close an unopened one)."""
        if remove and self.fds[0] is not None:
            for path in self.paths:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            try:
                _fsync_dir(self.db_path.parent)
            except OSError:
                pass
        for i, fd in enumerate(self.fds):
            if fd is not None:
                os.close(fd)
                self.fds[i] = None


# -- replay ------------------------------------------------------------------------------------

def read_latest(paths: list[Path]) -> tuple[int, bytes] | None:
    """The valid snapshot with the highest seq among a writer's files, if any."""
    best: tuple[int, bytes] | None = None
    for path in paths:
        try:
            with open(path, "rb") as f:
                head = f.read(_HEADER.size)
                if len(head) < _HEADER.size:
                    continue
                magic, seq, length, crc = _HEADER.unpack(head)
                if magic != MAGIC or length > MAX_RESERVE * 64:
                    continue
                payload = f.read(length)
        except OSError:
            continue
        if len(payload) == length and _crc(seq, payload) == crc and (best is None or seq > best[0]):
            best = (seq, payload)
    return best


def orphans(db_path: Path, own: str | None) -> dict[str, list[Path]]:
    """Snapshot files of writers other than ``own``, by writer (live or not: see unlocked)."""
    pattern = re.compile(re.escape(db_path.name) + r"\.held-([A-Za-z0-9-]+)\.([01])$")
    found: dict[str, list[Path]] = {}
    try:
        entries = list(os.scandir(db_path.parent))
    except OSError:
        return found
    for entry in entries:
        match = pattern.match(entry.name)
        if match and match.group(1) != own:
            found.setdefault(match.group(1), []).append(Path(entry.path))
    return found


class Unlocked:
    """Context manager: holds a dead writer's lock while its snapshot is replayed; ``ok`` is
    False when the writer is alive (its file .0 is locked)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = sorted(paths)
        self.fd: int | None = None
        self.ok = False

    def __enter__(self) -> Self:
        first = [p for p in self.paths if p.name.endswith(".0")]
        if not first:
            self.ok = True  # a writer without its .0 file never held a lock
            return self
        try:
            self.fd = os.open(first[0], os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.ok = True
        except OSError:
            self.ok = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def stale(paths: list[Path], now: float | None = None) -> bool:
    """Files without a valid snapshot, old enough not to belong to a writer being created."""
    now = time.time() if now is None else now
    try:
        return all(now - p.stat().st_mtime > ORPHAN_AGE for p in paths)
    except OSError:
        return False


def remove(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    if paths:
        _fsync_dir(paths[0].parent)


def replay_orphans(store: Store, own: str) -> list[str]:
    """Worker (``Counters._replay_orphans``): apply the latest snapshot of every writer that
    ended, exactly once. Here, not in counters.py: mypyc (which compiles counters.py) cannot
    compile a ``continue`` inside a ``with``."""
    messages = []
    for writer, paths in sorted(orphans(store.path, own).items()):
        with Unlocked(paths) as lock:
            if not lock.ok:
                continue  # a live writer (another component object)
            latest = read_latest(paths)
            if latest is None:
                if stale(paths):
                    remove(paths)
                continue
            seq, payload = latest
            if store.applied_seq(writer) >= seq:
                remove(paths)
                messages.append(f"held counts of writer {writer} (snapshot {seq}) were already in "
                                f"{store.where}; removed {', '.join(p.name for p in paths)}")
                continue
            counters, rejected, requests = decode(payload)
            parts: list[tuple[Any, ...]] = [(counters, rejected, writer, seq, None)]
            unsure = decode_unsure(payload)
            if unsure is not None:  # a failed flush: added only if it had not committed
                flush_seq, unsure_counters, unsure_rejected = unsure
                parts.insert(0, (unsure_counters, unsure_rejected, None, 0, (writer, flush_seq)))
            store.add_all(parts)
            remove(paths)
            messages.append(f"replayed {requests} held requests of writer {writer} (snapshot {seq}) "
                            f"into {store.where}")
    return messages


def describe(path: Path) -> dict[str, Any]:
    """For operators and tests: what a snapshot file holds."""
    latest = read_latest([path])
    if latest is None:
        return {"path": str(path), "valid": False}
    counters, rejected, requests = decode(latest[1])
    return {"path": str(path), "valid": True, "seq": latest[0], "requests": requests,
            "rows": len(counters), "rejected": sum(rejected.values())}
