"""The SQLite connection under every noun of the store: opening, checks, transactions.

Opening goes through :func:`bastion.storage.files.connect`, so nothing here touches
the database file outside SQLite once this process holds a connection to it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

import sqlite_utils

from bastion.protocol.errors import StateError, StorageUnavailable
from bastion.storage import files, instances
from bastion.storage.base import Duplicate, StoreBase
from bastion.storage.migrations import MIGRATIONS

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from bastion.storage.interface import InstanceClaim, StateStore

DB_NAME = "cluster.db"


def _open_error(state_dir: Path, path: Path, exc: BaseException) -> Exception:
    if files.read_only(state_dir):
        return StorageUnavailable(
            f"cannot open the cluster database in {state_dir}: its file system is "
            "read-only; nothing can be issued or changed until it is writable again"
        )
    if isinstance(exc, OSError):
        return StateError(f"cannot open cluster state in {state_dir}: {exc.strerror}")
    return StateError(f"cluster database {path} is unreadable or corrupt: {exc}")


class _Connection:
    """One SQLite connection, and the state of the transaction open on it."""

    __slots__ = ("conn", "lock", "key", "bump_pending", "after_commit")

    def __init__(self, conn: sqlite3.Connection, key: files.FileKey | None) -> None:
        self.conn = conn
        self.lock = threading.RLock()  # contended only where threads share it (in memory)
        self.key = key
        self.bump_pending = False
        self.after_commit: list[Callable[[], None]] = []

    def close(self) -> None:
        with self.lock:
            self.conn.close()
            key, self.key = self.key, None
        if key is not None:
            files.release(key)


def _configure_connection(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a certificate is handed out only after its serial is on disk.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")


class SQLiteBase(StoreBase):
    """SQLite connections and their transactions; the noun modules build on it.

    Thread-safe, and no thread waits for another's: each thread that uses a store gets
    a connection of its own (made on first use, closed with the store or once its
    thread has ended). A reader is never queued behind a writer that waits for the
    database's write lock, and a transaction is one thread's, never joined by another.
    In WAL mode a reader sees the last commit. An in-memory store has one connection,
    which its threads take in turn. ``db`` (sqlite-utils) is the opening thread's.
    """

    def __init__(
        self, conn: sqlite3.Connection, path: Path | None, *, file_key: files.FileKey | None = None
    ) -> None:
        self.path = path
        self.state_dir = path.parent if path is not None else None
        self.db = sqlite_utils.Database(conn)
        self._primary = _Connection(conn, file_key)
        self._local = threading.local()
        self._local.c = self._primary
        self._threads: dict[threading.Thread, _Connection] = {}
        self._threads_lock = threading.Lock()
        self._closed = False

    @property
    def _c(self) -> _Connection:
        try:
            return self._local.c
        except AttributeError:
            c = self._local.c = self._connect_this_thread()
            return c

    @property
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        return self._c.conn

    def _connect_this_thread(self) -> _Connection:
        if self.path is None:  # one database per connection: all threads share it
            return self._primary
        with self._threads_lock:
            if self._closed:
                raise StateError(f"cluster database {self.path} was closed")
            for ended in [t for t in self._threads if not t.is_alive()]:
                self._threads.pop(ended).close()
            try:
                conn, key = files.connect(self.path, create=False)  # no file checks: open
            except (sqlite3.DatabaseError, OSError) as exc:
                raise _open_error(self.path.parent, self.path, exc) from exc
            c = _Connection(conn, key)
            try:
                _configure_connection(conn)
            except sqlite3.Error as exc:
                c.close()
                raise _open_error(self.path.parent, self.path, exc) from exc
            self._threads[threading.current_thread()] = c
        return c

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path | str, *, create: bool = False, check: bool = True) -> Self:
        """Open (or with ``create``, make) the database, bringing its schema up to date.

        ``check=False`` skips the integrity check and the schema migration (a write
        transaction), for a second connection of a process that just did both."""
        state_dir = Path(state_dir)
        path = state_dir / DB_NAME
        if not create and not path.exists():
            raise StateError(
                f"no cluster state in {state_dir} "
                f"(run: dtadmin init --cluster NAME --state {state_dir})"
            )
        store: Self | None = None
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            conn, key = files.connect(path, create=create)
            store = cls(conn, path, file_key=key)
            store._configure(check)
            if check:
                store._migrate()
        except BaseException as exc:
            if store is not None:
                store.close()
            if isinstance(exc, (sqlite3.DatabaseError, OSError)):
                raise _open_error(state_dir, path, exc) from exc
            raise
        return store

    @classmethod
    def memory(cls) -> Self:
        """An in-memory store for unit tests of code above storage."""
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        store = cls(conn, None)
        store._migrate()
        return store

    def _configure(self, check: bool = True) -> None:
        _configure_connection(self._conn)
        if not check:
            return
        result = self._conn.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise StateError(f"cluster database {self.path} failed its integrity check: {result}")

    def integrity_check(self) -> None:
        """Refuse a database whose indexes disagree with its tables, or worse.

        The open-time ``quick_check`` skips indexes to stay cheap; a broken index still
        answers lookups wrongly (a lock or a revoked serial that an index no longer
        finds). ``dt-bastion serve`` runs this full check once before serving.
        """
        try:
            rows = self._all("PRAGMA integrity_check(20)")
        except StateError as exc:  # too broken to check at all
            problems = [exc.message]
        else:
            problems = [str(next(iter(row.values()))) for row in rows]
        if problems != ["ok"]:
            raise StateError(
                f"cluster database {self.path} failed its integrity check: "
                f"{'; '.join(problems[:5])}; restore it from a backup"
            )

    def _migrate(self) -> None:
        with self.transaction(bump=False):
            migrations = self.db.table("_migrations")
            migrations.create(
                {"version": int, "name": str, "applied": float}, pk="version", if_not_exists=True
            )
            done = {row["version"] for row in migrations.rows}
            newest = MIGRATIONS[-1][0]
            if done and max(done) > newest:
                raise StateError(
                    f"cluster database schema version {max(done)} is newer than this release "
                    f"understands ({newest}); upgrade dt-bastion"
                )
            for version, name, step in MIGRATIONS:
                if version not in done:
                    step(self.db)
                    self._conn.execute(
                        "INSERT INTO _migrations (version, name, applied) VALUES (?, ?, ?)",
                        (version, name, time.time()),
                    )

    def close(self) -> None:
        """Close every thread's connection (waiting for a transaction still open)."""
        with self._threads_lock:
            self._closed = True
            conns = [self._primary, *self._threads.values()]
            self._threads.clear()
        for c in conns:
            c.close()

    def revision(self) -> int:
        """The number every change bumps (a settings row, moved in its transaction)."""
        row = self._one("SELECT value FROM settings WHERE key = 'revision'")
        return int(row["value"]) if row else 0

    def sibling(self, *, timeout: float | None = None) -> StateStore | None:
        """A store of its own for another pool of threads (workers, the issuer): a
        cheap second opening of the same file (no check, no migration), with a busy
        timeout of ``timeout`` seconds if given; None for an in-memory store, whose one
        connection every thread must share (use this store)."""
        if self.path is None:
            return None
        store = type(self).open(self.path.parent, check=False)
        if timeout is not None:
            with contextlib.suppress(sqlite3.Error):  # our own bound, not the 10 s default
                store._conn.execute(f"PRAGMA busy_timeout = {max(1, int(timeout * 1000))}")
        return cast("StateStore", store)  # a SQLiteStore: the nouns are its subclass

    # -- instance liveness: a flock per bastion in the state directory's run/ ---------

    def hold_instance(self) -> InstanceClaim | None:
        """Claim a fresh instance name as alive until ``release()`` or death (None for
        an in-memory store: no other process can see it)."""
        return instances.InstanceLock.acquire(self.state_dir) if self.state_dir else None

    def stale_instances(self, own: str) -> list[str]:
        """Instances known from lock files left in run/ (a bastion killed holding no
        session), other than ``own``."""
        return instances.stale_names(self.state_dir, own) if self.state_dir else []

    def claim_if_dead(self, name: str) -> AbstractContextManager[bool]:
        """Yield True, holding its lock, if no live process holds instance ``name``."""
        if self.state_dir is None:
            return contextlib.nullcontext(False)
        return instances.claim_if_dead(self.state_dir, name)

    def instance_alive(self, name: str) -> bool:
        return self.state_dir is not None and instances.is_alive(self.state_dir, name)

    def wait_for_change(self, timeout: float) -> None:
        """SQLite has no feed to wait on: wait ``timeout``, then the caller polls."""
        time.sleep(timeout)

    def schema_version(self) -> int:
        row = self._conn.execute("SELECT max(version) FROM _migrations").fetchone()
        return int(row[0] or 0)

    # -- transactions ------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, bump: bool = True) -> Iterator[None]:
        """One atomic unit. Nested calls join the outer transaction.

        ``BEGIN IMMEDIATE`` takes the write lock up front, so two bastions racing for
        one token serialise here instead of failing with a deadlock at commit.
        """
        c = self._c
        with c.lock:
            if c.conn.in_transaction:
                c.bump_pending |= bump
                yield
                return
            try:
                c.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StorageUnavailable(f"cluster database is busy or unwritable: {exc}") from exc
            c.bump_pending = bump
            try:
                yield
                if c.bump_pending:
                    c.conn.execute(
                        "INSERT INTO settings (key, value) VALUES ('revision', '1') "
                        "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
                    )
                c.conn.execute("COMMIT")
            except BaseException as exc:
                c.after_commit = []
                if c.conn.in_transaction:
                    c.conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise StorageUnavailable(f"cluster database write failed: {exc}") from exc
                if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
                    exc, sqlite3.IntegrityError
                ):
                    raise StateError(f"cluster database error: {exc}") from exc
                raise
            done, c.after_commit = c.after_commit, []
        for callback in done:
            callback()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the current transaction has committed (at once if none
        is open), and never if it rolls back: a log line saying "allowed" must not
        outlive the issuance it describes."""
        c = self._c
        with c.lock:
            if c.conn.in_transaction:
                c.after_commit.append(callback)
                return
        callback()

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A part of the open transaction that can fail alone: on an exception only
        its own writes are undone, and the transaction goes on (group commit)."""
        c = self._c
        with c.lock:
            if not c.conn.in_transaction:
                raise RuntimeError("savepoint() needs an open transaction")
            c.conn.execute("SAVEPOINT part")
            callbacks = len(c.after_commit)
            try:
                yield
            except BaseException:
                del c.after_commit[callbacks:]
                # SQLite may already have rolled the whole transaction back (a full
                # disk); then there is no savepoint left and the error stands.
                if c.conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        c.conn.execute("ROLLBACK TO part")
                        c.conn.execute("RELEASE part")
                raise
            c.conn.execute("RELEASE part")

    @contextlib.contextmanager
    def read_transaction(self) -> Iterator[None]:
        """One consistent snapshot for several reads (joins a transaction already open).

        A deferred BEGIN in WAL mode takes no lock: a writer elsewhere neither waits
        for it nor is waited for."""
        c = self._c
        with c.lock:
            if c.conn.in_transaction:
                yield
                return
            try:
                c.conn.execute("BEGIN")
            except sqlite3.OperationalError as exc:
                raise StorageUnavailable(f"cluster database read failed: {exc}") from exc
            try:
                yield
            finally:
                if c.conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        c.conn.execute("COMMIT")

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Reads go straight to the connection: they are on every login's hot path, and
        sqlite-utils' query() parses each statement first (a third of issuance time)."""
        c = self._c
        with c.lock:
            try:
                cursor = c.conn.execute(sql, params)
            except sqlite3.OperationalError as exc:
                raise StorageUnavailable(f"cluster database read failed: {exc}") from exc
            except sqlite3.DatabaseError as exc:
                raise StateError(f"cluster database error: {exc}") from exc
            names = [d[0] for d in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _execute(self, sql: str, params: tuple[Any, ...] = (), *, unique: bool = False) -> int:
        try:
            return self._c.conn.execute(sql, params).rowcount
        except sqlite3.IntegrityError as exc:
            raise Duplicate(str(exc)) from exc

    def _insert_returning_id(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        try:
            return int(self._c.conn.execute(sql, params).lastrowid or 0)
        except sqlite3.IntegrityError as exc:
            raise Duplicate(str(exc)) from exc
