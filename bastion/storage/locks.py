"""Locks on users and devices, with an optional expiry.

A lock is a row, not a flag on the user or device, so `dtadmin lock ls` can show who
locked what and why, and an expired lock needs no clean-up to stop counting.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any

from bastion.authz.records import Lock
from bastion.protocol.errors import NotFound
from bastion.storage.base import StoreBase


class LockStore(StoreBase):
    """The locks table."""

    @staticmethod
    def _lockrec(row: dict[str, Any]) -> Lock:
        return Lock(
            id=row["id"],
            target_kind=row["target_kind"],
            target=row["target"],
            message=row["message"] or "",
            expires=row["expires"],
            created=row["created"] or 0.0,
            created_by=row["created_by"] or "",
        )

    def add_lock(self, lock: Lock) -> Lock:
        lock = replace(lock, id=lock.id or uuid.uuid4().hex[:12], created=time.time())
        self._exec(
            "INSERT INTO locks (id, target_kind, target, message, expires, created, created_by) "
            "VALUES (?,?,?,?,?,?,?)",
            (
                lock.id,
                lock.target_kind,
                lock.target,
                lock.message,
                lock.expires,
                lock.created,
                lock.created_by,
            ),
        )
        return lock

    def list_locks(self, *, now: float | None = None) -> list[Lock]:
        """All locks, or with ``now`` only those in force at that time."""
        locks = [self._lockrec(r) for r in self._all("SELECT * FROM locks ORDER BY created")]
        return locks if now is None else [lk for lk in locks if lk.active(now)]

    def active_lock(self, target_kind: str, target: str, now: float) -> Lock | None:
        rows = self._all(
            "SELECT * FROM locks WHERE target_kind = ? AND target = ? "
            "AND (expires IS NULL OR expires > ?) ORDER BY created LIMIT 1",
            (target_kind, target, now),
        )
        return self._lockrec(rows[0]) if rows else None

    def remove_lock(self, lock_id: str) -> None:
        if self._exec("DELETE FROM locks WHERE id = ?", (lock_id,)) != 1:
            raise NotFound(f'lock "{lock_id}" not found')

    def remove_locks_for(self, target_kind: str, target: str) -> int:
        return self._exec(
            "DELETE FROM locks WHERE target_kind = ? AND target = ?", (target_kind, target)
        )
