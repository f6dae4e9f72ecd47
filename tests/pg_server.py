"""A real PostgreSQL server for the tests (Debian's postgresql, run by the tests themselves).

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
``postgres`` account (``runuser -u postgres --``) in a temporary directory owned by it; as an
ordinary user it runs as that user. It listens on a free port of 127.0.0.1 and on a unix
socket in its own directory, with ``trust`` authentication and ``fsync=off`` (test data need not
survive a power cut). One server per test session (``pg_server``); every test that asks for
``pg_url`` gets a fresh database in it (CREATE DATABASE is quick). ``private_pg_server`` is a
server of the test's own, for tests that stop and restart it.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from relayd.testing import free_port


def _bin_dir() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "postgres").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PgServer:
    """initdb + postgres in a temp dir; ``stop()``/``start()`` may be called again (outages)."""

    _names = itertools.count(1)

    def __init__(self) -> None:
        bindir = _bin_dir()
        if bindir is None:
            pytest.skip("PostgreSQL is not installed (scripts/install --test installs Debian's postgresql)")
        self.bindir = bindir
        self.run_as: list[str] = []
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' account to run PostgreSQL as")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.root = Path(tempfile.mkdtemp(prefix="relayd-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        for path in (self.data, self.sockets):
            path.mkdir()
            if owner is not None:
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self.log = self.root / "postgres.log"
        if owner is not None:
            self.log.touch()
            os.chown(self.log, owner.pw_uid, owner.pw_gid)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        subprocess.run([*self.run_as, str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(
            [*self.run_as, str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-h", "127.0.0.1", "-k", str(self.sockets), "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "logging_collector=off"],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited {self.process.returncode}: {self.log.read_text()[-2000:]}")
            ready = subprocess.run([str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not become ready: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)  # polling pg_isready with a deadline

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnects clients, like a restart an operator makes)."""
        if self.process is None or self.process.poll() is not None:
            return
        subprocess.run([*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                        "stop"], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    server = PgServer()
    yield server
    server.destroy()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """The URL of a fresh database on the session's PostgreSQL server."""
    return pg_server.new_database()


@pytest.fixture
def private_pg_server():
    """A PostgreSQL server of this test's own (it may stop and restart it)."""
    server = PgServer()
    yield server
    server.destroy()
