"""Shared fixtures. Servers start on free loopback ports and stop in teardown."""

from __future__ import annotations

import shutil

import pytest

from tests.swtpm import provision, run_swtpm


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
