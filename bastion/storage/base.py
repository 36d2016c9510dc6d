"""What every noun module builds on, whichever database is under it.

The noun modules (``users``, ``tokens``, ``audit_log``...) subclass :class:`StoreBase`
and speak one portable SQL: ``?`` placeholders (a PostgreSQL store translates them),
the column ``"user"`` always quoted (bare ``user`` is CURRENT_USER in PostgreSQL), no
``lastrowid`` (:meth:`StoreBase._insert_returning_id`), no functions only one engine
has, and a unique violation arrives as :class:`Duplicate`, never as a driver's
exception. :class:`bastion.storage.connection.SQLiteBase` and
:class:`bastion.storage.pg_connection.PostgresBase` implement it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any


class Duplicate(Exception):
    """A write broke a unique constraint (a name, a serial, an address already taken).

    Raised by the bases for statements run with ``unique=True``; the noun modules turn
    it into the message a user sees (``AlreadyExists``) or a False."""


class StoreBase:
    """The connection-level operations the noun modules use (see module docstring).

    ``path`` is the SQLite file (None for an in-memory store and for PostgreSQL);
    ``state_dir`` is the directory that holds the CA and audit keys beside the state
    (None where there is none: an in-memory store).
    """

    path: Path | None = None
    state_dir: Path | None = None

    # -- transactions (see StateStore for what each promises)
    def transaction(self, *, bump: bool = True) -> AbstractContextManager[None]:
        raise NotImplementedError

    def read_transaction(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def savepoint(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def after_commit(self, callback: Callable[[], None]) -> None:
        raise NotImplementedError

    def _tx_cache(self) -> dict[str, Any] | None:
        """A dict kept for the write transaction open on this thread, emptied when a
        savepoint in it rolls back and gone with it; None where there is none (no write
        transaction, or a backend whose statements are too cheap to save). What is kept
        must have been read or written under the write lock, so nobody else changes it."""
        return None

    # -- statements
    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows as dicts (in a transaction if one is open on this thread)."""
        raise NotImplementedError

    def _execute(self, sql: str, params: tuple[Any, ...] = (), *, unique: bool = False) -> int:
        """Run a write inside the transaction open on this thread; rows changed.

        ``unique``: the statement may break a unique constraint, which raises
        :class:`Duplicate` and leaves the open transaction usable (PostgreSQL runs such
        a statement in a savepoint of its own; SQLite undoes only the statement)."""
        raise NotImplementedError

    def _exec(
        self, sql: str, params: tuple[Any, ...] = (), *, bump: bool = True, unique: bool = False
    ) -> int:
        """One write in a transaction of its own (or joining the open one); rows changed."""
        with self.transaction(bump=bump):
            return self._execute(sql, params, unique=unique)

    def _insert_returning_id(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Run an INSERT into a table with an integer ``id`` key, in the open
        transaction; the new row's id."""
        raise NotImplementedError
