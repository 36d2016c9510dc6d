"""A bastion taken for dead by a sibling while it was alive cuts what the sibling ended.

Bastion B (a real `dt-bastion serve` on PostgreSQL) serves a live `ssh -J` session.
Its liveness lock's connection drops and it cannot take the lock again for a while
(the database accepts no new connection: max_connections reached, here
ALLOW_CONNECTIONS false), though its pooled connections go on working, so it is not
blind. A sibling on another host (the test's own Registry) sees the lock free at two
looks and writes that session's ``session.end`` on B's behalf. Once B holds its lock
again it must not go on serving a session the audit log says has ended: it cuts it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from bastion.authz.records import Node
from bastion.cluster import Cluster
from bastion.proxy.sessions import Registry
from bastion.storage.postgres import PostgresStore
from tests.postgres import available, fresh_database
from tests.sshd import LOGIN, SSHD, bastion_server, sshd_node, user_client

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not available(), reason="PostgreSQL is not installed"),
]
DTADMIN = os.path.join(os.path.dirname(sys.executable), "dtadmin")


def _dtadmin(url, state, *args):
    result = subprocess.run(
        [DTADMIN, "--database", url, "--state", str(state), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_sessions_a_sibling_ended_for_a_live_bastion_are_cut(pg_server, tmp_path):
    if not os.path.exists(SSHD):
        pytest.skip("needs sshd")
    url = fresh_database(pg_server)
    dbname = url.split("?")[0].rsplit("/", 1)[1]
    state_a, state_b = tmp_path / "host-a" / "state", tmp_path / "host-b" / "state"
    state_a.parent.mkdir()
    state_b.parent.mkdir()
    _dtadmin(url, state_a, "init", "--cluster", "pg.test")
    shutil.copytree(state_a, state_b)
    _dtadmin(url, state_a, "users", "add", "alice", "--roles", "access", "--logins", LOGIN)
    cluster = Cluster.open(state_a, database=url)
    sibling = PostgresStore.open(url, state_a)
    registry = Registry(sibling)
    registry._instance = sibling.hold_instance()
    sibling.dead_after = 1.0
    live = None
    try:
        with sshd_node(tmp_path / "node", cluster) as node:
            cluster.store.add_node(Node("node-1", "127.0.0.1", node.port, {}))
            args = ("--database", url, "--set", "session_sweep_interval=0.5")
            with bastion_server(state_b, extra_args=args) as b:
                config = user_client(cluster, tmp_path / "alice", "alice", bastion_port=b.port)
                live = subprocess.Popen(
                    ["ssh", "-F", str(config), f"{LOGIN}@node-1", "echo started; sleep 60"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    stdin=subprocess.DEVNULL,
                )  # fmt: skip
                assert live.stdout is not None
                assert live.stdout.readline().strip() == "started", b.log()
                (row,) = cluster.store.list_open_sessions()
                assert sibling.instance_alive(row.instance)  # opens the sibling's probe
                assert registry._instance is not None and sibling._probe is not None
                spared = (
                    registry._instance._conn.info.backend_pid,
                    sibling._probe.info.backend_pid,
                )
                pg_server.admin(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS false")
                try:
                    pg_server.admin(
                        "SELECT pg_terminate_backend(l.pid, 5000) FROM pg_locks l "
                        f"JOIN pg_database d ON d.oid = l.database WHERE d.datname = '{dbname}' "
                        "AND l.locktype = 'advisory' AND l.granted "
                        f"AND l.pid NOT IN (pg_backend_pid(), {spared[0]}, {spared[1]})"
                    )
                    deadline = time.monotonic() + 15
                    while registry.sweep() == 0:  # free at two looks 1 s apart: "dead"
                        assert time.monotonic() < deadline, "the sibling never swept B"
                        time.sleep(0.3)
                finally:
                    pg_server.admin(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS true")
                (end,) = [e for e in cluster.store.list_audit(type="session.end")]
                assert end.fields["recovered"] is True and live.poll() is None
                try:
                    live.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pytest.fail("B goes on serving a session the audit log says has ended")
                assert "took this one for dead" in live.stderr.read()
                (cut,) = cluster.store.list_audit(type="session.terminated")
                assert cut.user == "alice" and "took this one for dead" in cut.message
    finally:
        if live is not None and live.poll() is None:
            live.kill()
            live.wait()
        registry._instance.release()
        sibling.close()
        cluster.close()
