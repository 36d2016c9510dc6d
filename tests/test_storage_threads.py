"""One Store used from several threads: nobody waits behind another thread's writer.

The bastion calls its store from worker threads (argon2 logins, the issuer, dt-api
requests). With one connection behind a lock, a writer waiting up to its busy timeout
for another process's write lock held that lock, and every read in the process waited
with it. Each thread now has a connection of its own. Another process holds the write
lock here for real; waits are bounded polls, never sleeps.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bastion.authz.records import User
from bastion.storage import DB_NAME, Store
from tests.sqlite_locks import shared_lock_holder

ROOT = Path(__file__).resolve().parents[1]
BOUND = 30  # seconds; every wait here ends far sooner unless something is wrong

HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


class WriteLockHolder:
    """Another process holding the database's write lock until told to let go."""

    def __init__(self, db: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_WRITE_LOCK, str(db)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(BOUND)


def in_thread(fn) -> tuple[threading.Thread, list]:
    result: list = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception as exc:  # the outcome under test
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path, create=True)
    s.add_user(User("alice", ("access",), ("root",)))
    yield s
    s.close()


def test_reads_go_on_while_a_writer_thread_waits_for_the_write_lock(store, tmp_path):
    holder = WriteLockHolder(tmp_path / DB_NAME)
    waiting = threading.Event()

    def write() -> None:
        store._conn.execute("PRAGMA busy_timeout = 120000")  # this thread's connection
        store._conn.set_trace_callback(
            lambda sql: waiting.set() if sql.startswith("BEGIN IMMEDIATE") else None
        )
        store.set_setting("written", "after the lock")

    try:
        writer, wrote = in_thread(write)
        assert waiting.wait(BOUND), "the writer never asked for the write lock"
        reader, read = in_thread(lambda: (store.find_user("alice"), store.revision()))
        reader.join(BOUND)
        assert not reader.is_alive(), "a read waited for another thread's writer"
        assert read[0][0].name == "alice"
        assert writer.is_alive() and not wrote  # still waiting: the holder has not let go
    finally:
        holder.release()
    writer.join(BOUND)
    assert wrote == [None], wrote
    assert store.get_setting("written") == "after the lock"


def test_a_transaction_is_its_threads_own(any_store):
    """Another thread neither joins an open transaction nor waits for it to end (on
    SQLite and on PostgreSQL)."""
    store = any_store
    inside, done = threading.Event(), threading.Event()

    def write() -> None:
        with store.transaction():
            store.set_setting("pending", 1)
            inside.set()
            assert done.wait(BOUND)

    writer, wrote = in_thread(write)
    try:
        assert inside.wait(BOUND)
        reader, read = in_thread(lambda: store.get_setting("pending", "not yet"))
        reader.join(BOUND)
        assert not reader.is_alive(), "a read waited for another thread's transaction"
        assert read == ["not yet"]  # the last commit, not another thread's open writes
    finally:
        done.set()
    writer.join(BOUND)
    assert wrote == [None] and store.get_setting("pending") == 1


def test_each_threads_connection_closes_with_its_thread_or_the_store(tmp_path):
    store = Store.open(tmp_path, create=True)
    for _ in range(20):  # short-lived threads, one after the other
        thread, _ = in_thread(store.revision)
        thread.join(BOUND)
    assert len(store._threads) <= 1  # ended threads' connections were closed
    workers = [in_thread(lambda: store.list_users())[0] for _ in range(4)]
    for thread in workers:
        thread.join(BOUND)
    store.close()
    # every connection is gone: this process holds no lock on the file any more
    assert shared_lock_holder(tmp_path / DB_NAME) == "unlocked"
    thread, result = in_thread(store.revision)
    thread.join(BOUND)
    assert "closed" in str(result[0])


def test_an_in_memory_store_is_shared_by_its_threads():
    store = Store.memory()
    store.add_user(User("alice", ("access",), ("root",)))
    thread, result = in_thread(lambda: store.get_user("alice").name)
    thread.join(BOUND)
    assert result == ["alice"]
