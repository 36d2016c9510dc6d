"""A sweeper calls a bastion dead only when its liveness lock stayed free between two
looks ``dead_after`` apart, not when it was seen free once long ago and again now.

The bastion here is a real process holding its claim. Its lock connection drops
while it has a session open (a sweep looks: free, not yet dead); it takes the lock
again; the session ends; sweeps find nothing of it to look at for a while; it opens
another session and its lock connection drops again just as a sweep looks. That one
look must not end its sessions at once: it is alive and serving them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bastion.authz.records import OpenSession
from bastion.storage.postgres import PostgresStore
from tests.postgres import available

pytestmark = pytest.mark.skipif(not available(), reason="PostgreSQL is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLD = """
import sys, time
from bastion.storage.postgres import PostgresStore
store = PostgresStore.open(sys.argv[1], check=False)
claim = store.hold_instance()
print(claim.name, flush=True)
time.sleep(120)
"""


def _drop_lock_connection(pg_server, dbname: str, store: PostgresStore) -> None:
    """Ends the bastion's lock connection (the sweeper's own probe spared)."""
    assert store._probe is not None
    pg_server.admin(
        "SELECT pg_terminate_backend(l.pid, 5000) FROM pg_locks l JOIN pg_database d "
        f"ON d.oid = l.database WHERE d.datname = '{dbname}' AND l.locktype = 'advisory' "
        f"AND l.granted AND l.pid NOT IN (pg_backend_pid(), {store._probe.info.backend_pid})"
    )


def _sweep_looks(store: PostgresStore) -> dict[str, bool]:
    """What Registry.sweep asks the store: which instances, and is each dead."""
    seen = {}
    for name in store.open_session_instances():
        with store.claim_if_dead(name) as dead:
            seen[name] = dead
    return seen


def test_a_lock_seen_free_once_long_ago_is_not_a_dead_bastion_now(pg_url, pg_server, tmp_path):
    dbname = pg_url.split("?")[0].rsplit("/", 1)[1]
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD, pg_url], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    store = PostgresStore.open(pg_url, tmp_path)
    store.dead_after = 1.0
    try:
        assert child.stdout is not None
        name = child.stdout.readline().strip()
        assert store.instance_alive(name)
        store.add_open_session(OpenSession(name, 1, time.time(), user="alice", node="n1"))
        _drop_lock_connection(pg_server, dbname, store)
        assert _sweep_looks(store) == {name: False}  # free once: not dead yet
        deadline = time.monotonic() + 15
        while not store.instance_alive(name):  # the keeper takes it again
            assert time.monotonic() < deadline
            time.sleep(0.05)
        store.remove_open_session(name, 1)
        assert _sweep_looks(store) == {}  # nothing of it to look at
        time.sleep(store.dead_after * 1.5)
        store.add_open_session(OpenSession(name, 2, time.time(), user="bob", node="n1"))
        _drop_lock_connection(pg_server, dbname, store)
        assert _sweep_looks(store) == {name: False}, "a live bastion was called dead on one look"
        assert [s.session_id for s in store.list_open_sessions(name)] == [2]
    finally:
        child.kill()
        child.wait(10)
        store.close()
