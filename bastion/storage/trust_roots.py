"""EK certificate roots an admin trusts for device enrollment.

Kept in the database with the rest of the state, so every bastion on it agrees.
"""

from __future__ import annotations

import time
from typing import Any

from bastion.protocol.errors import AlreadyExists, NotFound
from bastion.storage.base import Duplicate, StoreBase


class TrustRootStore(StoreBase):
    """The trust_roots table."""

    def add_trust_root(self, fingerprint: str, subject: str, pem: str) -> None:
        try:
            self._exec(
                "INSERT INTO trust_roots (fingerprint, subject, pem, added) VALUES (?,?,?,?)",
                (fingerprint, subject, pem, time.time()),
                unique=True,
            )
        except Duplicate:
            raise AlreadyExists(f"trust root {fingerprint} is already configured") from None

    def list_trust_roots(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM trust_roots ORDER BY added")

    def remove_trust_root(self, fingerprint: str) -> None:
        if self._exec("DELETE FROM trust_roots WHERE fingerprint = ?", (fingerprint,)) != 1:
            raise NotFound(f"no trust root with fingerprint {fingerprint}")
