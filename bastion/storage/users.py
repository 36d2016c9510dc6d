"""Users: who may log in, with which roles, logins and secrets.

The field-level setters are what callers use after any slow step: each writes only
the columns it names, so a copy of the record read earlier never undoes another
writer's change (DESIGN.md, "No lost updates").
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from bastion.authz.records import User
from bastion.protocol.errors import AlreadyExists, NotFound
from bastion.storage.base import Duplicate, StoreBase
from bastion.storage.codec import dumps as _j


class UserStore(StoreBase):
    """The users table."""

    @staticmethod
    def _user(row: dict[str, Any]) -> User:
        return User(
            name=row["name"],
            roles=tuple(json.loads(row["roles"])),
            logins=tuple(json.loads(row["logins"])),
            password_hash=row["password_hash"],
            totp_secret=row["totp_secret"],
            totp_last_step=row["totp_last_step"],
            created=row["created"] or 0.0,
            updated=row["updated"] or 0.0,
            created_by=row["created_by"] or "",
            bot=bool(row.get("bot") or 0),
        )

    def add_user(self, user: User) -> User:
        now = time.time()
        user = replace(user, created=now, updated=now)
        try:
            self._exec(
                "INSERT INTO users (name, roles, logins, password_hash, totp_secret, "
                "totp_last_step, created, updated, created_by, bot) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    user.name,
                    _j(list(user.roles)),
                    _j(list(user.logins)),
                    user.password_hash,
                    user.totp_secret,
                    user.totp_last_step,
                    now,
                    now,
                    user.created_by,
                    int(user.bot),
                ),
                unique=True,
            )
        except Duplicate:
            raise AlreadyExists(f'user "{user.name}" already exists') from None
        return user

    def find_user(self, name: str) -> User | None:
        row = self._one("SELECT * FROM users WHERE name = ?", (name,))
        return self._user(row) if row else None

    def get_user(self, name: str) -> User:
        user = self.find_user(name)
        if user is None:
            raise NotFound(f'user "{name}" not found')
        return user

    def list_users(self) -> list[User]:
        return [self._user(r) for r in self._all("SELECT * FROM users ORDER BY name")]

    def update_user(self, user: User) -> User:
        user = replace(user, updated=time.time())
        count = self._exec(
            "UPDATE users SET roles=?, logins=?, password_hash=?, totp_secret=?, "
            "totp_last_step=?, updated=? WHERE name=?",
            (
                _j(list(user.roles)),
                _j(list(user.logins)),
                user.password_hash,
                user.totp_secret,
                user.totp_last_step,
                user.updated,
                user.name,
            ),
        )
        if count != 1:
            raise NotFound(f'user "{user.name}" not found')
        return user

    # Field-level writes: each changes only what it names, so a change read from an
    # older copy of the record (a login that spent 190 ms in argon2, an admin's
    # editor) cannot undo another's meanwhile. Prefer them to update_user.

    def set_user_roles(self, name: str, roles: tuple[str, ...]) -> None:
        self._set_user_fields(
            name, "UPDATE users SET roles = ?, updated = ? WHERE name = ?", _j(list(roles))
        )

    def set_user_logins(self, name: str, logins: tuple[str, ...]) -> None:
        self._set_user_fields(
            name, "UPDATE users SET logins = ?, updated = ? WHERE name = ?", _j(list(logins))
        )

    def set_user_secrets(
        self,
        name: str,
        password_hash: str | None,
        totp_secret: str | None,
        totp_last_step: int | None,
    ) -> None:
        """Set (or with None, clear) the password and one-time-code app together."""
        self._set_user_fields(
            name,
            "UPDATE users SET password_hash = ?, totp_secret = ?, totp_last_step = ?, "
            "updated = ? WHERE name = ?",
            password_hash,
            totp_secret,
            totp_last_step,
        )

    def _set_user_fields(self, name: str, sql: str, *values: Any) -> None:
        """Run ``sql``, an UPDATE written out by the caller (no SQL is assembled here),
        with ``values``, then the ``updated`` time and ``name``."""
        count = self._exec(sql, (*values, time.time(), name))
        if count != 1:
            raise NotFound(f'user "{name}" not found')

    def consume_totp_step(self, name: str, step: int, password_hash: str) -> bool:
        """Spend a one-time code's time step, only if the password is still the one that
        was checked and no code of this or a later step was used. Exactly one of several
        logins racing with one code gets True; none does after a password reset."""
        return (
            self._exec(
                "UPDATE users SET totp_last_step = ?, updated = ? WHERE name = ? "
                "AND password_hash = ? AND (totp_last_step IS NULL OR totp_last_step < ?)",
                (step, time.time(), name, password_hash, step),
                bump=False,  # nothing a live session is decided on
            )
            == 1
        )

    def remove_user(self, name: str) -> None:
        if self._exec("DELETE FROM users WHERE name = ?", (name,)) != 1:
            raise NotFound(f'user "{name}" not found')
