"""Forwarded sessions open right now, per bastion process.

A process killed with ``kill -9`` cannot write its sessions' ends; the rows it
leaves let the next bastion end them in the audit log.
"""

from __future__ import annotations

from bastion.authz.records import OpenSession
from bastion.storage.base import StoreBase


class OpenSessionStore(StoreBase):
    """The live_sessions table."""

    # Written with bump=False: sessions coming and going are not a state change that
    # every bastion must re-check its live sessions for.

    def add_open_session(self, session: OpenSession) -> None:
        with self.transaction(bump=False):
            self._execute(
                'INSERT INTO live_sessions (instance, session_id, "user", device, node, '
                "remote_addr, serial, started) VALUES (?,?,?,?,?,?,?,?)",
                (
                    session.instance,
                    session.session_id,
                    session.user,
                    session.device,
                    session.node,
                    session.remote_addr,
                    session.serial,
                    session.started,
                ),
            )

    def remove_open_session(self, instance: str, session_id: int) -> None:
        with self.transaction(bump=False):
            self._execute(
                "DELETE FROM live_sessions WHERE instance = ? AND session_id = ?",
                (instance, session_id),
            )

    def list_open_sessions(self, instance: str | None = None) -> list[OpenSession]:
        if instance:
            rows = self._all(
                "SELECT * FROM live_sessions WHERE instance = ? ORDER BY started", (instance,)
            )
        else:
            rows = self._all("SELECT * FROM live_sessions ORDER BY started")
        return [OpenSession(**row) for row in rows]

    def open_session_instances(self) -> list[str]:
        return [r["instance"] for r in self._all("SELECT DISTINCT instance FROM live_sessions")]

    def take_open_sessions(self, instance: str) -> list[OpenSession]:
        """Remove and return an instance's sessions. Called inside the caller's
        transaction, the removal commits together with its audit rows."""
        with self.transaction(bump=False):
            sessions = self.list_open_sessions(instance)
            self._execute("DELETE FROM live_sessions WHERE instance = ?", (instance,))
            return sessions
