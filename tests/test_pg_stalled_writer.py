"""One bastion frozen inside a write transaction must not stop every other one's writes.

Every write transaction on PostgreSQL takes the cluster-wide write lock
(``pg_advisory_xact_lock``) first. A bastion whose host freezes, loses power or is cut
off mid-transaction sends no FIN: to the server its session is just "idle in
transaction", still holding the lock, until TCP keepalive gives up (hours). Here the
holder is a real process stopped with SIGSTOP inside a transaction; a write from
another store (another bastion) must still land, and the frozen one's half-done
write must never show.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from bastion.storage.postgres import PostgresStore
from tests.postgres import available

pytestmark = pytest.mark.skipif(not available(), reason="PostgreSQL is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FREEZE = """
import os, signal, sys
from bastion.storage import pg_connection
pg_connection.IDLE_IN_TRANSACTION_TIMEOUT = 1.0  # seconds; a short one for the test
from bastion.storage.postgres import PostgresStore
store = PostgresStore.open(sys.argv[1], check=False)
with store.transaction():
    store.set_setting("half_written", True)
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen, socket open, write lock held
"""


def test_a_frozen_writer_does_not_hold_the_cluster_write_lock_forever(pg_url, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", _FREEZE, pg_url], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    store = PostgresStore.open(pg_url, tmp_path)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        done = threading.Event()

        def write() -> None:
            store.set_setting("after", 1)
            done.set()

        threading.Thread(target=write, daemon=True).start()
        assert done.wait(15), "one frozen bastion stopped every write of the cluster"
        assert store.get_setting("after") == 1
        assert store.get_setting("half_written") is None  # nothing half-committed
    finally:
        holder.kill()  # SIGKILL ends a stopped process too; its socket closes
        holder.wait(10)
        store.close()
