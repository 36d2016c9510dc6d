"""What the bastion writes while it runs, `dtadmin` sees: users, devices, certificates,
audit events and live sessions, with no process but `dt-bastion serve` holding the
database. (The bug this tier was made for: dtadmin ran beside a bastion that had lost
its SQLite locks, deleted its -wal/-shm, and everything the bastion wrote after that
never reached the database.)"""

from __future__ import annotations

import json

import pytest

from tests.deployed.deployment import Deployment, db_holders
from tests.deployed.processes import wait_for

pytestmark = pytest.mark.integration


def events(deployment: Deployment, user: str) -> list[str]:
    return [row["event"] for row in deployment.audit(user=user)]


def test_login_enrollment_and_issuance_are_seen_by_dtadmin(deployment: Deployment, new_tpm: str):
    # 1. Signup and password login through the bastion.
    alice = deployment.sign_up("alice", "access,require-trusted-device", tcti=new_tpm)
    (user,) = [u for u in deployment.admin_json("users", "ls") if u["name"] == "alice"]
    assert user["signed_up"] is True, f"dtadmin users ls does not see alice's signup: {user}"
    seen = events(deployment, "alice")
    assert {"user.signup", "user.login", "cert.create"} <= set(seen), seen

    # 2. The admin registers the device (dtadmin writes), the bastion enrolls it (the
    #    bastion writes after dtadmin ran: the writes the old code lost).
    deployment.enroll(alice, "ALICE-LAPTOP")
    (device,) = [
        d["spec"]
        for d in deployment.admin_json("device", "ls")
        if d["spec"]["asset_tag"] == "ALICE-LAPTOP"
    ]
    assert device["enroll_status"] == "enrolled", f"dtadmin device ls: {json.dumps(device)}"
    assert device["credential"], "the enrolled device has no credential in dtadmin device ls"
    assert {"device.enroll", "device.authenticate"} <= set(events(deployment, "alice"))

    # 3. The certificate the bastion issued is on record with the device.
    status = json.loads(alice.dtclient("status", "--format", "json").stdout)
    assert status["device_trusted"], status
    serial = status["serial"]
    certs = {str(c["serial"]): c for c in deployment.admin_json("cert", "ls", "--user", "alice")}
    assert serial in certs, f"dtadmin cert ls lacks the bastion's serial {serial}: {list(certs)}"
    assert certs[serial]["device_id"] == device["id"]
    issued = [r for r in deployment.audit(type="cert.create", user="alice")]
    assert serial in {str(r.get("serial")) for r in issued}

    # 4. A live session through the bastion shows in sessions ls and the audit log.
    held = alice.hold()
    try:
        sessions = wait_for(
            "dtadmin sessions ls to show alice's live session",
            lambda: deployment.admin_json("sessions", "ls", "--user", "alice"),
            timeout=5,
        )
        assert [str(s["serial"]) for s in sessions] == [serial], sessions
        assert sessions[0]["device"], sessions
        starts = deployment.audit(type="session.start", user="alice")
        assert str(sessions[0]["session_id"]) in {str(r["session_id"]) for r in starts}

        # 5. ...and nobody but the bastion holds the database while all this runs.
        holders = db_holders(deployment.state)
        assert set(holders) == {deployment.bastion.proc.pid}, holders
    finally:
        held.close()

    # 6. The session's end, written by the bastion when ssh went away, is seen too.
    wait_for(
        "the session's end in dtadmin sessions ls and audit ls",
        lambda: (
            not deployment.admin_json("sessions", "ls", "--user", "alice")
            and deployment.audit(type="session.end", user="alice")
        ),
        timeout=5,
    )
