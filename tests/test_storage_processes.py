"""One database file, several processes: nothing a process does drops its SQLite locks.

SQLite decides who is the last connection by POSIX advisory locks, and those belong to
the process: closing *any* descriptor of the file drops all of them. A bastion whose
second connection (the issuer's) re-checked the file with a plain ``open()`` lost its
locks; the next short ``dtadmin`` process then took itself for the last user,
checkpointed and deleted ``-wal``/``-shm``, and the bastion's later writes went to a
deleted file. These tests run that shape: two Stores in this process, a separate
process that opens, reads and closes, then a write here that a third process must see.
"""

from __future__ import annotations

import fcntl
import os
import struct

from bastion.authz.records import User
from bastion.storage import DB_NAME, Store
from tests.sqlite_locks import SHARED_FIRST, SHARED_SIZE, python, shared_lock_holder

ADMIN_READS = """
import sys
from bastion.storage import Store
store = Store.open(sys.argv[1])
print(len(store.list_users()))
store.close()
"""

READ_SETTING = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
row = conn.execute("SELECT value FROM settings WHERE key = ?", (sys.argv[2],)).fetchone()
print(row[0] if row else "missing")
conn.close()
"""


def test_a_short_admin_process_never_deletes_a_running_bastions_wal(tmp_path):
    Store.open(tmp_path, create=True).close()
    db = tmp_path / DB_NAME
    bastion = Store.open(tmp_path)  # the bastion's event loop connection
    issuer = Store.open(tmp_path, check=False)  # and its issuer thread's
    try:
        bastion.add_user(User("alice", ("access",), ("root",)))
        assert python(ADMIN_READS, str(tmp_path)).strip() == "1"  # `dtadmin users ls`
        wal, shm = (tmp_path / (DB_NAME + "-wal")), (tmp_path / (DB_NAME + "-shm"))
        assert wal.exists() and shm.exists(), "dtadmin deleted the running bastion's -wal/-shm"
        bastion.set_setting("written_after_dtadmin", "seen")
        issuer.set_setting("issuer_after_dtadmin", "seen")
        for key in ("written_after_dtadmin", "issuer_after_dtadmin"):
            assert python(READ_SETTING, str(db), key).strip() == '"seen"', f"{key} was lost"
    finally:
        issuer.close()
        bastion.close()
    # once everyone has closed, the last one checkpoints: nothing lost on disk either
    assert python(READ_SETTING, str(db), "written_after_dtadmin").strip() == '"seen"'


def test_more_stores_in_one_process_keep_its_lock_on_the_file(tmp_path):
    """Every way a process opens the database again leaves the kernel's lock in place."""
    Store.open(tmp_path, create=True).close()
    db = tmp_path / DB_NAME
    first = Store.open(tmp_path)
    stores = [first]
    try:
        assert shared_lock_holder(db) == str(os.getpid())
        for kwargs in ({"check": False}, {}, {"create": True}):
            stores.append(Store.open(tmp_path, **kwargs))
            assert shared_lock_holder(db) == str(os.getpid()), f"Store.open(**{kwargs})"
        for store in stores[1:]:
            store.close()
        assert shared_lock_holder(db) == str(os.getpid())
        first.set_setting("still", "mine")
    finally:
        for store in stores:
            store.close()
    assert shared_lock_holder(db) == "unlocked"


def test_the_file_checks_run_again_once_a_process_has_closed_everything(tmp_path):
    """The registry of open files counts down: a later open checks the file again."""
    from bastion.protocol.errors import StateError

    store = Store.open(tmp_path, create=True)
    for i in range(50):
        store.add_user(User(f"user{i}", ("access",), ("root",)))
    store.close()
    db = tmp_path / DB_NAME
    with open(db, "r+b") as fh:
        fh.truncate(db.stat().st_size - 100)
    try:
        Store.open(tmp_path).close()
    except StateError as exc:
        assert "truncated" in exc.message
    else:
        raise AssertionError("a truncated database was opened")


def _flock(kind: int, start: int, length: int) -> bytes:
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, length, 0)


def test_lock_probe_sees_a_lock_for_real(tmp_path):
    """The control for the probe above: a lock this process takes by hand is reported."""
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLK, _flock(fcntl.F_RDLCK, SHARED_FIRST, SHARED_SIZE))
        assert shared_lock_holder(path) == str(os.getpid())
    finally:
        os.close(fd)
    assert shared_lock_holder(path) == "unlocked"
