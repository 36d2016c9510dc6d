"""Cluster state: one interface (:class:`StateStore`), SQLite or PostgreSQL behind it.

Everything above this package talks to the store and gets typed records back
(``bastion.authz.records``), never rows. :class:`StateStore` lists every operation the
shells use. One module per noun (``users``, ``roles``, ``devices``, ``posture``,
``nodes``, ``locks``, ``tokens``, ``certs``, ``trust_roots``, ``logins``,
``source_failures``, ``open_sessions``, ``audit_log``, ``settings``), written in portable SQL over
:class:`base.StoreBase` (see there), joined in ``nouns.Nouns``, makes both stores:

* :class:`SQLiteStore` (also ``Store``), over ``connection.SQLiteBase``: one file
  (WAL) in the state directory, for one host, the embedded default;
* ``postgres.PostgresStore``, over ``pg_connection.PostgresBase``: one PostgreSQL
  database for several bastions on several hosts (pool, a cluster-wide advisory
  write lock, a change feed with NOTIFY, advisory-lock liveness), its own
  migrations (``pg_migrations``). The state directory still holds the keys.

:func:`open_store` is the one way to open either (``database_url`` says which).

Rules that hold everywhere here:

* Every change to users, roles, devices, nodes, locks, tokens, settings or trust
  roots bumps ``revision`` in the same transaction. Running bastions poll that one
  integer (not whole tables) and re-check their live sessions when it moves.
* A database we cannot read, or one written by a newer schema, raises
  :class:`StateError`: a bastion stops rather than guess.
* A write changes only the fields it means to; where a read came first (a login's
  argon2, an admin's edit), it is a compare-and-set or runs in the read's write
  transaction (``users.consume_totp_step``, ``logins.begin_login_attempt``).
* Nothing in a process touches the database file outside SQLite once it has a
  connection to it (``files.connect``): closing any descriptor of the file would drop
  the process's locks on it, and another process would then delete the -wal under it.

Threads. A store may be shared by threads, and none waits for another's: each thread
gets a connection of its own on first use (closed with the store, or once its thread
has ended), so a reader is never queued behind a writer that waits up to the busy
timeout (10 s) for another process's write lock, and a transaction is its thread's
alone (another thread sees the last commit, neither joining nor waiting for it). For a
worker pool, ``store.sibling()`` is a cheap store per worker (SQLite: the file opened
again with no quick_check, no migration, and no access to the file outside SQLite;
PostgreSQL: the same pool). The executor that keeps storage work off the event loop is the
proxy's (``bastion/proxy/workers.py``), not this package's. An in-memory store has
one connection, which its threads take in turn.
"""

from __future__ import annotations

import os
from pathlib import Path

from bastion.storage.codec import role_from_spec, role_to_spec
from bastion.storage.connection import DB_NAME
from bastion.storage.interface import StateStore
from bastion.storage.sqlite import SQLiteStore
from bastion.storage.urls import check_url, safe_url

Store = SQLiteStore
DATABASE_ENV = "DT_DATABASE"

__all__ = [
    "Store",
    "SQLiteStore",
    "StateStore",
    "DB_NAME",
    "DATABASE_ENV",
    "database_url",
    "open_store",
    "safe_url",
    "role_to_spec",
    "role_from_spec",
]


def database_url(flag: str | None = None, config: str | None = None) -> str | None:
    """Which database holds the state: a flag (``dtadmin --database``), else
    ``$DT_DATABASE``, else the bastion config's ``database``; None means SQLite in
    the state directory. A URL with a password is refused where it is used."""
    return flag or os.environ.get(DATABASE_ENV) or config or None


def open_store(
    state_dir: Path | str,
    database: str | None = None,
    *,
    create: bool = False,
    check: bool = True,
) -> StateStore:
    """The one way to open the cluster's state: PostgreSQL at ``database`` (a
    ``postgresql://`` URL; the state directory still holds the keys and run/), or
    SQLite in ``state_dir``. ``check=False``: no integrity check or migration."""
    if database:
        check_url(database)  # before psycopg is even imported
        from bastion.storage.postgres import PostgresStore  # psycopg only when used

        return PostgresStore.open(database, Path(state_dir), create=create, check=check)
    return SQLiteStore.open(state_dir, create=create, check=check)
