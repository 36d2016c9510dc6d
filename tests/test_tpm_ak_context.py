"""The attestation key's saved context: a login's quote loads the AK from it instead of
re-deriving the EK, and falls back to the long way whenever the context is not this
AK's or the TPM no longer takes it (a reboot). Real swtpm; quotes checked by the
bastion's own verifier."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bastion.enroll.attest import verify_quote
from client.tpm import AK_CONTEXT, AK_PUB, TPM
from tests.swtpm import Provisioned, run_swtpm

pytestmark = pytest.mark.integration

NONCE = os.urandom(32)


def quote_ok(tcti: str, ak_dir: Path) -> bool:
    """Quote with the AK in ak_dir, verified against its public; whether the EK was made."""
    with TPM.open(tcti) as tpm:
        q = tpm.quote(ak_dir, NONCE)
        derived_ek = tpm._ek is not None
    verify_quote(
        (ak_dir / AK_PUB).read_bytes(),
        q.attest,
        q.signature,
        NONCE,
        list(q.pcr_values),
        list(q.pcr_select),
    )
    return derived_ek


def test_the_saved_context_skips_the_ek_and_never_stands_in_for_another_key(swtpm, tmp_path: Path):
    ak_dir, other_dir = tmp_path / "ak", tmp_path / "other"
    with TPM.open(swtpm.tcti) as tpm:
        tpm.load_or_create_ak(ak_dir)
        tpm.load_or_create_ak(other_dir)

    # 1. The first quote loads the AK under the EK and saves its context; the next
    #    ones load that context and never derive the EK.
    assert quote_ok(swtpm.tcti, ak_dir) is True
    assert (ak_dir / AK_CONTEXT).exists()
    assert quote_ok(swtpm.tcti, ak_dir) is False

    # 2. Garbage, or another key's context put in its place: the long way, and the quote
    #    is still by this AK (verify_quote checks it against ak.pub).
    (ak_dir / AK_CONTEXT).write_bytes(b"\x00" * 40)
    assert quote_ok(swtpm.tcti, ak_dir) is True
    assert quote_ok(swtpm.tcti, other_dir) is True  # saves other's context
    shutil.copy(other_dir / AK_CONTEXT, ak_dir / AK_CONTEXT)
    assert quote_ok(swtpm.tcti, ak_dir) is True
    assert quote_ok(swtpm.tcti, ak_dir) is False  # its own context again


def test_after_a_reboot_the_old_context_is_refused_and_the_long_way_works(swtpm, tmp_path: Path):
    ak_dir = tmp_path / "ak"
    with TPM.open(swtpm.tcti) as tpm:
        tpm.load_or_create_ak(ak_dir)
    assert quote_ok(swtpm.tcti, ak_dir) is True
    assert quote_ok(swtpm.tcti, ak_dir) is False

    # The same TPM (its state, seeds and all) started again: TPM2_Startup(CLEAR).
    swtpm.proc.terminate()
    swtpm.proc.wait(timeout=10)
    rebooted = Provisioned(
        tmp_path / "tpm" / "tpmstate", swtpm.provisioned.root_pem, swtpm.provisioned.issuer_pem
    )
    with run_swtpm(rebooted, tmp_path / "rebooted") as tpm:
        assert quote_ok(tpm.tcti, ak_dir) is True
        assert quote_ok(tpm.tcti, ak_dir) is False
