"""`dtadmin` runs never delete the running bastion's -wal and -shm.

SQLite deletes them when the last connection closes, and it judges "last" by POSIX
locks. A process that closes any descriptor of the database file drops all of its
locks on it; a bastion that did so let the next `dtadmin` take it for the last user,
checkpoint and unlink the files the bastion still wrote to. From then on the bastion's
writes went to a deleted file and its reads missed dtadmin's changes.
"""

from __future__ import annotations

import pytest

from tests.deployed.deployment import Deployment, db_holders
from tests.deployed.processes import DB_NAME, wait_for

pytestmark = pytest.mark.integration

WAL, SHM = DB_NAME + "-wal", DB_NAME + "-shm"


def admin_runs(d: Deployment) -> list[tuple[str, ...]]:
    """Reads and writes, as an admin does them beside a running bastion."""
    return [
        ("users", "ls"),
        ("users", "add", "ida", "--roles", "access"),
        ("lock", "--user", "ida"),
        ("audit", "ls", "--limit", "5"),
        ("device", "add", "--asset-tag", "IDA-1", "--owner", "ida"),
        ("cert", "ls"),
    ]


def test_dtadmin_leaves_the_bastions_wal_and_shm_alone(deployment: Deployment):
    d = deployment
    # A bastion at work: it has served a signup, a login and a certificate (the old
    # bastion dropped its locks when its issuer opened its own connection).
    henry = d.sign_up("henry")
    files = wait_for(
        "the running bastion's -wal and -shm to exist",
        lambda: (lambda f: f if {WAL, SHM} <= set(f) else None)(d.db_files()),
        timeout=5,
    )
    assert set(db_holders(d.state)) == {d.bastion.proc.pid}, db_holders(d.state)
    for args in admin_runs(d):
        d.admin(*args)
        assert henry.can_reach(), "ssh -J failed between two dtadmin runs"  # bastion writes
        now = d.db_files()
        assert now == files, (
            f"after `dtadmin {' '.join(args)}` the database files (name: inode) changed "
            f"while dt-bastion serve ran: {files} -> {now}"
        )
    assert d.bastion.proc.poll() is None, "the bastion stopped while dtadmin ran"
