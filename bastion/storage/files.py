"""Checks on the database file itself, made before SQLite opens it.

SQLite is forgiving where a security tool must not be: it reads a missing tail as
zeros and turns an empty file into a new database. And a read-only file system makes
it say "unreadable or corrupt", which invites a restore from backup.
"""

from __future__ import annotations

import os
from pathlib import Path

from bastion.protocol.errors import StateError

SQLITE_MAGIC = b"SQLite format 3\x00"


def check_db_file(path: Path) -> None:
    """Refuse a cluster database that was visibly cut short (checklist #27).

    SQLite reads a missing tail as zeros: a file that lost its last bytes (a partial
    copy, a restore onto a full disk) opens and even passes ``integrity_check`` with
    its newest rows silently changed. A whole database is a whole number of pages and,
    with no WAL beside it, at least as long as its header says. A cluster's database
    is never empty either (``init_cluster`` writes it), and SQLite would quietly start
    a new one in an empty file.
    """
    try:
        with open(path, "rb") as fh:
            header = fh.read(100)
            size = os.fstat(fh.fileno()).st_size
    except FileNotFoundError:
        return  # Store.open names what is missing and how to create it
    except OSError as exc:
        raise StateError(f"cannot read cluster database {path}: {exc.strerror}") from exc
    if size == 0:
        raise StateError(f"cluster database {path} is empty (truncated?); restore it from a backup")
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        return  # not SQLite at all: Store.open reports it as corrupt
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return  # a mangled header: Store.open reports it as corrupt
    pages = int.from_bytes(header[28:32], "big")
    header_size_valid = pages > 0 and header[24:28] == header[92:96]
    wal = path.with_name(path.name + "-wal")
    checkpointed = not wal.exists() or wal.stat().st_size == 0
    if size % page_size or (checkpointed and header_size_valid and size < pages * page_size):
        raise StateError(
            f"cluster database {path} is truncated ({size} bytes; its header says "
            f"{pages} pages of {page_size} bytes); restore it from a backup"
        )


def read_only(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False
