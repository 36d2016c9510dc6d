"""The database file itself: checks made before SQLite opens it, and who has it open.

SQLite is forgiving where a security tool must not be: it reads a missing tail as
zeros and turns an empty file into a new database. And a read-only file system makes
it say "unreadable or corrupt", which invites a restore from backup.

But those checks read the file with ``open()``, and a process must never do that once
it holds a SQLite connection to it: POSIX advisory locks belong to the process, and
closing *any* descriptor of the file drops all of them (SQLite's "How To Corrupt An
SQLite Database File", section 2.2). A bastion that did so let the next short
``dtadmin`` take itself for the last connection, checkpoint, and delete the ``-wal``
and ``-shm`` the bastion went on writing to: its later writes were lost. So every
connection is made through :func:`connect`, which keeps a process-wide count of open
connections per file (by device and inode) and touches the file outside SQLite only
while that count is zero.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path

from bastion.protocol.errors import StateError

SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT = 10.0  # seconds a connection waits for another's write lock

FileKey = tuple[int, int]  # (st_dev, st_ino)

_registry_lock = threading.Lock()
_open_files: dict[FileKey, int] = {}


def _key(path: Path) -> FileKey | None:
    """os.stat opens no descriptor, so it is safe while connections are open."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def open_in_this_process(path: Path) -> bool:
    """Whether this process holds a connection to the file at ``path``."""
    key = _key(path)
    with _registry_lock:
        return key is not None and _open_files.get(key, 0) > 0


def connect(path: Path, *, create: bool) -> tuple[sqlite3.Connection, FileKey]:
    """A new connection to ``path``, the file checked first if nothing here has it open.

    With ``create`` a missing file is made 0600 before SQLite opens it (its -wal and
    -shm take that mode); an existing one is left alone (``O_EXCL`` opens nothing).
    Release the returned key with :func:`release` when the connection closes.
    """
    with _registry_lock:
        key = _key(path)
        if key is None or _open_files.get(key, 0) == 0:
            if create:
                with contextlib.suppress(FileExistsError):
                    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
                    os.close(os.open(path, flags, 0o600))
            else:
                check_db_file(path)
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT
        )
        key = _key(path)
        if key is None:  # removed under us between connect and stat
            conn.close()
            raise StateError(f"cluster database {path} disappeared while being opened")
        _open_files[key] = _open_files.get(key, 0) + 1
    return conn, key


def release(key: FileKey) -> None:
    """One connection to the file ``key`` was closed."""
    with _registry_lock:
        left = _open_files.get(key, 0) - 1
        if left > 0:
            _open_files[key] = left
        else:
            _open_files.pop(key, None)


def _forget_after_fork() -> None:
    # A forked child holds none of its parent's locks and must not use its
    # connections: for it, nothing is open yet.
    global _registry_lock
    _registry_lock = threading.Lock()
    _open_files.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def check_db_file(path: Path) -> None:
    """Refuse a cluster database that was visibly cut short (checklist #27).

    Reads the file with ``open()``: call it only through :func:`connect`, before this
    process has a connection to the file.

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
