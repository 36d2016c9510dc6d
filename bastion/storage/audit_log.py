"""The audit table: append and filter, nothing else.

Appends do not bump the revision: an audit row is not a state change bastions must
re-check their sessions for.
"""

from __future__ import annotations

import json

from bastion.authz.records import AuditEvent
from bastion.storage.codec import dumps as _j
from bastion.storage.connection import SQLiteBase


class AuditStore(SQLiteBase):
    """The audit table."""

    def append_audit(self, event: AuditEvent) -> int:
        with self.transaction(bump=False):
            cur = self._conn.execute(
                "INSERT INTO audit (time, code, type, success, message, user, device, "
                "remote_addr, fields) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    event.time,
                    event.code,
                    event.type,
                    int(event.success),
                    event.message,
                    event.user,
                    event.device,
                    event.remote_addr,
                    _j(event.fields),
                ),
            )
            return int(cur.lastrowid or 0)

    def list_audit(
        self,
        *,
        type: str | None = None,
        user: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[AuditEvent]:
        sql, params = "SELECT * FROM audit WHERE 1=1", list[str | float | int]()
        for column, value in (("type", type), ("user", user)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        if since is not None:
            sql += " AND time >= ?"
            params.append(since)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        rows = self._all(sql, tuple(params))
        return [
            AuditEvent(
                id=r["id"],
                time=r["time"],
                code=r["code"],
                type=r["type"],
                success=bool(r["success"]),
                message=r["message"] or "",
                user=r["user"],
                device=r["device"],
                remote_addr=r["remote_addr"],
                fields=json.loads(r["fields"] or "{}"),
            )
            for r in reversed(rows)
        ]
