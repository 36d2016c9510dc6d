"""Issued certificates: every serial the CA handed out, and its revocation.

A certificate is handed out only after its record commits, so what a bastion is
shown can always be compared with what was issued.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bastion.authz.records import IssuedCert
from bastion.protocol.errors import NotFound
from bastion.storage.base import Duplicate, StoreBase
from bastion.storage.codec import dumps as _j


class CertStore(StoreBase):
    """The issued_certs table."""

    @staticmethod
    def _cert(row: dict[str, Any]) -> IssuedCert:
        return IssuedCert(
            serial=int(row["serial"]),
            key_id=row["key_id"],
            user=row["user"] or "",
            cert_type=row["cert_type"],
            principals=tuple(json.loads(row["principals"] or "[]")),
            valid_after=int(row["valid_after"]),
            valid_before=int(row["valid_before"]),
            public_key_fingerprint=row["fingerprint"] or "",
            device_id=row["device_id"],
            issued=row["issued"] or 0.0,
            revoked=row["revoked"],
        )

    def record_cert(self, cert: IssuedCert) -> bool:
        """Record an issued serial; False if that serial was already taken."""
        try:
            with self.transaction(bump=False):
                self._execute(
                    'INSERT INTO issued_certs (serial, key_id, "user", cert_type, principals, '
                    "valid_after, valid_before, fingerprint, device_id, issued) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        cert.serial,
                        cert.key_id,
                        cert.user,
                        cert.cert_type,
                        _j(list(cert.principals)),
                        cert.valid_after,
                        cert.valid_before,
                        cert.public_key_fingerprint,
                        cert.device_id,
                        cert.issued or time.time(),
                    ),
                    unique=True,
                )
        except Duplicate:
            return False
        return True

    def find_cert(self, serial: int) -> IssuedCert | None:
        row = self._one("SELECT * FROM issued_certs WHERE serial = ?", (serial,))
        return self._cert(row) if row else None

    def count_user_certs(self, user: str, *, since: float) -> int:
        """User certificates issued to ``user`` after ``since``: the issuance rate
        (``max_certs_per_user_per_minute``) is counted here, cluster-wide."""
        row = self._one(
            "SELECT COUNT(*) AS n FROM issued_certs "
            "WHERE \"user\" = ? AND cert_type = 'user' AND issued > ?",
            (user, since),
        )
        return int(row["n"]) if row else 0

    def list_certs(
        self, *, user: str | None = None, key_id: str | None = None, revoked: bool | None = None
    ) -> list[IssuedCert]:
        sql, params = "SELECT * FROM issued_certs WHERE 1=1", []
        if user is not None:
            sql += ' AND "user" = ?'
            params.append(user)
        if key_id is not None:
            sql += " AND key_id = ?"
            params.append(key_id)
        if revoked is not None:
            sql += " AND revoked IS NOT NULL" if revoked else " AND revoked IS NULL"
        return [self._cert(r) for r in self._all(sql + " ORDER BY issued", tuple(params))]

    def revoke_certs(
        self,
        now: float,
        *,
        serials: tuple[int, ...] = (),
        key_id: str | None = None,
        user: str | None = None,
        everything: bool = False,
    ) -> list[IssuedCert]:
        """Revoke every unrevoked user certificate matching any selector; returns them.

        One statement per selector inside the caller's transaction, so a revocation and
        its audit row land together and the bastion's watcher sees the revision move.
        """
        clauses: list[str] = []
        params: list[Any] = []
        if serials:
            clauses.append(f"serial IN ({','.join('?' * len(serials))})")
            params.extend(serials)
        if key_id is not None:
            clauses.append("key_id = ?")
            params.append(key_id)
        if user is not None:
            clauses.append('"user" = ?')
            params.append(user)
        if everything:
            clauses.append("1=1")
        if not clauses:
            return []
        # Only the literal clauses above (one ? per serial) go into the SQL; every value
        # is a parameter.
        where = f"cert_type = 'user' AND revoked IS NULL AND ({' OR '.join(clauses)})"
        with self.transaction():
            rows = self._all(f"SELECT * FROM issued_certs WHERE {where}", tuple(params))  # nosec B608
            update = f"UPDATE issued_certs SET revoked = ? WHERE {where}"  # nosec B608
            self._execute(update, (now, *params))
        return [self._cert(r) for r in rows]

    def revoke_cert(self, serial: int, now: float) -> None:
        if (
            self._exec(
                "UPDATE issued_certs SET revoked = ? WHERE serial = ? AND revoked IS NULL",
                (now, serial),
            )
            != 1
        ):
            raise NotFound(f"no unrevoked certificate with serial {serial}")
