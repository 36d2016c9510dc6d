"""Measured-boot posture as a deployment meets it: `dt-bastion serve`, `dtadmin`, and
`dtclient` sending the boot event log DT_EVENT_LOG names, from a swtpm whose PCRs were
extended with that log's digests as firmware would have (tests/tpm_eventlog.py). Each
test's posture policy is its own role's (spec.options.posture), so the module's one
cluster serves them all; the user sees the outcome in dtclient's exit code and words,
in whether stock `ssh -J` gets through, and in the certificate.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tests import tpm_eventlog as logs
from tests.deployed.deployment import Deployment
from tests.deployed.people import Person
from tests.deployed.processes import DeployedError

pytestmark = pytest.mark.integration
GOOD = logs.SyntheticBoot()
SB_OFF = logs.SyntheticBoot(secure_boot=False)


def posture_role(deployment: Deployment, name: str, policy: str) -> None:
    """A role that grants nothing but asks a trusted device whose boot ``policy`` allows."""
    path = deployment.dir / f"{name}.yaml"
    path.write_text(
        f"kind: role\nversion: v1\nmetadata: {{name: {name}}}\n"
        f"spec:\n  options:\n    device_trust_mode: required\n    posture: {policy}\n"
    )
    deployment.admin("roles", "create", "-f", str(path))


def user_booted(deployment: Deployment, name: str, role: str, tcti: str, log: bytes) -> Person:
    """A new user whose device booted as ``log`` says (its TPM's PCRs and the log file
    dtclient reads agree), signed up and logged in (no device yet)."""
    logs.replay_into_tpm(tcti, log)
    person = deployment.sign_up(name, f"access,{role}", tcti=tcti)
    boot_log(person, log)
    return person


def boot_log(person: Person, log: bytes) -> None:
    path = person.home / "binary_bios_measurements"
    path.write_bytes(log)
    person.env["DT_EVENT_LOG"] = str(path)


def reboot(person: Person, log: bytes, *, sent: bytes | None = None) -> None:
    """The device boots again, as ``log`` says; dtclient sends ``sent`` (default: it)."""
    assert person.tcti
    logs.reboot(person.tcti)
    logs.replay_into_tpm(person.tcti, log)
    boot_log(person, log if sent is None else sent)


def certificate(deployment: Deployment, person: Person) -> str:
    path = person.home / ".dt" / "clusters" / deployment.cluster / "keys" / "id_ed25519-cert.pub"
    return subprocess.run(
        ["ssh-keygen", "-L", "-f", str(path)], capture_output=True, text=True, check=True
    ).stdout


def status(person: Person) -> dict:
    return json.loads(person.dtclient("status", "--format", "json").stdout)


def test_secure_boot_required_refuses_a_shipped_no_secure_boot_boot(
    deployment: Deployment, new_tpm: str
):
    posture_role(deployment, "sb-enroll", "{secure_boot: true, on_failure: deny}")
    log = logs.shipped(logs.NO_SECURE_BOOT_LOGS[0])
    erin = user_booted(deployment, "erin", "sb-enroll", new_tpm, log)
    token = deployment.add_device("ERIN-VM", "erin")
    with pytest.raises(DeployedError) as refused:
        erin.enroll(token, "ERIN-VM")
    said = str(refused.value)
    assert "exited 17" in said, said
    assert 'device "ERIN-VM" was not enrolled: its boot fails the posture policy' in said
    assert "Secure Boot is off (role sb-enroll posture policy)" in said
    (device,) = [
        d for d in deployment.admin_json("device", "ls") if d["spec"]["asset_tag"] == "ERIN-VM"
    ]
    assert device["spec"]["enroll_status"] == "not_enrolled"
    rows = deployment.audit("device.posture", user="erin")
    assert rows and rows[-1]["success"] is False and rows[-1]["verdict"] == "deny", rows


@pytest.mark.parametrize("action", ["deny", "withhold", "warn"])
def test_what_a_failed_posture_costs_as_the_user_sees_it(
    deployment: Deployment, new_tpm: str, action: str
):
    role, name, tag = f"sb-{action}", f"sb{action}", f"SB-{action.upper()}"
    posture_role(deployment, role, f"{{secure_boot: true, on_failure: {action}}}")
    person = user_booted(deployment, name, role, new_tpm, GOOD.log())
    deployment.enroll(person, tag)  # a Secure Boot boot: it passes
    assert "device-posture@dt-bastion" in certificate(deployment, person)
    assert status(person)["device_trusted"] and person.can_reach()

    # The device boots again with Secure Boot off, and renews its certificate.
    reboot(person, SB_OFF.log())
    login = person.dtclient("login", ok=False)
    said = login.stderr
    if action == "deny":
        assert login.returncode == 17, said
        assert f'device "{tag}" failed its posture check: Secure Boot is off' in said
        assert "refuses it a certificate" in said and "Password" not in said
        # The certificate it still holds is held to the posture now: no node opens.
        assert not person.can_reach()
    elif action == "withhold":
        assert login.returncode == 0, said
        assert f'device "{tag}" failed its posture check: Secure Boot is off' in said
        assert "this certificate carries no device extensions" in said
        assert not status(person)["device_trusted"]
        assert not person.can_reach()
    else:
        assert login.returncode == 0, said
        assert f'device "{tag}" posture warning: Secure Boot is off' in said
        assert status(person)["device_trusted"] and person.can_reach()
        assert "device-posture@dt-bastion" in certificate(deployment, person)
    shown = deployment.admin_json("device", "posture", tag)
    assert json.dumps(shown).count("Secure Boot is off") >= 1, shown


def test_a_log_from_another_boot_is_no_log(deployment: Deployment, new_tpm: str):
    posture_role(deployment, "cmdline", r"{kernel_cmdline: '\S+ root=/dev/vda1 ro( quiet)?'}")
    gwen = user_booted(deployment, "gwen", "cmdline", new_tpm, GOOD.log())
    deployment.enroll(gwen, "GWEN-LAPTOP")
    assert gwen.can_reach()
    # A tampered command line, told truthfully by its log: refused.
    tampered = replace(GOOD, cmdline=GOOD.cmdline + " init=/bin/sh")
    reboot(gwen, tampered.log())
    login = gwen.dtclient("login", ok=False)
    assert login.returncode == 0 and "kernel command line not allowed" in login.stderr
    assert "init=/bin/sh" in login.stderr and not gwen.can_reach()
    # The same boot with the good boot's log sent instead: it does not replay to the
    # quote, so it proves nothing, and the command line cannot be checked at all.
    reboot(gwen, tampered.log(), sent=GOOD.log())
    login = gwen.dtclient("login", ok=False)
    assert login.returncode == 0, login.stderr
    assert "the kernel command line cannot be checked" in login.stderr
    assert "counts as no log" in login.stderr and not gwen.can_reach()


def test_an_unreadable_log_says_how_to_fix_it(deployment: Deployment, new_tpm: str):
    posture_role(deployment, "sb-withhold-2", "{secure_boot: true}")
    hana = user_booted(deployment, "hana", "sb-withhold-2", new_tpm, GOOD.log())
    deployment.enroll(hana, "HANA-LAPTOP")
    hana.env["DT_EVENT_LOG"] = str(Path(hana.home) / "missing.log")
    login = hana.dtclient("login", ok=False)
    assert login.returncode == 0, login.stderr
    assert "DT_EVENT_LOG names" in login.stderr and "does not exist" in login.stderr
    assert "Secure Boot cannot be checked: the device could not read its boot event log" in (
        login.stderr
    )
