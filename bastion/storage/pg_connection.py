"""The PostgreSQL connection under every noun of the store: pool, transactions, feed.

One :class:`psycopg_pool.ConnectionPool` per process (shared by a store's siblings).
A thread's transaction holds one pooled connection from its BEGIN to its COMMIT
(thread-local); outside a transaction a read borrows one for one statement.

Writers serialise cluster-wide, as SQLite's ``BEGIN IMMEDIATE`` makes them: every
write transaction's first statement is ``pg_advisory_xact_lock(WRITE_KEY)``, so the
interface's promise "a transaction holds the write lock from its start" holds on
every bastion at once, and each check-then-write in the shells (a token, a TOTP
step, a login attempt counted and reserved, an audit row linked to the last one)
stays correct under READ COMMITTED: every statement after the lock sees every commit
before it. The bastion's group commit batches writes, so one lock per batch is cheap.
``read_transaction`` is a REPEATABLE READ READ ONLY snapshot that takes no lock.

The change feed: a transaction that changes state (``bump``) inserts one row into
``changes`` and ``NOTIFY dt_changes, '<seq>'`` in the same transaction (delivered at
its commit); ``revision()`` is the newest seq. Because writers are serialised, seqs
commit in order. :meth:`PostgresBase.wait_for_change` waits on a dedicated LISTEN
connection; a notification lost while it was disconnected is caught up by the
caller's next ``revision()`` (it returns at once after any reconnect).

Errors: a lost or refused connection, a cancelled or serialisation-failed statement
is :class:`StorageUnavailable`; a unique violation is :class:`Duplicate`; anything
else the database says is :class:`StateError`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from bastion.protocol.errors import StateError, StorageUnavailable
from bastion.storage import urls
from bastion.storage.base import Duplicate, StoreBase
from bastion.storage.urls import safe_url

log = logging.getLogger("bastion.storage")

# Advisory lock keys (one bigint space per database): the cluster-wide write lock,
# and instance liveness keys under their own prefix (see postgres.instance_key).
WRITE_KEY = 0x4454_5752_4954_4531  # "DTWRITE1"
CHANNEL = "dt_changes"
# The feed keeps this many rows (and at least a day); older ones are trimmed every
# TRIM_EVERY changes. revision() needs only the newest.
KEEP_CHANGES = 10_000
TRIM_EVERY = 500
POOL_MAX = 24
CONNECT_TIMEOUT = 10
RETRIES = 4  # stale pooled connections tried before an error is the database's
# How long the pool's own attempt to add a connection retries before it gives up. Its
# backoff doubles (1, 2, 4 ... s, for up to 5 min by default), and while its one
# "growing" attempt waits, no other is made: a bastion blind for a minute would stay
# blind up to a minute more after the database is back. Given up sooner, the next
# caller (see _Shared.getconn: one direct connect first) makes a fresh attempt at once.
RECONNECT_TIMEOUT = 5.0
# A session of ours idle inside a transaction this long is ended by the server, and
# the write lock with it. A bastion frozen or cut off mid-write (power, partition,
# SIGSTOP) sends no FIN: without this its session holds the cluster-wide write lock
# until TCP keepalive gives up (hours) and every bastion's writes wait behind it. No
# transaction of ours waits between statements for anything but Python.
IDLE_IN_TRANSACTION_TIMEOUT = 30.0
# A peer that vanishes without a FIN (power, partition, failover) is noticed in about
# half a minute on both ends, not after the kernel's hours of keepalive or 15 min of
# retransmissions: on our side a read would hang that long (the bastion would stay
# blind after the database came back); on the server's, a powered-off bastion's
# instance lock would stay held and its sessions unswept. libpq's client settings
# are defaults the URL may override; the server's are set per session. Both are
# ignored on Unix sockets.
CLIENT_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}
SERVER_KEEPALIVES = (
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "30000"),
)


def keepalive_kwargs(url: str) -> dict[str, Any]:
    """libpq's keepalive settings for ``url``, except those the URL sets itself."""
    given = conninfo_to_dict(url)
    return {k: v for k, v in CLIENT_KEEPALIVES.items() if k not in given}


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """A connection of its own (listener, instance claim, probe), with the keepalives
    every pooled connection has too."""
    conn = psycopg.connect(url, **keepalive_kwargs(url), **kwargs)
    try:
        server_keepalives(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def server_keepalives(conn: psycopg.Connection[Any]) -> None:
    for name, value in SERVER_KEEPALIVES:
        conn.execute("SELECT set_config(%s, %s, false)", (name, value))


def check_url(url: str) -> dict[str, Any]:
    """:func:`urls.check_url`, then libpq's own parse (a password given as a
    keyword/value string is refused too)."""
    urls.check_url(url)
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise StateError(f"the database URL is not valid: {exc}") from None
    if any(info.get(key) for key in urls.SECRET_PARAMS):
        raise urls.password_refused(url)
    return info


@functools.lru_cache(maxsize=2048)
def _pg(sql: str) -> str:
    """Portable SQL (``?`` placeholders, none inside literals) as psycopg's ``%s``."""
    return sql.replace("%", "%%").replace("?", "%s")


@functools.lru_cache(maxsize=256)
def _one_row_insert(sql: str) -> bool:
    """``INSERT ... VALUES (...)`` of one row, with no conflict clause or RETURNING of
    its own: ``ON CONFLICT DO NOTHING`` writing no row says it broke a unique index."""
    upper = sql.upper()
    if not upper.lstrip().startswith("INSERT INTO") or "ON CONFLICT" in upper:
        return False
    if "RETURNING" in upper or " SELECT " in upper or upper.count(" VALUES ") != 1:
        return False
    values = upper.split(" VALUES ", 1)[1].strip()
    return values.startswith("(") and values.endswith(")") and values.count("(") == 1


def _nul_free(params: tuple[Any, ...]) -> tuple[Any, ...]:
    """PostgreSQL text cannot hold NUL; SQLite's can. A NUL in a value (only ever from
    a client: a user name tried at login, a jump target; stored names are checked) is
    written and looked up as the four characters ``\\x00``, the escape the audit log
    uses: the statement goes through, and matches no name a name check lets in."""
    for p in params:
        if p.__class__ is str and "\x00" in p:
            return tuple(v.replace("\x00", "\\x00") if isinstance(v, str) else v for v in params)
    return params


def _unavailable(what: str, exc: BaseException, url: str) -> StorageUnavailable:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StorageUnavailable(f"cluster database {safe_url(url)} {what}: {text}")


def map_error(exc: BaseException, url: str, what: str = "failed") -> BaseException:
    """A psycopg error as the store's own (non-psycopg errors unchanged)."""
    if isinstance(exc, pgerrors.UniqueViolation):
        return Duplicate(str(exc))
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)):
        return _unavailable(what, exc, url)
    if isinstance(exc, psycopg.Error):
        return StateError(f"cluster database error: {exc}")
    return exc


class _Tx:
    """A transaction open on one thread, and the connection it holds."""

    __slots__ = ("conn", "read_only", "bump", "after_commit", "cache", "pending", "sent")

    def __init__(self, conn: psycopg.Connection[Any], read_only: bool) -> None:
        self.conn = conn
        self.read_only = read_only
        self.bump = False
        self.after_commit: list[Callable[[], None]] = []
        # What a noun learnt under this transaction's write lock (the audit tail):
        # emptied when a savepoint rolls back (see StoreBase._tx_cache).
        self.cache: dict[str, Any] = {}
        # Statements with no result anyone reads (a savepoint begun or released), sent
        # in the same round trip as the next statement, before it; and how many round
        # trips have sent such statements (see PostgresBase.savepoint).
        self.pending: list[str] = []
        self.sent = 0

    def run(self, sql: str, params: tuple[Any, ...] | None = None) -> psycopg.Cursor[Any]:
        """``sql`` on this transaction's connection, after what was deferred to it, in
        one round trip: parameterless statements as one simple query, others in
        pipeline mode. The server runs them in order, as if sent one by one; the first
        error is raised and the transaction is then aborted, as it would be."""
        if not self.pending:
            return self.conn.execute(sql, params)
        pending, self.pending = self.pending, []
        self.sent += 1
        if params is None:
            return self.conn.execute("; ".join([*pending, sql]))
        with self.conn.pipeline():
            for statement in pending:
                self.conn.execute(statement)
            cursor = self.conn.execute(sql, params)
        return cursor


class _Shared:
    """What a store and its siblings share: the pool, the URL, and a count of users."""

    def __init__(self, url: str, pool: ConnectionPool[Any]) -> None:
        self.url = url
        self.pool = pool
        self.users = 1
        self.lock = threading.Lock()
        self.origin = f"{socket.gethostname()}:{os.getpid()}"
        # Set when a connection was found dead: until one direct connect works again,
        # callers are told at once (the pool would make each wait its full timeout).
        self.down = False

    def getconn(self) -> psycopg.Connection[Any]:
        if self.down:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
            except psycopg.Error as exc:
                raise _unavailable("cannot be reached", exc, self.url) from None
            self.down = False
            with contextlib.suppress(Exception):
                self.pool.check()  # throw away the connections that died meanwhile
        try:
            return self.pool.getconn()
        except PoolTimeout as exc:
            self.down = True
            raise _unavailable("cannot be reached", exc, self.url) from None

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            last = self.users == 0
        if last:
            self.pool.close()


def _configure(conn: psycopg.Connection[Any]) -> None:
    ms = str(int(IDLE_IN_TRANSACTION_TIMEOUT * 1000))
    conn.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, false)", (ms,))
    server_keepalives(conn)


def make_pool(url: str, *, max_size: int = POOL_MAX) -> ConnectionPool[Any]:
    check_url(url)
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "row_factory": dict_row,
        "connect_timeout": CONNECT_TIMEOUT,
        **keepalive_kwargs(url),
    }
    try:  # one direct attempt first: it fails at once, and says why (the pool would not)
        psycopg.connect(url, **kwargs).close()
    except psycopg.Error as exc:
        raise _unavailable("cannot be reached", exc, url) from None
    pool: ConnectionPool[Any] = ConnectionPool(
        url, min_size=1, max_size=max_size, kwargs=kwargs, open=False,
        timeout=CONNECT_TIMEOUT, reconnect_timeout=RECONNECT_TIMEOUT, name="dt-bastion",
        configure=_configure,
    )  # fmt: skip
    try:
        pool.open(wait=True, timeout=CONNECT_TIMEOUT)
    except PoolTimeout as exc:
        pool.close()
        raise _unavailable("cannot be reached", exc, url) from None
    return pool


class PostgresBase(StoreBase):
    """PostgreSQL connections and their transactions; the noun modules build on it."""

    def __init__(self, shared: _Shared, state_dir: Path | None) -> None:
        self._shared = shared
        self.url = shared.url
        self.state_dir = state_dir
        self.path = None
        self._local = threading.local()
        self._closed = False
        self._listener: psycopg.Connection[Any] | None = None
        self._listener_lock = threading.Lock()
        self._unheard = False  # the listener could not connect (said once per outage)

    # -- connections -------------------------------------------------------------------

    def _tx(self) -> _Tx | None:
        return getattr(self._local, "tx", None)

    def _getconn(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise StateError(f"cluster database {safe_url(self.url)} was closed")
        try:
            return self._shared.getconn()
        except psycopg.Error as exc:
            raise map_error(exc, self.url, "cannot be reached") from None

    def _putconn(self, conn: psycopg.Connection[Any]) -> None:
        if conn.closed:
            self._shared.down = True  # the next caller checks before it waits
        with contextlib.suppress(Exception):
            self._shared.pool.putconn(conn)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._listener_lock:
            if self._listener is not None:
                with contextlib.suppress(Exception):
                    self._listener.close()
                self._listener = None
        self._shared.release()

    # -- statements --------------------------------------------------------------------

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        tx = self._tx()
        if tx is not None:
            try:
                return tx.run(_pg(sql), _nul_free(params)).fetchall()
            except psycopg.Error as exc:
                raise map_error(exc, self.url, "read failed") from None
        params = _nul_free(params)
        for attempt in range(RETRIES):  # pooled connections the server dropped: again
            conn = self._getconn()
            try:
                return conn.execute(_pg(sql), params).fetchall()
            except psycopg.OperationalError as exc:
                if attempt == RETRIES - 1 or not conn.closed:
                    raise map_error(exc, self.url, "read failed") from None
            except psycopg.Error as exc:
                raise map_error(exc, self.url, "read failed") from None
            finally:
                self._putconn(conn)
        raise AssertionError("unreachable")

    def _execute(self, sql: str, params: tuple[Any, ...] = (), *, unique: bool = False) -> int:
        tx = self._write_tx()
        params = _nul_free(params)
        try:
            if not unique:
                return tx.run(_pg(sql), params).rowcount
            if _one_row_insert(sql):
                # One round trip, not three (SAVEPOINT, INSERT, RELEASE): the row either
                # goes in or conflicts with a unique index, and then nothing is written
                # and the transaction stays usable, as a rolled-back savepoint leaves it.
                count = tx.run(_pg(sql) + " ON CONFLICT DO NOTHING", params).rowcount
                if count == 0:
                    raise Duplicate(f"a unique constraint refused: {sql.split('(', 1)[0]}")
                return count
            tx.run("SAVEPOINT dup")
            try:
                count = tx.conn.execute(_pg(sql), params).rowcount
            except pgerrors.UniqueViolation as exc:
                tx.cache.clear()
                tx.conn.execute("ROLLBACK TO SAVEPOINT dup")
                tx.conn.execute("RELEASE SAVEPOINT dup")
                raise Duplicate(str(exc)) from None
            tx.conn.execute("RELEASE SAVEPOINT dup")
            return count
        except psycopg.Error as exc:
            raise map_error(exc, self.url, "write failed") from None

    def _insert_returning_id(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        tx = self._write_tx()
        try:
            row = tx.run(_pg(sql) + " RETURNING id", _nul_free(params)).fetchone()
        except psycopg.Error as exc:
            raise map_error(exc, self.url, "write failed") from None
        return int(row["id"]) if row else 0

    def _tx_cache(self) -> dict[str, Any] | None:
        tx = self._tx()
        return tx.cache if tx is not None and not tx.read_only else None

    def _write_tx(self) -> _Tx:
        tx = self._tx()
        if tx is None or tx.read_only:
            raise RuntimeError("a write needs an open write transaction")
        return tx

    # -- transactions ------------------------------------------------------------------

    def _begin(self, begin: str, *, lock: bool) -> psycopg.Connection[Any]:
        """A pooled connection with a transaction begun on it (and, for a write, the
        cluster-wide write lock taken). A connection the server dropped while it sat
        in the pool (a restart) is thrown away and another tried."""
        for attempt in range(RETRIES):
            conn = self._getconn()
            try:
                # One round trip: with no parameters psycopg sends the simple-query
                # protocol, which runs both statements in order; the lock is still the
                # transaction's first statement.
                conn.execute(f"{begin}; SELECT pg_advisory_xact_lock({WRITE_KEY})" if lock else begin)
                return conn
            except psycopg.Error as exc:
                closed = conn.closed
                if not closed:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                self._putconn(conn)
                if attempt == RETRIES - 1 or not closed:
                    raise map_error(
                        exc, self.url, "is unwritable" if lock else "read failed"
                    ) from None
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def transaction(self, *, bump: bool = True) -> Iterator[None]:
        """One atomic unit holding the cluster-wide write lock from its start. Nested
        calls join the outer transaction."""
        tx = self._tx()
        if tx is not None:
            if tx.read_only:
                raise RuntimeError("a write transaction cannot join a read snapshot")
            tx.bump |= bump
            yield
            return
        conn = self._begin("BEGIN", lock=True)
        tx = _Tx(conn, read_only=False)
        tx.bump = bump
        try:
            self._local.tx = tx
            try:
                yield
                if tx.bump:
                    self._bump(tx)
                tx.run("COMMIT")
            except BaseException as exc:
                tx.after_commit = []
                with contextlib.suppress(Exception):
                    if not conn.closed:
                        conn.execute("ROLLBACK")
                mapped = map_error(exc, self.url, "write failed")
                if mapped is exc:
                    raise
                raise mapped from None
        finally:
            self._local.tx = None
            self._putconn(conn)
        for callback in tx.after_commit:
            callback()

    def _bump(self, tx: _Tx) -> None:
        row = tx.run(
            "WITH c AS (INSERT INTO changes (time, origin) VALUES (%s, %s) RETURNING seq) "
            "SELECT seq, pg_notify(%s, seq::text) FROM c",
            (time.time(), self._shared.origin, CHANNEL),
        ).fetchone()
        seq = int(row["seq"]) if row else 0
        if seq % TRIM_EVERY == 0:
            tx.run(
                "DELETE FROM changes WHERE seq < %s AND time < %s",
                (seq - KEEP_CHANGES, time.time() - 86400),
            )

    def after_commit(self, callback: Callable[[], None]) -> None:
        tx = self._tx()
        if tx is not None and not tx.read_only:
            tx.after_commit.append(callback)
            return
        callback()

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        tx = self._tx()
        if tx is None or tx.read_only:
            raise RuntimeError("savepoint() needs an open transaction")
        # SAVEPOINT and RELEASE go with the statement after them (see _Tx.run): a
        # savepoint costs no round trip of its own, and one nothing ran in is never
        # sent. Every statement in it still runs after its SAVEPOINT, and every one
        # after it after its RELEASE (or ROLLBACK TO, sent at once).
        tx.pending.append("SAVEPOINT part")
        sent = tx.sent
        callbacks = len(tx.after_commit)
        try:
            yield
        except BaseException:
            del tx.after_commit[callbacks:]
            tx.cache.clear()
            if tx.sent == sent:  # never sent: nothing to undo (inner ones took theirs out)
                tx.pending.pop()
                raise
            with contextlib.suppress(psycopg.Error):
                tx.run("ROLLBACK TO SAVEPOINT part; RELEASE SAVEPOINT part")
            raise
        if tx.sent == sent:
            tx.pending.pop()
        else:
            tx.pending.append("RELEASE SAVEPOINT part")

    @contextlib.contextmanager
    def read_transaction(self) -> Iterator[None]:
        """One consistent snapshot (REPEATABLE READ READ ONLY); joins an open one."""
        if self._tx() is not None:
            yield
            return
        conn = self._begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", lock=False)
        try:
            self._local.tx = _Tx(conn, read_only=True)
            try:
                yield
            finally:
                self._local.tx = None
                with contextlib.suppress(psycopg.Error):
                    conn.execute("COMMIT")
        finally:
            self._putconn(conn)

    # -- the change feed ---------------------------------------------------------------

    def revision(self) -> int:
        row = self._one("SELECT coalesce(max(seq), 0) AS seq FROM changes")
        return int(row["seq"]) if row else 0

    def wait_for_change(self, timeout: float) -> None:
        """Return after a change commits anywhere, or after ``timeout`` seconds; at
        once after (re)connecting the listener, so the caller catches up on what
        it missed meanwhile by reading ``revision()``."""
        with self._listener_lock:
            conn = self._listener
            if conn is None or conn.closed:
                try:
                    # 2 s: libpq's least; a refused connection fails at once.
                    conn = connect(self.url, autocommit=True, connect_timeout=2)
                    conn.execute(f"LISTEN {CHANNEL}")
                except psycopg.Error as exc:
                    if conn is not None:  # connected but LISTEN failed: not left open
                        with contextlib.suppress(Exception):
                            conn.close()
                    if not self._unheard:  # once, not at every wait of the outage
                        log.warning("cannot listen for changes on %s: %s", safe_url(self.url), exc)
                    self._unheard, self._listener = True, None
                    time.sleep(timeout)
                    return
                if self._unheard:
                    log.info("listening for changes on %s again", safe_url(self.url))
                self._unheard, self._listener = False, conn
                return  # anything may have changed while we were not listening
            try:
                for _ in conn.notifies(timeout=timeout, stop_after=1):
                    break
                for _ in conn.notifies(timeout=0.001):  # a burst wakes us once
                    pass
            except psycopg.Error as exc:
                log.warning("lost the change feed on %s: %s", safe_url(self.url), exc)
                with contextlib.suppress(Exception):
                    conn.close()
                self._listener = None
