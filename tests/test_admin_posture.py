"""dtadmin posture (the cluster's policy) and dtadmin device posture (one device's), run
as the real console script against a state directory, on SQLite and PostgreSQL.

A device's measurement is written the way the bastion writes it (through the store,
closed again before dtadmin runs: nothing else holds the database), since measuring a
real boot is the ceremonies' tests' business. Bad input ends as one line and an exit
code, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from bastion.authz import posture
from bastion.authz.records import Device, DevicePosture, Measurement, PosturePolicy, User
from bastion.storage import StateStore, open_store
from tests.postgres import fresh_database

DTADMIN = str(Path(sys.executable).parent / "dtadmin")
DIGEST = {i: f"{i:02x}" * 32 for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14)}
ENROLLED = Measurement(
    pcrs=DIGEST,
    log="replayed",
    secure_boot=True,
    boot_chain=("a" * 64, "b" * 64, "c" * 64),
    cmdlines=("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro",),
    time=1700000000.0,
)
UPDATED = Measurement(
    pcrs={**DIGEST, 4: "ff" * 32},
    log="replayed",
    secure_boot=True,
    boot_chain=("a" * 64, "9" * 64, "c" * 64),
    cmdlines=("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet",),
    kernel_files=("e" * 64,),
    time=1700000500.0,
)
POLICY_YAML = """\
kind: posture
version: v1
spec:
  secure_boot: true
  pcrs:
    7: "{pcr7}"
  baseline: true
  baseline_pcrs: [0, 4, 7]
  on_failure: deny
""".format(pcr7="07" * 32)


@dataclass
class Admin:
    state: Path
    url: str | None

    def run(self, *args: str, input: str | None = None, actor: str = "carol"):
        """The real `dtadmin`; SUDO_USER names the acting admin in the audit log."""
        base = [DTADMIN, "--state", str(self.state)]
        if self.url:
            base += ["--database", self.url]
        proc = subprocess.run(
            [*base, *args],
            capture_output=True,
            text=True,
            input=input,
            env={**os.environ, "SUDO_USER": actor},
            timeout=60,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def ok(self, *args: str, input: str | None = None) -> str:
        proc = self.run(*args, input=input)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def json(self, *args: str):
        return json.loads(self.ok(*args, "--format", "json"))

    @contextlib.contextmanager
    def store(self) -> Iterator[StateStore]:
        store = open_store(self.state, self.url)
        try:
            yield store
        finally:
            store.close()

    def audit(self, event: str) -> list[dict]:
        return self.json("audit", "ls", "--type", event)


def _admin(tmp_path: Path, url: str | None) -> Admin:
    admin = Admin(tmp_path / "state", url)
    admin.ok("init", "--cluster", "posture.test")
    with admin.store() as store:
        store.add_user(User("alice", ("access",), ("root",)))
        store.add_device(Device("", "LAPTOP-7", "linux", owner="alice"))
    return admin


@pytest.fixture(params=["sqlite", "postgres"])
def any_admin(request, tmp_path) -> Admin:
    """A fresh cluster on each backend."""
    url = None
    if request.param == "postgres":
        url = fresh_database(request.getfixturevalue("pg_server"))
    return _admin(tmp_path, url)


@pytest.fixture
def admin(tmp_path) -> Admin:
    return _admin(tmp_path, None)


def _measured(admin: Admin, tag: str = "LAPTOP-7", **fields) -> str:
    """Record a baseline at enrollment and a later, changed measurement, as the
    bastion does at enrollment and login; the device's id."""
    with admin.store() as store:
        device = store.get_device(tag)
        record = DevicePosture(
            device.id,
            baseline=ENROLLED,
            baseline_time=1700000000.0,
            baseline_by="enrollment",
            measured=UPDATED,
            verdict="deny",
            reasons=(
                "PCR 4 changed since enrollment: boot loader differs (cluster posture policy)",
            ),
            attested_until=1700000600.0,
        )
        store.put_device_posture(DevicePosture(**{**_fields(record), **fields}))
        return device.id


def _fields(record: DevicePosture) -> dict:
    return {f: getattr(record, f) for f in record.__slots__}


# -- the cluster's policy -------------------------------------------------------------------------


def test_a_policy_is_set_shown_and_cleared(any_admin: Admin, tmp_path: Path):
    shown = any_admin.run("posture", "show")
    assert shown.returncode == 0 and "no cluster posture policy is set" in shown.stderr
    assert any_admin.json("posture", "show") == {"kind": "posture", "version": "v1", "spec": None}

    (tmp_path / "posture.yaml").write_text(POLICY_YAML)
    out = any_admin.ok("posture", "set", "-f", str(tmp_path / "posture.yaml"))
    assert "cluster posture policy set" in out and "on_failure: deny" in out
    doc = any_admin.json("posture", "show")
    assert doc["kind"] == "posture" and doc["spec"]["pcrs"] == {"7": "07" * 32}
    assert doc["spec"]["baseline_pcrs"] == [0, 4, 7]
    # What show prints, set reads back to the same policy.
    text = any_admin.ok("posture", "show")
    assert any_admin.ok("posture", "set", "-f", "-", input=text)
    assert any_admin.json("posture", "show") == doc
    # ...and it is what every decision reads.
    with any_admin.store() as store:
        facts = store.facts(user="alice", now=0)
    assert posture.policy_from_doc(facts.cluster_posture) == PosturePolicy(
        secure_boot=True, pcrs={7: "07" * 32}, baseline=True, baseline_pcrs=(0, 4, 7),
        on_failure="deny",
    )  # fmt: skip

    assert "removed" in any_admin.ok("posture", "clear")
    again = any_admin.run("posture", "clear")
    assert again.returncode == 0 and "nothing changed" in again.stderr
    assert any_admin.json("posture", "show")["spec"] is None
    events = sorted(any_admin.audit("posture.policy"), key=lambda e: e["id"])
    assert [e["message"] for e in events] == [
        "cluster posture policy set",
        "cluster posture policy set",
        "cluster posture policy removed",
    ]
    assert events[0]["policy"]["on_failure"] == "deny"
    assert all(e["actor"] == "carol" and e["success"] for e in events), events


@pytest.mark.parametrize(
    "text, exit_code, says",
    [
        ("kind: posture\nspec: [1\n", 2, "invalid YAML at line"),
        ("- just a list\n", 2, "expected a YAML mapping"),
        ("kind: role\nspec: {}\n", 2, "kind must be 'posture'"),
        ("kind: posture\nversion: v9\nspec: {}\n", 2, "version"),
        ("kind: posture\n", 2, "no spec"),
        ("kind: posture\nspec: {secure_bot: true}\n", 2, "unknown field(s) secure_bot"),
        (
            "kind: posture\nspec: {secure_boot: maybe}\n",
            2,
            "spec.secure_boot must be true or false",
        ),
        ("kind: posture\nspec: {pcrs: {16: " + "00" * 32 + "}}\n", 2, "PCR 16 can be reset"),
        ("kind: posture\nspec: {kernel_cmdline: '('}\n", 2, "not a valid regular expression"),
        ("kind: posture\nspec: {on_failure: explode}\n", 2, "on_failure must be one of"),
        ("kind: posture\nspec: {attest_interval: soon}\n", 2, "invalid duration 'soon'"),
        ("kind: posture\nmetadata: {}\nstray: 1\nspec: {}\n", 2, "unknown field document.stray"),
    ],
)
def test_a_bad_policy_is_refused_with_the_reason_and_changes_nothing(admin, text, exit_code, says):
    refused = admin.run("posture", "set", "-f", "-", input=text)
    assert refused.returncode == exit_code, refused.stderr
    assert says in refused.stderr and refused.stderr.startswith("error: "), refused.stderr
    assert admin.json("posture", "show")["spec"] is None
    assert admin.audit("posture.policy") == []


def test_a_policy_file_that_cannot_be_read(admin, tmp_path):
    missing = admin.run("posture", "set", "-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00kind")
    binary = admin.run("posture", "set", "-f", str(tmp_path / "bin.yaml"))
    assert binary.returncode == 2 and "not a text" in binary.stderr
    usage = admin.run("posture", "set")
    assert usage.returncode == 2 and "--file" in usage.stderr


def test_a_corrupt_stored_policy_is_shown_as_such_and_clear_fixes_it(admin):
    with admin.store() as store:
        store.set_setting("posture_policy", {"secure_boot": "sometimes"})
    shown = admin.run("posture", "show")
    assert shown.returncode == 5, shown.stderr
    assert "does not read" in shown.stderr and "dtadmin posture clear" in shown.stderr
    with admin.store() as store:
        store._exec("UPDATE settings SET value = '{oops' WHERE key = 'posture_policy'")
    assert admin.run("posture", "show", "--format", "json").returncode == 5
    assert "removed" in admin.ok("posture", "clear")
    assert admin.json("posture", "show")["spec"] is None


# -- one device -------------------------------------------------------------------------------------


def test_a_device_never_measured_shows_as_unchecked(any_admin: Admin):
    report = any_admin.json("device", "posture", "LAPTOP-7")
    assert report["asset_tag"] == "LAPTOP-7" and report["verdict"] == "unchecked"
    assert report["measured"] is None and report["baseline"] is None and report["drift"] == []
    assert report["attestation"] == {"attested_until": None, "current": False, "failure": None}
    text = any_admin.ok("device", "posture", "LAPTOP-7")
    assert "never" in text and "not attesting" in text


def test_a_device_shows_its_measurement_baseline_drift_and_verdict(any_admin: Admin):
    device_id = _measured(any_admin, attest_failure="the agent stopped answering")
    report = any_admin.json("device", "posture", "show", "LAPTOP-7")
    assert report["device_id"] == device_id and report["owner"] == "alice"
    assert report["verdict"] == "deny" and report["failed"] is True
    assert report["reasons"] == [
        "PCR 4 changed since enrollment: boot loader differs (cluster posture policy)"
    ]
    m, b = report["measured"], report["baseline"]
    assert m["pcrs"]["4"] == "ff" * 32 and m["pcrs"]["14"] == "0e" * 32
    assert m["boot_chain"][1] == "9" * 64 and m["kernel_files"] == ["e" * 64]
    assert m["cmdlines"] == ["BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet"]
    assert m["log"] == "replayed" and m["secure_boot"] is True
    assert m["time"] == "2023-11-14T22:21:40Z"
    assert b["by"] == "enrollment" and b["approved"] == "2023-11-14T22:13:20Z"
    assert b["pcrs"]["4"] == "04" * 32
    assert report["drift"] == [
        "PCR 4 changed since enrollment: boot loader differs (was bbbbbbbbbbbb, now 999999999999)"
    ]
    assert report["attestation"] == {
        "attested_until": "2023-11-14T22:23:20Z",
        "current": False,
        "failure": "the agent stopped answering",
    }
    # Piped, the tables are tab-separated lines a script can cut.
    text = any_admin.ok("device", "posture", "LAPTOP-7")
    lines = text.splitlines()
    assert "Verdict\tdeny" in lines
    assert "Drift\tPCR 4 changed since enrollment: boot loader differs " \
        "(was bbbbbbbbbbbb, now 999999999999)" in lines  # fmt: skip
    assert "Attestation\tfailed: the agent stopped answering" in lines
    assert f"2\tboot loader\t{'9' * 64}\t{'b' * 64}" in lines
    assert f"4\tboot loader\t{'ff' * 32}\t{'04' * 32}" in lines
    assert f"7\tSecure Boot state or keys\t{'07' * 32}\tsame" in lines
    assert "measured\tBOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet" in lines
    assert "baseline\tBOOT_IMAGE=/vmlinuz root=/dev/sda1 ro" in lines


def test_a_log_that_did_not_replay_is_shown_with_its_note(admin: Admin):
    _measured(
        admin,
        measured=Measurement(
            DIGEST, log="mismatch", log_note="the log does not replay to the quoted PCR 7"
        ),
    )
    report = admin.json("device", "posture", "LAPTOP-7")
    assert report["measured"]["log"] == "mismatch"
    assert report["measured"]["log_note"] == "the log does not replay to the quoted PCR 7"
    text = admin.ok("device", "posture", "LAPTOP-7").splitlines()
    assert "Event log\tmismatch: the log does not replay to the quoted PCR 7" in text
    assert "Secure Boot\t-" in text


def test_approve_makes_the_measurement_the_baseline_and_is_audited(any_admin: Admin):
    device_id = _measured(any_admin)
    out = any_admin.ok("device", "posture", "approve", "LAPTOP-7")
    assert "now its baseline" in out
    with any_admin.store() as store:
        record = store.find_device_posture(device_id)
    assert record is not None
    assert record.baseline == UPDATED == record.measured
    assert (record.verdict, record.reasons, record.baseline_by) == ("pass", (), "carol")
    assert record.attested_until == 1700000600.0  # attestation is not approval's business
    report = any_admin.json("device", "posture", "LAPTOP-7")
    assert report["drift"] == [] and report["verdict"] == "pass"
    assert report["baseline"]["by"] == "carol"
    (event,) = any_admin.audit("posture.approve")
    assert event["success"] and event["device"] == "LAPTOP-7" and event["user"] == "alice"
    assert event["actor"] == "carol" and event["previous"] == "deny"
    assert event["drift"] == [
        "PCR 4 changed since enrollment: boot loader differs (was bbbbbbbbbbbb, now 999999999999)"
    ]
    # A later drift is worded against the approved baseline.
    with any_admin.store() as store:
        store.put_device_posture(
            DevicePosture(**{**_fields(record), "measured": ENROLLED, "verdict": "withhold"})
        )
    (line,) = any_admin.json("device", "posture", "LAPTOP-7")["drift"]
    assert line.startswith("PCR 4 changed since carol approved the baseline: boot loader")


def test_approve_json_prints_the_new_record(admin: Admin):
    _measured(admin)
    report = admin.json("device", "posture", "approve", "LAPTOP-7")
    assert report["verdict"] == "pass" and report["baseline"]["by"] == "carol"


def test_approving_with_nothing_measured_is_refused(admin: Admin):
    refused = admin.run("device", "posture", "approve", "LAPTOP-7")
    assert refused.returncode == 4, refused.stderr
    assert 'device "LAPTOP-7" has no measured boot yet' in refused.stderr
    with admin.store() as store:  # an attestation-only record has no measurement either
        store.set_attestation(store.get_device("LAPTOP-7").id, 1700000600.0)
    assert admin.run("device", "posture", "approve", "LAPTOP-7").returncode == 4
    assert admin.audit("posture.approve") == []


@pytest.mark.parametrize(
    "args, exit_code, says",
    [
        (("NO-SUCH",), 3, 'device "NO-SUCH" not found'),
        (("approve", "NO-SUCH"), 3, 'device "NO-SUCH" not found'),
        (("approve",), 2, "give the device: dtadmin device posture approve TAG"),
        (("show",), 2, "give the device"),
        ((), 2, "give the device's asset tag"),
        (("bless", "LAPTOP-7"), 2, "unknown action 'bless'"),
        (("LAPTOP-7", "--format", "yaml"), 2, "--format"),
    ],
)
def test_device_posture_bad_input(admin: Admin, args, exit_code, says):
    refused = admin.run("device", "posture", *args)
    assert refused.returncode == exit_code, refused.stderr
    assert says in refused.stderr, refused.stderr


def test_a_device_tagged_like_an_action_is_still_reachable(admin: Admin):
    with admin.store() as store:
        store.add_device(Device("", "approve", "linux"))
    assert admin.json("device", "posture", "show", "approve")["asset_tag"] == "approve"


def test_a_corrupt_posture_record_is_a_clear_error(admin: Admin):
    device_id = _measured(admin)
    with admin.store() as store:
        store._exec("UPDATE device_posture SET measured = '{' WHERE device_id = ?", (device_id,))
    for args in (("LAPTOP-7",), ("approve", "LAPTOP-7")):
        refused = admin.run("device", "posture", *args)
        assert refused.returncode == 5 and "corrupt" in refused.stderr, refused.stderr


def test_help_names_both_forms(admin: Admin):
    shown = admin.ok("device", "posture", "--help")
    assert "dtadmin device posture TAG" in shown and "dtadmin device posture approve TAG" in shown
    assert "[show|approve] [TAG]" in shown
    listed = admin.ok("posture", "--help")
    assert all(word in listed for word in ("show", "set", "clear"))


# -- a role's policy ----------------------------------------------------------------------------------


def test_a_roles_posture_option_is_read_shown_and_checked(any_admin: Admin, tmp_path: Path):
    role = tmp_path / "role.yaml"
    role.write_text(
        "kind: role\nmetadata: {name: measured}\nspec:\n  options:\n    posture:\n"
        "      secure_boot: true\n      attest_interval: 30s\n      on_failure: warn\n"
        "  allow: {logins: [root]}\n"
    )
    any_admin.ok("roles", "create", "-f", str(role))
    (doc,) = [r for r in any_admin.json("roles", "ls") if r["metadata"]["name"] == "measured"]
    assert doc["spec"]["options"]["posture"] == {
        "secure_boot": True, "on_failure": "warn", "attest_interval": "30s",
        "attest_grace": "1m",
    }  # fmt: skip
    with any_admin.store() as store:
        stored = store.get_role("measured").posture
    assert stored == PosturePolicy(
        secure_boot=True, on_failure="warn", attest_interval=30, attest_grace=60
    )
    role.write_text(
        "kind: role\nmetadata: {name: strict}\nspec:\n  options:\n    posture:\n"
        "      secure_boot: true\n      attest_every: 30s\n"
    )
    refused = any_admin.run("roles", "create", "-f", str(role))
    assert refused.returncode == 2
    assert "spec.options.posture: unknown field(s) attest_every" in refused.stderr
    role.write_text("kind: role\nmetadata: {name: strict}\nspec:\n  options: {posture: on}\n")
    refused = any_admin.run("roles", "create", "-f", str(role))
    assert refused.returncode == 2 and "spec.options.posture must be a mapping" in refused.stderr


def test_approve_expect_refuses_a_boot_measured_after_the_review(any_admin: Admin):
    """approve took whatever the device measured last: a tampered login between the
    admin's review and the approval became the baseline unseen. The review prints the
    measurement's fingerprint and the approve command for it; that command refuses a
    different measurement."""
    device_id = _measured(any_admin)
    report = any_admin.json("device", "posture", "LAPTOP-7")
    reviewed = report["measured"]["fingerprint"]
    assert len(reviewed) == 32 and reviewed != report["baseline"]["fingerprint"]
    command = f"dtadmin device posture approve LAPTOP-7 --expect {reviewed}"
    assert report["approve_command"] == command
    text = any_admin.ok("device", "posture", "LAPTOP-7")
    assert f"Fingerprint\t{reviewed}" in text.splitlines() and command in text
    # the same boot measured again (a later login) keeps its fingerprint
    again = {**_fields(_record(any_admin, device_id)), "measured": replace(UPDATED, time=1.0)}
    tampered = replace(UPDATED, pcrs={**UPDATED.pcrs, 4: "66" * 32}, boot_chain=("6" * 64,))
    with any_admin.store() as store:
        store.put_device_posture(DevicePosture(**again))
    assert any_admin.json("device", "posture", "LAPTOP-7")["measured"]["fingerprint"] == reviewed
    with any_admin.store() as store:  # the attacker's login, just before approve
        store.put_device_posture(DevicePosture(**{**again, "measured": tampered}))
    refused = any_admin.run("device", "posture", "approve", "LAPTOP-7", "--expect", reviewed)
    assert refused.returncode == 4, refused.stderr
    assert f"not {reviewed}" in refused.stderr and "review it again" in refused.stderr
    record = _record(any_admin, device_id)
    assert record.baseline == ENROLLED and record.verdict == "deny"
    assert any_admin.audit("posture.approve") == []
    # the measurement now shown is the one approved, and the audit says which
    now = any_admin.json("device", "posture", "LAPTOP-7")["measured"]["fingerprint"]
    out = any_admin.ok("device", "posture", "approve", "LAPTOP-7", "--expect", now.upper())
    assert now in out and _record(any_admin, device_id).baseline == tampered
    (event,) = any_admin.audit("posture.approve")
    assert event["fingerprint"] == now and event["expected"] is True


def test_expect_is_only_for_approve(admin: Admin):
    _measured(admin)
    refused = admin.run("device", "posture", "LAPTOP-7", "--expect", "00")
    assert refused.returncode == 2 and "--expect is for approve" in refused.stderr


def _record(admin: Admin, device_id: str) -> DevicePosture:
    with admin.store() as store:
        record = store.find_device_posture(device_id)
    assert record is not None
    return record
