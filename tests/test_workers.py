"""bastion.proxy.workers on its own: the lanes, their bounds, and rows that are never lost.

A real SQLite file and a second real connection holding its write lock (as another
process would); no mocks.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest

from bastion.protocol.errors import StorageUnavailable
from bastion.proxy.workers import Workers
from bastion.storage import Store


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path, create=True)
    yield s
    s.close()


def test_every_lane_runs_off_the_loop_thread_in_memory_too():
    memory = Store.memory()
    workers = Workers(memory)
    loop_thread = threading.current_thread()

    async def scenario():
        where = await asyncio.gather(
            workers.read(lambda s: threading.current_thread()),
            workers.write(lambda s: threading.current_thread()),
            workers.call(threading.current_thread),
        )
        await workers.audit("user.login", message="hello")
        return where

    try:
        threads = asyncio.run(scenario())
        assert loop_thread not in threads and len(set(threads)) == 1  # one connection, one thread
        assert [e.message for e in memory.list_audit(type="user.login")] == ["hello"]
    finally:
        workers.close()
        memory.close()


def test_a_write_lock_delays_writes_not_reads_and_loses_no_row(store):
    workers = Workers(store, timeout=0.5)
    locker = sqlite3.connect(store.path, isolation_level=None)

    async def scenario():
        locker.execute("BEGIN IMMEDIATE")
        try:
            for i in range(20):
                workers.audit_soon("user.login", message=f"row {i}")
            start = time.monotonic()
            revision = await workers.read(lambda s: s.revision())  # readers never wait
            read_took = time.monotonic() - start
            with pytest.raises(StorageUnavailable, match="try again"):
                await workers.write(lambda s: s.set_setting("x", 1))
            refused_after = time.monotonic() - start
            landed = await workers.audit("user.login", wait=0.2, message="late")
        finally:
            locker.execute("ROLLBACK")
        assert await workers.persist(lambda s: None, wait=10)  # all queued before it landed
        return revision, read_took, refused_after, landed

    try:
        revision, read_took, refused_after, landed = asyncio.run(scenario())
    finally:
        workers.close()
        locker.close()
    assert revision >= 0 and read_took < 0.5
    assert refused_after < 5  # bounded: the timeout, plus one busy wait in flight
    assert not landed  # the caller did not wait for the lock ...
    messages = [e.message for e in store.list_audit(type="user.login")]
    assert sorted(messages) == sorted([f"row {i}" for i in range(20)] + ["late"])  # ... nor lost it
    assert store.get_setting("x") is None  # the refused write was never made


def test_queued_rows_share_a_commit(store):
    workers = Workers(store)

    async def scenario():
        await workers.audit("user.login", message="warm up")
        before = workers.batches
        await asyncio.gather(*(workers.audit("user.login", message=str(i)) for i in range(200)))
        return workers.batches - before

    try:
        commits = asyncio.run(scenario())
    finally:
        workers.close()
    assert len(store.list_audit(type="user.login")) == 201
    assert commits < 200  # a burst is batched (usually into a handful of commits)


def test_a_failing_job_fails_alone(store):
    workers = Workers(store)

    def broken(s):
        raise ValueError("a bug in one job")

    async def scenario():
        results = await asyncio.gather(
            workers.write(broken),
            workers.write(lambda s: s.set_setting("kept", True)),
            return_exceptions=True,
        )
        return results

    try:
        bad, good = asyncio.run(scenario())
    finally:
        workers.close()
    assert isinstance(bad, ValueError) and good is None
    assert store.get_setting("kept") is True
