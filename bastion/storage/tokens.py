"""Single-use tokens (signup, enrollment), stored by hash only.

Spending one is a compare-and-set: of several racing callers exactly one wins.
"""

from __future__ import annotations

import time
from dataclasses import replace

from bastion.authz.records import Token
from bastion.protocol.errors import NotFound
from bastion.storage.base import StoreBase


class TokenStore(StoreBase):
    """The tokens table."""

    def add_token(self, token: Token) -> Token:
        token = replace(token, created=time.time())
        self._exec(
            "INSERT INTO tokens (token_hash, kind, subject, expires, created, created_by) "
            "VALUES (?,?,?,?,?,?)",
            (
                token.token_hash,
                token.kind,
                token.subject,
                token.expires,
                token.created,
                token.created_by,
            ),
        )
        return token

    def find_token(self, token_hash: str, kind: str) -> Token | None:
        row = self._one(
            "SELECT * FROM tokens WHERE token_hash = ? AND kind = ?", (token_hash, kind)
        )
        return Token(**row) if row else None

    def consume_token(self, token_hash: str, kind: str, *, now: float, consumer: str) -> bool:
        """Mark a live token used. Exactly one of several racing callers gets True.

        Call it inside the transaction that also stores what the token paid for, so a
        crash between the two leaves the token unused rather than silently burnt.
        """
        return (
            self._exec(
                "UPDATE tokens SET consumed = ?, consumed_by = ? WHERE token_hash = ? "
                "AND kind = ? AND consumed IS NULL AND expires > ?",
                (now, consumer, token_hash, kind, now),
            )
            == 1
        )

    def list_tokens(self, kind: str | None = None) -> list[Token]:
        if kind is None:
            rows = self._all("SELECT * FROM tokens ORDER BY created")
        else:
            rows = self._all("SELECT * FROM tokens WHERE kind = ? ORDER BY created", (kind,))
        return [Token(**r) for r in rows]

    def remove_token(self, token_hash: str) -> None:
        if self._exec("DELETE FROM tokens WHERE token_hash = ?", (token_hash,)) != 1:
            raise NotFound("token not found")

    def remove_tokens(self, kind: str, subject: str, token_hash: str | None = None) -> int:
        """Delete ``subject``'s tokens of ``kind`` (only the one with ``token_hash`` if
        given); how many. A deleted bot token stops working at its next use."""
        if token_hash is None:
            return self._exec("DELETE FROM tokens WHERE kind = ? AND subject = ?", (kind, subject))
        return self._exec(
            "DELETE FROM tokens WHERE kind = ? AND subject = ? AND token_hash = ?",
            (kind, subject, token_hash),
        )
