"""The embedded store: every noun's table in one SQLite file.

Each noun module adds its own methods (joined in :class:`bastion.storage.nouns.Nouns`)
over :class:`SQLiteBase`'s connection and transactions. It implements
:class:`StateStore`.
"""

from __future__ import annotations

from bastion.storage.connection import SQLiteBase
from bastion.storage.nouns import Nouns


class SQLiteStore(Nouns, SQLiteBase):
    """The cluster's state in one SQLite file (WAL), for one host."""
