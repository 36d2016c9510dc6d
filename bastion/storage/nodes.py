"""The node inventory: the only addresses the bastion forwards to.

Name and address are each unique, so a jump is matched to exactly one node.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from bastion.authz.records import Node
from bastion.protocol.errors import AlreadyExists, NotFound
from bastion.storage.base import Duplicate, StoreBase
from bastion.storage.codec import dumps as _j


class NodeStore(StoreBase):
    """The nodes table."""

    @staticmethod
    def _node(row: dict[str, Any]) -> Node:
        return Node(
            name=row["name"],
            host=row["host"],
            port=int(row["port"]),
            labels=json.loads(row["labels"] or "{}"),
            created=row["created"] or 0.0,
        )

    def add_node(self, node: Node) -> Node:
        node = replace(node, created=time.time())
        try:
            self._exec(
                "INSERT INTO nodes (name, host, port, labels, created) VALUES (?,?,?,?,?)",
                (node.name, node.host, node.port, _j(node.labels), node.created),
                unique=True,
            )
        except Duplicate:
            raise AlreadyExists(
                f'node "{node.name}" or address {node.addr} is already in the inventory'
            ) from None
        return node

    def find_node(self, name: str) -> Node | None:
        row = self._one("SELECT * FROM nodes WHERE name = ?", (name,))
        return self._node(row) if row else None

    def find_node_by_addr(self, host: str, port: int) -> Node | None:
        row = self._one("SELECT * FROM nodes WHERE host = ? AND port = ?", (host, port))
        return self._node(row) if row else None

    def list_nodes(self) -> list[Node]:
        return [self._node(r) for r in self._all("SELECT * FROM nodes ORDER BY name")]

    def remove_node(self, name: str) -> None:
        if self._exec("DELETE FROM nodes WHERE name = ?", (name,)) != 1:
            raise NotFound(f'node "{name}" not found')
