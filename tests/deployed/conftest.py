"""The deployed-shape tier: only the product's own processes, as an admin runs them.

Each module gets one cluster (state dir, stock sshd node-1, `dt-bastion serve`) that
its tests share; each test brings its own users, so none depends on another's state.
Nothing here imports the product or opens its database (see deployment.py).

Run it:                 .venv/bin/python -m pytest tests/deployed
Against another build:  DT_TEST_BIN=/other/.venv/bin /other/.venv/bin/python -m pytest \\
                            --confcutdir=tests/deployed tests/deployed
(--confcutdir keeps tests/conftest.py, which imports this checkout's product, out; the
other venv needs pytest, pytest-timeout, pexpect and pyotp.)
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deployed.deployment import Deployment
from tests.deployed.processes import SSHD
from tests.deployed.tpm import provision_tpm, swtpm


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in pyproject.toml; repeated so a run with --confcutdir from another
    # checkout's root knows the marker too.
    config.addinivalue_line("markers", "integration: needs swtpm, ssh or sshd on loopback")


def _need(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (run scripts/setup.sh)")


@pytest.fixture(scope="session")
def tpm_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One provisioned swtpm state; every device gets a running copy of it."""
    _need("swtpm_setup")
    return provision_tpm(tmp_path_factory.mktemp("deployed-tpm"))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A cluster as deployed: `dtadmin init`, one sshd node, `dt-bastion serve`."""
    _need(SSHD)
    with Deployment(tmp_path_factory.mktemp("deployed")) as cluster:
        cluster.add_node("node-1")
        cluster.start_bastion()
        yield cluster


@pytest.fixture(autouse=True)
def bastion_running(request: pytest.FixtureRequest) -> None:
    """Each test starts with the module's bastion up, even after one that stopped it failed."""
    if "deployment" in request.fixturenames:
        cluster: Deployment = request.getfixturevalue("deployment")
        if cluster.bastion is None or cluster.bastion.proc.poll() is not None:
            cluster.start_bastion()


@pytest.fixture
def new_tpm(deployment: Deployment, tpm_state: Path, tmp_path: Path) -> Iterator[str]:
    """A running software TPM for one device; its TCTI.

    Its EK is certified by a local test CA, which the admin trusts as a deployment
    would trust its TPM vendor's (`dtadmin trust-root add`): by default dt-bastion
    trusts only the real vendors' roots, never a software TPM."""
    if not getattr(deployment, "trusts_test_tpms", False):
        ca = tpm_state.parent / "ca"
        for pem in ("swtpm-localca-rootca-cert.pem", "issuercert.pem"):
            deployment.admin("device", "trust-root", "add", str(ca / pem))
        deployment.trusts_test_tpms = True  # type: ignore[attr-defined]
    with swtpm(tpm_state, tmp_path / "tpm") as tcti:
        yield tcti
