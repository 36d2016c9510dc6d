"""Roles, stored as one JSON spec each.

A spec that no longer parses raises :class:`StateError` on read: the decision core
treats an unreadable role as the strictest outcome, never as "no role".
"""

from __future__ import annotations

import json
import time

from bastion.authz.records import Role
from bastion.protocol.errors import AlreadyExists, NotFound, StateError
from bastion.storage.base import StoreBase
from bastion.storage.codec import dumps as _j
from bastion.storage.codec import role_from_spec, role_to_spec


class RoleStore(StoreBase):
    """The roles table."""

    def put_role(self, role: Role, *, create_only: bool = False) -> Role:
        now = time.time()
        spec = _j(role_to_spec(role))
        with self.transaction():
            exists = self._one("SELECT name FROM roles WHERE name = ?", (role.name,))
            if exists and create_only:
                raise AlreadyExists(f'role "{role.name}" already exists')
            self._execute(
                "INSERT INTO roles (name, spec, preset, created, updated) VALUES (?,?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET spec=excluded.spec, updated=excluded.updated",
                (role.name, spec, int(role.preset), now, now),
            )
        return role

    def find_role(self, name: str) -> Role | None:
        row = self._one("SELECT spec FROM roles WHERE name = ?", (name,))
        if row is None:
            return None
        try:
            return role_from_spec(json.loads(row["spec"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise StateError(f'role "{name}" is corrupt in the database: {exc}') from None

    def get_role(self, name: str) -> Role:
        role = self.find_role(name)
        if role is None:
            raise NotFound(f'role "{name}" not found')
        return role

    def list_roles(self) -> list[Role]:
        return [self.get_role(r["name"]) for r in self._all("SELECT name FROM roles ORDER BY name")]

    def remove_role(self, name: str) -> None:
        if self._exec("DELETE FROM roles WHERE name = ?", (name,)) != 1:
            raise NotFound(f'role "{name}" not found')
