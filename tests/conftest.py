"""Shared fixtures. Servers start on free loopback ports and stop in teardown."""

from __future__ import annotations

import shutil

import pytest

from tests.postgres import any_store, pg_server, pg_url, store_factory  # noqa: F401
from tests.sshd import clients, notify_socket, sshd_runnable  # noqa: F401 (fixtures for every test file)
from tests.swtpm import provision, run_swtpm


def pytest_collection_modifyitems(config, items):
    """Floods run last: the sockets they churn must not disturb other tests' servers.

    Under pytest-xdist (-n) this order holds only inside each worker, so `make test` runs
    ``-m "not flood"`` on its workers first, then ``-m flood`` in one process, alone."""
    items.sort(key=lambda item: item.get_closest_marker("flood") is not None)


def _need(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (run scripts/setup.sh)")


@pytest.fixture(scope="session")
def tpm_template(tmp_path_factory):
    """One provisioned TPM state (EK certificate from a local test CA) for the session."""
    _need("swtpm_setup")
    return provision(tmp_path_factory.mktemp("tpm-template"))


@pytest.fixture(scope="session")
def attacker_template(tmp_path_factory):
    """A second TPM, its EK certified by a different local CA: the attacker's machine."""
    _need("swtpm_setup")
    return provision(tmp_path_factory.mktemp("attacker-template"))


@pytest.fixture
def swtpm(tpm_template, tmp_path):
    with run_swtpm(tpm_template, tmp_path / "tpm") as tpm:
        yield tpm


@pytest.fixture
def attacker_swtpm(attacker_template, tmp_path):
    with run_swtpm(attacker_template, tmp_path / "attacker-tpm") as tpm:
        yield tpm


# ---- dt-bastion with real OpenSSH (issue 3: bastion/proxy) ------------------------------
# One cluster, one stock sshd node ("node-1" in the inventory) and one real
# `dt-bastion serve` subprocess per test, on free loopback ports, stopped in reverse
# order. Modules that can share them per module build them with the context managers
# in tests/sshd.py (sshd_node, bastion_server) instead; user_client() makes a user's
# key, certificate and ssh_config.


@pytest.fixture
def dt_cluster(tmp_path):
    from bastion.cluster import init_cluster

    cluster = init_cluster(tmp_path / "state", "test")
    yield cluster
    cluster.close()


@pytest.fixture
def dt_node(dt_cluster, tmp_path):
    from bastion.authz.records import Node
    from tests.sshd import SSHD, sshd_node

    _need(SSHD)
    with sshd_node(tmp_path / "node", dt_cluster) as node:
        dt_cluster.store.add_node(Node("node-1", "127.0.0.1", node.port, {"env": "test"}))
        yield node


@pytest.fixture
def dt_bastion(dt_cluster):
    from tests.sshd import bastion_server

    with bastion_server(dt_cluster.state_dir) as bastion:
        yield bastion
