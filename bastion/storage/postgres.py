"""The store for several bastions: every noun's table in one PostgreSQL database.

The same noun modules as SQLite's (:class:`bastion.storage.nouns.Nouns`) over
:class:`bastion.storage.pg_connection.PostgresBase` (pool, cluster-wide write lock,
change feed). Its schema comes from :mod:`bastion.storage.pg_migrations`. The state
directory still holds what is not shared state: the CA and audit keys, the bastion's
host key, ``run/``.

Instance liveness (:meth:`PostgresStore.hold_instance`): a bastion holds a session
advisory lock on a key derived from its instance name, on a connection of its own,
for its life. PostgreSQL drops the lock when that session ends, however the process
died, so a sibling on any host sweeps a dead bastion's ``live_sessions``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Self

import psycopg
from psycopg.rows import dict_row

from bastion.protocol.errors import StateError
from bastion.storage import pg_migrations
from bastion.storage.interface import InstanceClaim, StateStore
from bastion.storage.nouns import Nouns
from bastion.storage.pg_connection import (
    PostgresBase,
    _Shared,
    check_url,
    connect,
    make_pool,
    map_error,
    safe_url,
)

log = logging.getLogger("bastion.storage")

INSTANCE_PREFIX = 0x4449 << 48  # "DI": instance keys, never WRITE_KEY
_NAME = re.compile(r"^[0-9a-f]{12}$")
# How often a bastion checks the connection holding its instance lock (and takes the
# lock again on a new one if it was lost).
KEEP_INTERVAL = 1.0
# A sweeper calls an instance dead only when its lock was free at two looks at least
# this far apart: a bastion whose lock connection dropped has that long to take it
# again (it tries every KEEP_INTERVAL) before its sessions are ended on its behalf.
DEAD_AFTER = 5.0


def instance_key(name: str) -> int:
    return INSTANCE_PREFIX | int(name, 16)


class PgInstanceClaim:
    """This process's claim to be alive: a session advisory lock on its own connection,
    kept (and, if that connection drops, taken again) by a thread until ``release``.

    Between a drop and the re-take a sweeper may see the lock free; it calls the
    instance dead only if it is still free ``DEAD_AFTER`` seconds later (see
    :meth:`PostgresStore.claim_if_dead`), long after the keeper's next try. A bastion
    that cannot reach the database for longer is blind, and ends its sessions itself.
    """

    def __init__(self, url: str, name: str, conn: psycopg.Connection[Any]) -> None:
        self.url = url
        self.name = name
        self._conn: psycopg.Connection[Any] | None = conn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="dt-instance", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, url: str) -> PgInstanceClaim:
        try:
            conn = connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise map_error(exc, url, "cannot be reached") from None
        for _ in range(100):
            name = secrets.token_hex(6)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (instance_key(name),)).fetchone()
            if row and row[0]:
                return cls(url, name, conn)
        conn.close()
        raise StateError("cannot record this bastion as running: no free instance name")

    def _keep(self) -> None:
        while not self._stop.wait(KEEP_INTERVAL):
            conn = self._conn
            try:
                if conn is None or conn.closed:
                    raise psycopg.OperationalError("no connection")
                conn.execute("SELECT 1")
                continue
            except psycopg.Error:
                pass
            with contextlib.suppress(Exception):
                if conn is not None:
                    conn.close()
            self._conn = None
            try:
                conn = connect(self.url, autocommit=True, connect_timeout=5)
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(%s)", (instance_key(self.name),)
                ).fetchone()
            except psycopg.Error:
                continue  # the database is away; try again next turn
            if row and row[0]:
                self._conn = conn
                log.warning("instance %s: lock connection was lost; holding it again", self.name)
            else:  # a sweeper holds it right now; it lets go after looking
                conn.close()

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()  # ends the session: the lock goes with it


class PostgresStore(Nouns, PostgresBase):
    """The cluster's state in a PostgreSQL database, for several bastions."""

    def __init__(self, shared: _Shared, state_dir: Path | None) -> None:
        super().__init__(shared, state_dir)
        self._free_since: dict[str, float] = {}
        self._probe: psycopg.Connection[Any] | None = None
        self._probe_lock = threading.Lock()
        self.dead_after = DEAD_AFTER

    @classmethod
    def open(
        cls,
        url: str,
        state_dir: Path | str | None = None,
        *,
        create: bool = False,
        check: bool = True,
    ) -> Self:
        """Connect (a pool) and, unless ``check`` is False, bring the schema up to date
        (with ``create``, make it in an empty database; without, refuse one)."""
        check_url(url)
        store = cls(_Shared(url, make_pool(url)), Path(state_dir) if state_dir else None)
        try:
            if check:
                store._migrate(create=create)
        except BaseException:
            store.close()
            raise
        return store

    def sibling(self, *, timeout: float | None = None) -> StateStore | None:
        """A store for another thread pool: it shares this one's connection pool."""
        with self._shared.lock:
            self._shared.users += 1
        return type(self)(self._shared, self.state_dir)

    def _migrate(self, *, create: bool) -> None:
        with self.transaction(bump=False):
            self._execute(
                "CREATE TABLE IF NOT EXISTS _migrations "
                "(version integer PRIMARY KEY, name text, applied double precision)"
            )
            done = {r["version"] for r in self._all("SELECT version FROM _migrations")}
            newest = pg_migrations.newest()
            if done and max(done) > newest:
                raise StateError(
                    f"cluster database schema version {max(done)} is newer than this release "
                    f"understands ({newest}); upgrade dt-bastion"
                )
            if not done and not create:
                raise StateError(
                    f"no cluster state in the database {safe_url(self.url)} "
                    "(run: dtadmin --database URL init --cluster NAME)"
                )
            for version, name, statements in pg_migrations.PG_MIGRATIONS:
                if version in done:
                    continue
                for statement in statements:
                    self._execute(statement)
                self._execute(
                    "INSERT INTO _migrations (version, name, applied) VALUES (?, ?, ?)",
                    (version, name, time.time()),
                )

    def schema_version(self) -> int:
        row = self._one("SELECT max(version) AS v FROM _migrations")
        return int(row["v"] or 0) if row else 0

    def integrity_check(self) -> None:
        """PostgreSQL keeps its own pages and indexes right; check the schema is this
        release's (every table there)."""
        want = {"_migrations", "settings", "users", "roles", "devices", "tokens", "nodes",
                "locks", "issued_certs", "audit", "audit_checkpoints", "trust_roots",
                "login_failures", "live_sessions", "changes", "source_failures",
                "device_posture"}  # fmt: skip
        rows = self._all(
            "SELECT table_name AS t FROM information_schema.tables "
            "WHERE table_schema = current_schema()"
        )
        missing = want - {r["t"] for r in rows}
        if missing:
            raise StateError(
                f"cluster database {safe_url(self.url)} lacks tables {sorted(missing)}; "
                "restore it from a backup"
            )

    def close(self) -> None:
        with self._probe_lock:
            if self._probe is not None:
                with contextlib.suppress(Exception):
                    self._probe.close()
                self._probe = None
        super().close()

    # -- instance liveness -------------------------------------------------------------

    def hold_instance(self) -> InstanceClaim | None:
        """Claim a fresh instance name as alive until ``release()`` or death."""
        return PgInstanceClaim.acquire(self.url)

    def stale_instances(self, own: str) -> list[str]:
        """Instances known only from leftover files: none here (the rows say)."""
        return []

    def instance_alive(self, name: str) -> bool:
        if not _NAME.match(name):
            return False
        with self._probe_lock:
            conn = self._probe_connection()
            try:
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(%s) AS free", (instance_key(name),)
                ).fetchone()
                if row and row["free"]:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (instance_key(name),))
                    return False
            except psycopg.Error as exc:
                raise map_error(exc, self.url, "cannot be reached") from None
            return True

    def open_session_instances(self) -> list[str]:
        """As every store's; a sweep starts here, so an instance it does not look at
        (no open session now) is forgotten: a free lock seen at an earlier look says
        nothing of what the lock did while nobody looked (taken again, lost again)."""
        names = super().open_session_instances()
        with self._probe_lock:
            for name in set(self._free_since) - set(names):
                del self._free_since[name]
        return names

    def claim_if_dead(self, name: str) -> AbstractContextManager[bool]:
        return self._claim_if_dead(name)

    @contextlib.contextmanager
    def _claim_if_dead(self, name: str) -> Iterator[bool]:
        """Yield True, holding its lock, if no live bastion holds instance ``name``
        (and none did at an earlier look ``DEAD_AFTER`` ago: see PgInstanceClaim)."""
        if not _NAME.match(name):
            yield True
            return
        with self._probe_lock:
            conn = self._probe_connection()
            key = instance_key(name)
            try:
                row = conn.execute("SELECT pg_try_advisory_lock(%s) AS free", (key,)).fetchone()
            except psycopg.Error as exc:
                with contextlib.suppress(Exception):
                    conn.close()
                raise map_error(exc, self.url, "cannot be reached") from None
            if not (row and row["free"]):
                self._free_since.pop(name, None)
                yield False
                return
            try:
                now = time.monotonic()
                first = self._free_since.setdefault(name, now)
                if now - first < self.dead_after:
                    yield False
                    return
                yield True
                self._free_since.pop(name, None)
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def _probe_connection(self) -> psycopg.Connection[Any]:
        conn = self._probe
        if conn is None or conn.closed:
            try:
                conn = self._probe = connect(
                    self.url, autocommit=True, connect_timeout=10, row_factory=dict_row
                )
            except psycopg.Error as exc:
                raise map_error(exc, self.url, "cannot be reached") from None
        return conn
