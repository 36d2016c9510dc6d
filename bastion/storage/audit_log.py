"""The audit table: a hash chain appended to, filtered, and checkpointed.

Appends do not bump the revision: an audit row is not a state change bastions must
re-check their sessions for.

Each append reads the last row's hash and writes the new row with its id (the last
id + 1) and its link (:mod:`bastion.storage.audit_chain`) inside the write
transaction (``BEGIN IMMEDIATE``), so two processes appending at once — the bastion's
batching writer and a ``dtadmin`` — queue for the lock and never fork the chain; a
savepoint rolled back in a batch takes its row out, and the next row links to what
is really there. Every ``CHECKPOINT_ROWS`` rows, or on the first append
``CHECKPOINT_SECONDS`` after the last checkpoint, the same transaction adds a
checkpoint signed with the cluster's audit key (``ca/audit_key`` beside the
database); a store without that file (an in-memory store) chains but never signs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz.records import AuditEvent
from bastion.protocol.errors import StateError
from bastion.storage import audit_chain
from bastion.storage.audit_chain import Checkpoint
from bastion.storage.base import StoreBase
from bastion.storage.codec import dumps as _j

log = logging.getLogger("bastion.storage")

CHECKPOINT_ROWS = 256
CHECKPOINT_SECONDS = 60.0
_UNLOADED = object()
_key_lock = threading.Lock()


class AuditStore(StoreBase):
    """The audit table and its checkpoints."""

    _audit_signer: Any = _UNLOADED
    # The newest checkpoint this store knows of, (row id, time): read once, then kept
    # as this store commits checkpoints. Another process's newer checkpoint only
    # makes ours come early, never late; the chain does not depend on it.
    _last_checkpoint: tuple[int, float] | None = None

    def append_audit(self, event: AuditEvent) -> int:
        with self.transaction(bump=False):
            # The tail read under the write lock, or the row this transaction appended
            # last: nobody else appends before it commits, and a savepoint rolled back
            # forgets it (it may have taken that row out).
            cache = self._tx_cache()
            last = cache.get("audit_tail") if cache is not None else None
            if last is None:
                last = self._one("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1")
            row_id = (last["id"] + 1) if last else 1
            row: dict[str, Any] = {
                "id": row_id,
                "time": float(event.time),
                "code": event.code,
                "type": event.type,
                "success": int(event.success),
                "message": event.message,
                "user": event.user,
                "device": event.device,
                "remote_addr": event.remote_addr,
                "fields": _j(event.fields),
            }
            prev = bytes.fromhex(last["hash"]) if last and last["hash"] else audit_chain.GENESIS
            row_hash = audit_chain.link(prev, row).hex()
            self._execute(
                'INSERT INTO audit (id, time, code, type, success, message, "user", device, '
                "remote_addr, fields, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (*row.values(), row_hash),
            )
            if cache is not None:
                cache["audit_tail"] = {"id": row_id, "hash": row_hash}
            self._checkpoint_if_due(row_id, row_hash)
            return int(row_id)

    # -- checkpoints ---------------------------------------------------------------------

    def _audit_key(self) -> ed25519.Ed25519PrivateKey | None:
        """The audit key, loaded once per store; None where there is none."""
        signer = self._audit_signer
        if signer is not _UNLOADED:
            return signer
        with _key_lock:
            if self._audit_signer is _UNLOADED:
                self._audit_signer = _load_audit_key(self.state_dir)
        return self._audit_signer

    def _checkpoint_if_due(self, row_id: int, row_hash: str) -> None:
        key = self._audit_key()
        if key is None:
            return
        last = self._last_checkpoint
        if last is None:
            found = self._one("SELECT row_id, time FROM audit_checkpoints ORDER BY id DESC LIMIT 1")
            if found is None and row_id > 1:
                # Rows, a key, and no checkpoint: they were deleted (an old cluster's
                # first one is signed by Cluster.open). Never sign over that.
                log.error(
                    "audit: no checkpoint before row %s although the audit key exists: "
                    "checkpoints were removed; not signing (run dtadmin audit verify)",
                    row_id,
                )
                return
            last = self._last_checkpoint = (found["row_id"], found["time"]) if found else (0, 0.0)
        now = time.time()
        if 0 <= row_id - last[0] < CHECKPOINT_ROWS and now - last[1] < CHECKPOINT_SECONDS:
            return
        self._insert_checkpoint(key, row_id, row_hash, now)

    def _insert_checkpoint(
        self, key: ed25519.Ed25519PrivateKey, row_id: int, row_hash: str, now: float
    ) -> Checkpoint:
        from bastion.protocol.certs import fingerprint

        signature = audit_chain.sign_checkpoint(key, row_id, row_hash, now)
        fp = fingerprint(key.public_key())
        checkpoint_id = self._insert_returning_id(
            "INSERT INTO audit_checkpoints (row_id, row_hash, time, key, signature) "
            "VALUES (?,?,?,?,?)",
            (row_id, row_hash, now, fp, signature),
        )
        # At once, not after commit: the rows after it in this batch are not due. If
        # the batch rolls back, the next checkpoint comes up to one period late.
        self._last_checkpoint = (row_id, now)
        return Checkpoint(checkpoint_id, row_id, row_hash, now, fp, signature)

    def checkpoint_audit(self) -> Checkpoint | None:
        """Sign the last row now (``dtadmin audit verify --checkpoint``); None if the
        log is empty. Raises StateError if this store has no audit key."""
        key = self._audit_key()
        if key is None:
            raise StateError("this cluster has no audit key (ca/audit_key) to sign with")
        with self.transaction(bump=False):
            last = self._one("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1")
            if not last:
                return None
            done = self._one(
                "SELECT * FROM audit_checkpoints WHERE row_id = ? AND row_hash = ? "
                "ORDER BY id DESC LIMIT 1",
                (last["id"], last["hash"]),
            )
            if done:
                return _checkpoint(done)
            return self._insert_checkpoint(key, last["id"], last["hash"], time.time())

    def checkpoint_audit_if_stale(self, now: float) -> Checkpoint | None:
        """Sign the last row if rows after the newest checkpoint have waited longer
        than ``CHECKPOINT_SECONDS`` (the bastion's sweep calls this): on a quiet log
        the last rows of a burst are not left unsigned until the next event."""
        if self._audit_key() is None:
            return None
        with self.read_transaction():
            last = self._one("SELECT id, time FROM audit ORDER BY id DESC LIMIT 1")
            cp = self.last_audit_checkpoint()
        if last is None or (cp is not None and cp.row_id >= last["id"]):
            return None
        if cp is None and last["id"] > 1:
            return None  # checkpoints were removed: see _checkpoint_if_due
        if cp is not None and now - cp.time < CHECKPOINT_SECONDS:
            return None
        return self.checkpoint_audit()

    def last_audit_checkpoint(self) -> Checkpoint | None:
        row = self._one("SELECT * FROM audit_checkpoints ORDER BY id DESC LIMIT 1")
        return _checkpoint(row) if row else None

    def list_audit_checkpoints(self, *, after: int = 0) -> list[Checkpoint]:
        """Checkpoints in the order they were made (``after``: only those after that id)."""
        rows = self._all("SELECT * FROM audit_checkpoints WHERE id > ? ORDER BY id", (after,))
        return [_checkpoint(r) for r in rows]

    def audit_chain_rows(self, batch: int = 5000) -> Iterator[dict[str, Any]]:
        """Every row as stored, in id order, for verify (read in batches)."""
        after = None
        while True:
            rows = self._all(
                "SELECT * FROM audit WHERE id > ? ORDER BY id LIMIT ?",
                (after if after is not None else -(2**63), batch),
            )
            yield from rows
            if len(rows) < batch:
                return
            after = rows[-1]["id"]

    # -- reading ---------------------------------------------------------------------

    def list_audit(
        self,
        *,
        type: str | tuple[str, ...] | None = None,
        user: str | None = None,
        since: float | None = None,
        after_id: int | None = None,
        limit: int = 1000,
        oldest_first: bool = False,
    ) -> list[AuditEvent]:
        """Events matching every filter given, oldest first: the newest ``limit`` of
        them, or with ``oldest_first`` the first ``limit`` (for paging forward from
        ``after_id``, as ``ls --follow`` and the export do)."""
        sql, params = "SELECT * FROM audit WHERE 1=1", list[str | float | int]()
        types = (type,) if isinstance(type, str) else type
        if types:
            sql += f" AND type IN ({','.join('?' * len(types))})"
            params.extend(types)
        if user is not None:
            sql += ' AND "user" = ?'
            params.append(user)
        if since is not None:
            sql += " AND time >= ?"
            params.append(since)
        if after_id is not None:
            sql += " AND id > ?"
            params.append(after_id)
        sql += f" ORDER BY id {'ASC' if oldest_first else 'DESC'} LIMIT ?"
        params.append(limit)
        rows = self._all(sql, tuple(params))
        events = [_event(r) for r in rows]
        return events if oldest_first else events[::-1]

    def last_audit_id(self) -> int:
        row = self._one("SELECT max(id) AS id FROM audit")
        return int(row["id"] or 0) if row else 0


def _event(r: dict[str, Any]) -> AuditEvent:
    return AuditEvent(
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
        hash=r.get("hash"),
    )


def _checkpoint(r: dict[str, Any]) -> Checkpoint:
    return Checkpoint(r["id"], r["row_id"], r["row_hash"], r["time"], r["key"], r["signature"])


def _load_audit_key(state_dir: Any) -> ed25519.Ed25519PrivateKey | None:
    if state_dir is None:
        return None
    from bastion.ca import keys

    path = keys.ca_dir(state_dir) / keys.AUDIT_KEY
    if not path.exists():
        log.warning("no audit key at %s: audit rows are chained but not checkpointed", path)
        return None
    try:
        return keys.load_private_key(path)
    except StateError as exc:
        log.error("audit checkpoints are off: %s", exc.message)
        return None
