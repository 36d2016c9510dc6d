"""Cluster settings and the revision every change bumps.

Running bastions poll ``revision`` (one integer, not whole tables) and re-check their
live sessions when it moves; settings hold the cluster name, the trust mode and the
CA fingerprints, as JSON values.
"""

from __future__ import annotations

import json
from typing import Any

from bastion.protocol.errors import StateError
from bastion.storage.base import StoreBase
from bastion.storage.codec import dumps as _j


class SettingsStore(StoreBase):
    """Settings and the revision."""

    def get_setting(self, key: str, default: Any = None) -> Any:
        row = self._one("SELECT value FROM settings WHERE key = ?", (key,))
        return default if row is None else parse_setting(key, row["value"])

    def _raw_settings(self, *keys: str) -> dict[str, str]:
        """Several settings' stored text in one statement (``parse_setting`` each)."""
        sql = f"SELECT key, value FROM settings WHERE key IN ({','.join('?' * len(keys))})"  # nosec B608
        rows = self._all(sql, keys)
        return {r["key"]: r["value"] for r in rows}

    def set_setting(self, key: str, value: Any) -> None:
        self._exec(
            "INSERT INTO settings (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, _j(value)),
        )


def parse_setting(key: str, value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        raise StateError(f"cluster setting {key!r} is corrupt") from None
