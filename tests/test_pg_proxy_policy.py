"""The proxy's decisions and live-session re-checks (tests/test_proxy_policy.py), run
again with the cluster's state in PostgreSQL: the same tests, another ``cluster``.

One test there is SQLite's own (another process holding the file's lock) and is not
repeated; PostgreSQL's unavailability is tests/test_pg_store.py's.
"""

from __future__ import annotations

import pytest

from bastion.authz.records import Node, User
from bastion.cluster import init_cluster
from tests import test_proxy_policy
from tests.postgres import available, fresh_database
from tests.test_proxy_policy import *  # noqa: F403 (the tests, collected again here)

pytestmark = pytest.mark.skipif(not available(), reason="PostgreSQL is not installed")
del test_a_session_whose_start_cannot_be_recorded_is_not_held  # noqa: F821 (SQLite's lock)
assert test_proxy_policy  # the module the tests come from


@pytest.fixture
def cluster(tmp_path, pg_server):
    c = init_cluster(tmp_path / "state", "policy", database=fresh_database(pg_server))
    c.store.add_user(User("alice", ("access",), ("root",)))
    c.store.add_user(User("bob", ("access",), ("root",)))
    c.store.add_node(Node("node-1", "10.0.0.5", 2222, {"env": "prod"}))
    c.store.add_node(Node("node-6", "fd00::6", 22, {"env": "dev"}))
    yield c
    c.close()
