"""Limits and single use across bastions (tests/test_cluster_limits.py) with the state
in PostgreSQL: two `dt-bastion serve` on two state directories (two "hosts", the same
keys) and one database. Failures per address, lockouts, one-time codes and signup
tokens hold across them as they do on one shared SQLite file.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from bastion.cluster import Cluster, init_cluster
from tests import test_cluster_limits
from tests.haproxy import Serve
from tests.postgres import available, fresh_database
from tests.test_cluster_limits import *  # noqa: F403 (the tests, collected again here)
from tests.test_cluster_limits import LIMIT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not available(), reason="PostgreSQL is not installed"),
]
assert test_cluster_limits  # the module the tests come from


@pytest.fixture(scope="module")
def pair(tmp_path_factory, pg_server) -> Iterator[tuple[Cluster, Serve, Serve]]:
    base = tmp_path_factory.mktemp("pg-pair")
    url = fresh_database(pg_server)
    (base / "a").mkdir()
    (base / "b").mkdir()
    cluster = init_cluster(base / "a" / "state", "pair", database=url)
    shutil.copytree(base / "a" / "state", base / "b" / "state")  # the keys, not the state
    args = ("--database", url, "--set", f"max_auth_failures_per_source={LIMIT}")
    with ExitStack() as stack:
        stack.callback(cluster.close)
        a = Serve(base / "a" / "state", "a", args)
        b = Serve(base / "b" / "state", "b", args)
        for bastion in (a, b):
            stack.callback(bastion.stop)
            bastion.start()
        yield cluster, a, b
