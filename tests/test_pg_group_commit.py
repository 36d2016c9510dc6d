"""Group commit of certificate issuance (tests/test_group_commit.py) with the cluster's
state in PostgreSQL: a batch is one write transaction holding the cluster-wide
advisory lock, each request a savepoint that fails alone.

The tests about SQLite's file (a full disk, another process's write lock, a second
sqlite3 connection) are not repeated here.
"""

from __future__ import annotations

import pytest

from bastion.authz.records import User
from bastion.cluster import init_cluster
from tests import test_group_commit
from tests.postgres import available, fresh_database
from tests.test_group_commit import *  # noqa: F403 (the tests, collected again here)

pytestmark = pytest.mark.skipif(not available(), reason="PostgreSQL is not installed")
del test_a_failed_commit_hands_out_nothing_of_the_batch  # noqa: F821 (a full tmpfs)
del test_the_event_loop_reads_while_a_batch_waits_for_the_write_lock  # noqa: F821 (SQLite)
# These two reach SQLite's file directly (a second sqlite3 connection, Cluster.open
# on the state directory alone).
del test_concurrent_callers_share_commits_and_get_only_committed_certificates  # noqa: F821
del test_the_issuer_follows_a_user_ca_rotation  # noqa: F821
assert test_group_commit  # the module the tests come from


@pytest.fixture
def cluster(tmp_path, pg_server):
    c = init_cluster(tmp_path / "state", "batch", database=fresh_database(pg_server))
    for name in ("alice", "bob", "mallory"):
        c.store.add_user(User(name, ("access",), ("root",)))
    yield c
    c.close()
