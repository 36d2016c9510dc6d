"""A real PostgreSQL for the tests: one server per test session, a fresh database per test.

The server is the distribution's (``/usr/lib/postgresql/<version>/bin``, installed by
scripts/setup.sh), made with initdb in a temp dir and started with pg_ctl on a Unix
socket there plus a free loopback port, ``fsync=off`` (a test's data is thrown away),
and stopped in teardown. PostgreSQL refuses to run as root; the suite runs as root in
CI, so there the data directory belongs to ``nobody`` and the server runs as that
user (``runuser``). A test gets an empty database migrated to the current schema,
copied from a template (``CREATE DATABASE ... TEMPLATE``: a file copy, milliseconds).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_VERSIONS = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
PG_BIN = _VERSIONS[0].parent if _VERSIONS else None
TEMPLATE = "dt_template"
DTADMIN = os.path.join(os.path.dirname(sys.executable), "dtadmin")
_names = itertools.count(1)


def available() -> bool:
    return PG_BIN is not None and (PG_BIN / "initdb").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    root: Path
    socket_dir: Path
    port: int
    run_as: list[str]

    def url(self, dbname: str = "postgres", *, tcp: bool = False) -> str:
        host = "127.0.0.1" if tcp else str(self.socket_dir)
        return f"postgresql://postgres@/{dbname}?host={host}&port={self.port}"

    def admin(self, *sql: str, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            for statement in sql:
                conn.execute(statement)

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.run_as, str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def start(self) -> None:
        self.pg_ctl("-w", "-t", "30", "-l", str(self.root / "log"), "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-w", "-t", "30", "-m", mode, "stop", check=False)


def _runner(root: Path) -> list[str]:
    if os.geteuid() != 0:
        return []
    nobody = pwd.getpwnam("nobody")
    os.chown(root, nobody.pw_uid, nobody.pw_gid)
    return ["runuser", "-u", "nobody", "--"]


@contextlib.contextmanager
def postgres_server() -> Iterator[Server]:
    # Not under pytest's tmp dir: that is 0700 root's, and the server may run as nobody.
    root = Path(tempfile.mkdtemp(prefix="dt-pg-"))
    root.chmod(0o755)
    run_as = _runner(root)
    server = Server(root, root, _free_port(), run_as)
    try:
        subprocess.run(
            [*run_as, str(PG_BIN / "initdb"), "-D", str(root / "data"), "-U", "postgres",
             "-A", "trust", "-E", "UTF8", "--no-sync", "--locale=C.UTF-8"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        with open(root / "data" / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {server.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{root}'\nfsync = off\n"
                "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n"
                "shared_buffers = 32MB\n"
            )
        server.start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def make_template(server: Server) -> None:
    """A database at the current schema that every test database is copied from."""
    from bastion.storage.postgres import PostgresStore

    server.admin(f"CREATE DATABASE {TEMPLATE}")
    store = PostgresStore.open(server.url(TEMPLATE), create=True)
    store.close()


def fresh_database(server: Server) -> str:
    """A new empty database at the current schema; its URL."""
    name = f"dt_test_{os.getpid()}_{next(_names)}"
    server.admin(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    return server.url(name)


def dtadmin(url: str, state: Path, *args: str) -> str:
    """The real `dtadmin --database URL --state DIR ...`; its stdout (it must succeed)."""
    result = subprocess.run(
        [DTADMIN, "--database", url, "--state", str(state), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="session")
def pg_server():
    if not available():
        pytest.skip("PostgreSQL is not installed (run scripts/setup.sh)")
    with postgres_server() as server:
        make_template(server)
        yield server


@pytest.fixture
def pg_url(pg_server):
    """A fresh, migrated, empty database on the session's server."""
    return fresh_database(pg_server)


class StoreFactory:
    """Opens stores on one cluster state, on the backend the test is run with:
    ``factory()`` a new store on it (``create=True`` the first time)."""

    def __init__(self, backend: str, state_dir: Path, url: str | None) -> None:
        self.backend = backend
        self.state_dir = state_dir
        self.url = url
        self._opened: list = []

    def __call__(self, *, create: bool = False, check: bool = True):
        from bastion.storage import open_store

        store = open_store(self.state_dir, self.url, create=create, check=check)
        self._opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self._opened:
            with contextlib.suppress(Exception):
                store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request, tmp_path):
    """Stores on a fresh cluster state, once on SQLite and once on PostgreSQL."""
    url = None
    if request.param == "postgres":
        url = fresh_database(request.getfixturevalue("pg_server"))
    factory = StoreFactory(request.param, tmp_path, url)
    yield factory
    factory.close_all()


@pytest.fixture
def any_store(store_factory):
    """One open store on a fresh state, on each backend."""
    return store_factory(create=True)
