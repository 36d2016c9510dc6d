"""Several processes append to the audit chain at once and it never forks: the real
`dt-bastion serve` (its batching writer, refusing forwards as fast as a client asks)
and several `dtadmin` processes, all on one SQLite file; then `dtadmin audit verify`
is clean and every row is there, in one unbroken chain."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import asyncssh
import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from bastion.cluster import Cluster
from tests.sshd import bastion_server
from tests.test_audit_chain import BIN, dtadmin, sql

CONNECTIONS, REQUESTS = 4, 30
ADMINS, COMMANDS = 3, 4


async def _refused_forwards(port: int, key, cert, admins: list[subprocess.Popen], start) -> int:
    """Forwards the bastion refuses (each one audit row): the admins are started once
    the first is refused, and refusals go on for as long as they run (and at least
    REQUESTS per connection). Returns how many were asked."""
    asked = 0

    async def one(i: int) -> None:
        nonlocal asked
        async with asyncssh.connect(
            "127.0.0.1",
            port,
            username="alice",
            known_hosts=None,
            client_keys=[(key, cert)],
            connect_timeout=20,
        ) as conn:
            j = 0
            while j < REQUESTS or not admins or any(p.poll() is None for p in admins):
                try:  # a distinct address each time: not in the inventory, audited
                    await conn.open_connection(f"10.{i}.{j // 250}.{j % 250}", 22)
                except asyncssh.ChannelOpenError:
                    pass
                j += 1
                asked += 1
                if not admins:
                    admins.extend(start())

    await asyncio.gather(*(one(i) for i in range(CONNECTIONS)))
    return asked


def test_the_bastion_and_several_dtadmins_appending_at_once_keep_one_chain(tmp_path):
    state = tmp_path / "state"
    dtadmin(state, "init", "--cluster", "busy")
    dtadmin(state, "users", "add", "alice", "--roles", "access", "--logins", "root")
    key = asyncssh.generate_private_key("ssh-ed25519")
    cluster = Cluster.open(state)
    try:
        issued = cluster.ca.sign_user("alice", load_ssh_public_key(key.export_public_key()))
    finally:
        cluster.close()  # nothing in this process holds the database from here on
    cert = asyncssh.import_certificate(issued.openssh)
    script = "; ".join(
        [
            f'"{BIN}/dtadmin" --state "{state}" users add admin$0-{n} --roles access --logins root'
            for n in range(COMMANDS)
        ]
        + [f'"{BIN}/dtadmin" --state "{state}" audit verify --checkpoint >/dev/null']
    )
    before = int(sql(state, "SELECT count(*) FROM audit").strip())

    def start() -> list[subprocess.Popen]:
        return [
            subprocess.Popen(
                ["sh", "-ec", script, str(i)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(ADMINS)
        ]

    admins: list[subprocess.Popen] = []
    with bastion_server(state) as bastion:
        try:
            denied = asyncio.run(_refused_forwards(bastion.port, key, cert, admins, start))
        finally:
            errors = [p.communicate(timeout=120)[1] for p in admins]
        assert [p.returncode for p in admins] == [0] * ADMINS, errors
        deadline = time.monotonic() + 30
        while int(sql(state, "SELECT count(*) FROM audit WHERE type = 'session.denied'")) < denied:
            assert time.monotonic() < deadline, "the bastion's audit rows did not all land"
            time.sleep(0.1)
    kinds = sql(state, "SELECT type FROM audit ORDER BY id").split()
    denials = [i for i, k in enumerate(kinds) if k == "session.denied"]
    assert "user.create" in kinds[denials[0] : denials[-1]], "the writers did not interleave"
    report = json.loads(dtadmin(state, "audit", "verify", "--format", "json").stdout)
    assert report["ok"], report["problems"]
    users = ADMINS * COMMANDS
    # every row each process wrote is in the one chain: ids 1..n, no gap, no fork
    assert report["rows"] == report["last_row"] >= before + denied + users * 2
    assert report["checkpoints"] >= 2 and report["unsigned_rows"] < report["rows"]


APPENDER = """
import os, sys, time
from pathlib import Path
from bastion import audit
from bastion.storage import database_url, open_store
store = open_store(sys.argv[1], database_url())  # $DT_DATABASE: PostgreSQL
store.revision()
Path(sys.argv[1]).parent.joinpath(f"ready-{sys.argv[3]}").touch()
while not Path(sys.argv[1]).parent.joinpath("go").exists():  # all start together
    time.sleep(0.01)
for i in range(int(sys.argv[2])):
    audit.record(store, "user.update", message=f"writer {sys.argv[3]} row {i}", actor="stress")
    time.sleep(0.001)  # let the others at the lock between rows
store.close()
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_processes_appending_in_a_tight_loop_never_fork_the_chain(
    tmp_path, backend, monkeypatch, request
):
    """Harder than dtadmin's pace: four processes each append as fast as they can,
    every row its own write transaction, racing for the lock the whole time (on
    PostgreSQL: the cluster-wide advisory lock every write transaction takes)."""
    if backend == "postgres":
        from tests.postgres import fresh_database

        pg_server = request.getfixturevalue("pg_server")
        monkeypatch.setenv("DT_DATABASE", fresh_database(pg_server))
    state = tmp_path / "state"
    dtadmin(state, "init", "--cluster", "race")
    writers, each = 4, 150
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(state), str(each), str(w)])
        for w in range(writers)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{w}").exists() for w in range(writers)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.02)
    (tmp_path / "go").touch()
    assert [p.wait(timeout=300) for p in procs] == [0] * writers
    report = json.loads(dtadmin(state, "audit", "verify", "--format", "json").stdout)
    assert report["ok"], report["problems"]
    assert report["rows"] == report["last_row"] == 1 + writers * each
