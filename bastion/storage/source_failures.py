"""Failed authentications per client address, shared by every bastion of the cluster.

``max_auth_failures_per_source`` holds across bastions: an address that fails on one
is counted on all, so an attacker spreading guesses over N bastions gets no more than
against one. Each bastion decides on its own counts in memory (the SSH callbacks run
on the event loop and never wait for the database), writes each failure here off the
loop, and on every turn of its watcher reads the other bastions' counts of the last
minute. Rows are keyed by the bastion (``instance``) and its own stamp, so a failure it
forgives (refused keys before a login that succeeded) is removed again.

Portable SQL only (``?`` placeholders, no SQLite-only functions): the same module
serves the PostgreSQL store.
"""

from __future__ import annotations

from collections.abc import Sequence

from bastion.storage.base import StoreBase


class SourceFailureStore(StoreBase):
    """The source_failures table. Written with bump=False: a failure is no state change
    every bastion must re-check its sessions for."""

    def record_source_failure(self, addr: str, when: float, instance: str, stamp: float) -> None:
        self._exec(
            "INSERT INTO source_failures (addr, failed_at, instance, stamp) VALUES (?,?,?,?)",
            (addr, when, instance, stamp),
            bump=False,
        )

    def forgive_source_failures(self, instance: str, stamps: Sequence[float]) -> None:
        with self.transaction(bump=False):
            for stamp in stamps:
                self._execute(
                    "DELETE FROM source_failures WHERE instance = ? AND stamp = ?",
                    (instance, stamp),
                )

    def count_source_failures(
        self, *, since: float, exclude: str | None = None, limit: int = 10000
    ) -> dict[str, int]:
        """Failures per address since ``since`` (but those of bastion ``exclude``),
        the ``limit`` addresses with the most first."""
        rows = self._all(
            "SELECT addr, count(*) AS n FROM source_failures WHERE failed_at >= ? "
            "AND instance <> ? GROUP BY addr ORDER BY n DESC LIMIT ?",
            (since, exclude or "", limit),
        )
        return {str(row["addr"]): int(row["n"]) for row in rows}

    def prune_source_failures(self, before: float) -> int:
        return self._exec("DELETE FROM source_failures WHERE failed_at < ?", (before,), bump=False)
