"""Fail closed when blind: a bastion that cannot read the cluster database refuses new
sessions, ends live ones after the grace, and recovers by itself.

The database is made unreadable for real, not mocked: another process takes SQLite's
WAL-index locks (the write, checkpoint, recovery and all read-mark locks in
``cluster.db-shm``) as a process stuck inside SQLite would, so every read and write of
the running bastion fails ("locking protocol") until it lets go. With
``state_stale_after=2`` and ``state_stale_grace=3``: new connections are refused with
the reason and one ``state.stale`` row (not one per connection); the live session is
cut, its user told why, ``session.terminated`` on record once the database answers;
once it does, new sessions work again and ``state.confirmed`` says how many
connections were refused meanwhile.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bastion.authz import freshness
from bastion.authz.records import User
from tests.sshd import LOGIN, bastion_server, ssh, user_client, wait

pytestmark = pytest.mark.integration

# The eight WAL locks SQLite keeps in the -shm file (os_unix.c: WALINDEX_LOCK_OFFSET 120,
# SQLITE_SHM_NLOCK 8): holding them all exclusively leaves no reader or writer a way in.
HOLD_WAL_INDEX = """
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.fcntl(fd, fcntl.F_SETLKW, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 120, 8, 0))
print("locked", flush=True)
sys.stdin.read()
"""
FAST = (
    "--set", "state_stale_after=2",
    "--set", "state_stale_grace=3",
    "--set", "storage_timeout=1",
)  # fmt: skip


def blind(state: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WAL_INDEX, str(state / "cluster.db-shm")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_blind_refuses_new_sessions_ends_live_ones_after_the_grace_and_recovers(
    dt_cluster, dt_node, tmp_path
):
    store = dt_cluster.store
    store.add_user(User("alice", ("access",), (LOGIN,)))
    with bastion_server(dt_cluster.state_dir, extra_args=FAST) as bastion:
        config = user_client(dt_cluster, tmp_path / "alice", "alice", bastion_port=bastion.port)
        assert ssh(config, f"{LOGIN}@node-1", "true").returncode == 0
        live = subprocess.Popen(
            ["ssh", "-F", str(config), f"{LOGIN}@node-1", "echo held; exec sleep 60"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert live.stdout is not None and live.stdout.readline().strip() == "held"
            holder = blind(dt_cluster.state_dir)
            try:
                blinded = time.monotonic()

                def refused() -> str | None:
                    proc = ssh(config, f"{LOGIN}@node-1", "true", timeout=30)
                    return proc.stderr if proc.returncode != 0 else None

                wait(
                    lambda: "refusing new sessions" in bastion.log(),
                    "the bastion to see it is blind",
                )
                for _ in range(4):  # a flood: refused each time, audited once
                    said = refused() or ""
                    assert freshness.BLIND in said, said
                live.wait(20)
                cut_after = time.monotonic() - blinded
                assert freshness.BLIND_CUT in live.stderr.read(), "the user was not told why"
                assert cut_after >= 3, (
                    f"cut {cut_after:.1f} s into the blind period, before the grace"
                )
            finally:
                holder.kill()
                holder.wait(10)
            back = wait(
                lambda: ssh(config, f"{LOGIN}@node-1", "echo", "back", timeout=30).stdout,
                "a new session once the database answers",
            )
            assert "back" in back
        finally:
            if live.poll() is None:
                live.kill()
            live.wait(10)
    log = bastion.log()
    assert "refusing new sessions and logins" in log and "current again" in log, log[-3000:]
    [stale] = store.list_audit(type="state.stale")
    [confirmed] = store.list_audit(type="state.confirmed")
    assert not stale.success and stale.fields["sessions"] == 1
    assert confirmed.fields["refused"] >= 4 and confirmed.id > stale.id
    [cut] = [e for e in store.list_audit(type="session.terminated") if e.user == "alice"]
    assert freshness.BLIND_CUT in cut.message
    ends = [e for e in store.list_audit(type="session.end") if e.user == "alice"]
    assert len(ends) == 3  # the first, the cut one, the one after recovery
    assert [e for e in store.list_audit(type="connection.terminated") if e.user == "alice"]
