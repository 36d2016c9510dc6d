"""Auto-enrollment from an imported inventory: the pass and each refusal, with real TPMs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.authz.records import User
from bastion.cluster import Cluster
from bastion.enroll.ceremony import EnrollmentCeremony, EnrollPolicy
from bastion.protocol import wire
from bastion.protocol.errors import AccessDenied, TokenInvalid
from client.tpm import TPM

pytestmark = pytest.mark.integration
DTADMIN = str(Path(sys.executable).parent / "dtadmin")


@pytest.fixture
def cluster(tmp_path):
    env = {**os.environ, "DT_STATE": str(tmp_path / "state")}
    subprocess.run([DTADMIN, "init", "--cluster", "auto"], env=env, check=True, capture_output=True)
    c = Cluster.open(tmp_path / "state")
    c.store.add_user(User("alice", ("access",), ("root",)))
    c.store.add_user(User("bob", ("access",), ("root",)))
    inventory = tmp_path / "inventory.csv"
    inventory.write_text(
        "asset_tag,os,system_serial,board_serial,owner\n"
        "AUTO-1,linux,SER-1,BRD-1,\nAUTO-2,linux,SER-2,,bob\n"
    )
    result = subprocess.run(
        [DTADMIN, "device", "import", str(inventory)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and "2 new" in result.stdout, result.stderr
    c.env = env
    yield c
    c.close()


def attempt(cluster, tpm, ak_dir, user="alice", **data):
    server = EnrollmentCeremony(cluster.store, user, policy=EnrollPolicy())
    with TPM.open(tpm.tcti) as t:
        ek = t.endorsement()
        ak = t.load_or_create_ak(ak_dir)
        challenge = server.begin(
            wire.EnrollBegin(
                device_data={"os_type": "linux", **data},
                ek_public=ek.public,
                ek_public_der=ek.public_der,
                ek_cert_der=ek.cert_der,
                ak_public=ak,
            )
        )
        secret = t.activate_credential(
            ak_dir, challenge.credential_blob, challenge.encrypted_secret
        )
        quote = t.quote(ak_dir, challenge.nonce)
    return server.finish(
        wire.EnrollFinish(
            secret=secret,
            attest=quote.attest,
            signature=quote.signature,
            pcr_select=list(quote.pcr_select),
            pcr_values=list(quote.pcr_values),
        )
    )


def reason(cluster):
    return [e for e in cluster.store.list_audit(type="device.enroll") if not e.success][-1].message


def test_auto_enrollment_off_by_default(cluster, swtpm, tmp_path):
    with pytest.raises(TokenInvalid, match="auto-enrollment is off"):
        attempt(cluster, swtpm, tmp_path / "ak", asset_tag="AUTO-1", system_serial="SER-1")


def test_auto_enrollment_pass_and_refusals(cluster, swtpm, tmp_path):
    subprocess.run(
        [DTADMIN, "cluster", "set", "auto-enroll", "on"],
        env=cluster.env,
        check=True,
        capture_output=True,
    )
    with pytest.raises(AccessDenied, match="not in the imported inventory"):
        attempt(cluster, swtpm, tmp_path / "ak", asset_tag="NOPE", system_serial="SER-1")
    with pytest.raises(AccessDenied, match="system_serial .* does not match"):
        attempt(cluster, swtpm, tmp_path / "ak", asset_tag="AUTO-1", system_serial="OTHER")
    assert "system_serial" in reason(cluster)
    with pytest.raises(AccessDenied, match="assigned to another user"):
        attempt(cluster, swtpm, tmp_path / "ak", asset_tag="AUTO-2", system_serial="SER-2")
    device = attempt(
        cluster,
        swtpm,
        tmp_path / "ak",
        asset_tag="AUTO-1",
        system_serial="SER-1",
        board_serial="BRD-1",
    )
    assert device.enrolled and device.owner == "alice"
    with pytest.raises(AccessDenied, match="already enrolled by another user"):
        attempt(
            cluster,
            swtpm,
            tmp_path / "ak",
            user="bob",
            asset_tag="AUTO-1",
            system_serial="SER-1",
            board_serial="BRD-1",
        )


def test_import_refuses_bad_files_and_changes_nothing(cluster, tmp_path):
    bad = tmp_path / "bad.json"
    for body, message in (
        (json.dumps([{"asset_tag": "X", "colour": "red"}]), "unknown column"),
        (json.dumps([{"os": "linux"}]), "asset_tag is required"),
        (json.dumps([{"asset_tag": "X", "os": "beos"}]), "invalid os"),
        ("[not json", "neither valid CSV nor JSON"),
    ):
        bad.write_text(body)
        result = subprocess.run(
            [DTADMIN, "device", "import", str(bad)], env=cluster.env, capture_output=True, text=True
        )
        assert result.returncode == 2 and message in result.stderr
    assert {d.asset_tag for d in cluster.store.list_devices()} == {"AUTO-1", "AUTO-2"}
