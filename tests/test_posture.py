"""The posture decision core (bastion.authz.posture): plain records, no I/O."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bastion.authz import posture
from bastion.authz.facts import Facts
from bastion.authz.records import (
    POSTURE_PCRS,
    Device,
    DeviceCredential,
    DevicePosture,
    Measurement,
    PosturePolicy,
    Role,
    User,
)
from bastion.enroll.measured import measure
from bastion.protocol import eventlog
from bastion.protocol.errors import DeviceNotTrusted, UsageError

LOGS = Path(__file__).resolve().parents[2] / "shared" / "eventlogs"
UBUNTU = (LOGS / "ubuntu_2104_shielded_vm_no_secure_boot_eventlog.bin").read_bytes()
SECURE = (LOGS / "sb_cert_eventlog.bin").read_bytes()
A, B, C = "a" * 64, "b" * 64, "c" * 64


def measured(raw: bytes, **changes) -> Measurement:
    replayed = eventlog.replay(raw)["sha256"]
    m = measure({i: replayed.get(i, bytes(32)) for i in POSTURE_PCRS}, raw)
    return replace(m, **changes)


def facts(cluster=None, *roles: PosturePolicy | None, device_posture=None) -> Facts:
    role_records = tuple(Role(name=f"r{i}", posture=p) for i, p in enumerate(roles)) or (
        Role(name="access"),
    )
    device = Device(
        id="d1",
        asset_tag="laptop-1",
        os_type="linux",
        enroll_status="enrolled",
        owner="alice",
        credential=DeviceCredential("c1", b"", "tpm_ekcert_trusted", "e"),
    )
    return Facts(
        cluster_mode="optional",
        user=User("alice", tuple(r.name for r in role_records)),
        roles=role_records,
        device=device,
        cluster_posture=cluster,
        device_posture=device_posture,
    )


# -- the document ---------------------------------------------------------------------------


def test_a_policy_round_trips_through_its_document():
    doc = {
        "secure_boot": True,
        "boot_chains": [{"name": "fedora", "shim": A, "bootloader": B.upper(), "kernel": C}],
        "kernel_cmdline": r".* ro( .*)?",
        "pcrs": {"7": A},
        "baseline": True,
        "baseline_pcrs": [4, 0, 7],
        "on_failure": "deny",
        "attest_interval": "30s",
        "attest_grace": 45,
    }
    policy = posture.policy_from_doc(doc)
    assert policy.boot_chains[0].bootloader == B and policy.pcrs == {7: A}
    assert policy.baseline_pcrs == (0, 4, 7) and policy.attest_interval == 30
    assert policy.attest_grace == 45 and policy.checks
    assert posture.policy_from_doc(posture.policy_doc(policy)) == policy
    assert posture.policy_from_doc({}) == PosturePolicy() and not PosturePolicy().checks


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ([], "must be a mapping"),
        ({"secureboot": True}, "unknown field(s) secureboot"),
        ({"on_failure": "block"}, "on_failure must be one of warn, withhold, deny"),
        ({"secure_boot": "yes"}, "secure_boot must be true or false"),
        ({"pcrs": {16: A}}, "PCR 16 can be reset by software"),
        ({"pcrs": {23: A}}, "PCR 23 can be reset by software"),
        ({"pcrs": {24: A}}, "not between 0 and 23"),
        ({"pcrs": {"x": A}}, "is not a PCR number"),
        ({"pcrs": {7: "abc"}}, "must be a SHA-256 digest"),
        ({"baseline_pcrs": []}, "must be a list of PCR numbers"),
        ({"kernel_cmdline": "("}, "not a valid regular expression"),
        ({"boot_chains": [{"name": "x"}]}, "names no digest"),
        ({"boot_chains": [{"initrd": A}]}, "unknown field(s) initrd"),
        ({"attest_interval": "soon"}, "spec.attest_interval: invalid duration"),
        ({"attest_grace": "10s"}, "attest_grace needs attest_interval"),
    ],
)
def test_a_bad_policy_says_which_field(doc, says):
    with pytest.raises(UsageError) as err:
        posture.policy_from_doc(doc, "spec")
    assert says in err.value.message


# -- verdicts ---------------------------------------------------------------------------------


def test_no_policy_leaves_the_device_unchecked():
    verdict = posture.evaluate(facts(), measured(UBUNTU), None)
    assert verdict.status == "unchecked" and verdict.extension == "unchecked"
    assert posture.pcr_selection(facts()) == POSTURE_PCRS and not posture.needs_log(facts())


def test_secure_boot_required():
    policy = {"secure_boot": True, "on_failure": "deny"}
    verdict = posture.evaluate(facts(policy), measured(UBUNTU), None)
    assert verdict.status == "deny" and verdict.extension is None
    assert verdict.reasons == ("Secure Boot is off (cluster posture policy)",)
    assert posture.evaluate(facts(policy), measured(SECURE), None).status == "pass"
    assert posture.needs_log(facts(policy))


def test_a_log_that_is_not_believed_fails_what_needs_it():
    policy = PosturePolicy(secure_boot=True, kernel_cmdline=".*")
    m = measured(UBUNTU, log="mismatch", log_note="it is not the log of this boot")
    verdict = posture.evaluate(facts(None, policy), m, None)
    assert verdict.status == "withhold"
    assert verdict.reasons == (
        "Secure Boot and the kernel command line cannot be checked: it is not the log of "
        "this boot (role r0 posture policy)",
    )


def test_boot_chains_say_which_part_differs():
    m = measured(SECURE)
    shim, loader, kernel = m.boot_chain
    allowed = PosturePolicy(
        boot_chains=(posture.BootChain("good", shim=shim, bootloader=loader, kernel=kernel),)
    )
    assert posture.evaluate(facts(None, allowed), m, None).status == "pass"
    other = replace(allowed, boot_chains=(posture.BootChain("x", shim=shim, bootloader=A),))
    [reason] = posture.evaluate(facts(None, other), m, None).reasons
    assert reason.startswith(f"the boot chain is not an allowed one: boot loader {loader[:12]}")
    # grub reads the kernel itself: a PCR 9 file digest is not bound to its name, so
    # a kernel digest is never matched there
    u = measured(UBUNTU)
    by_file = PosturePolicy(boot_chains=(posture.BootChain(kernel=u.kernel_files[0]),))
    [reason] = posture.evaluate(facts(None, by_file), u, None).reasons
    assert reason.startswith("the boot chain cannot be checked: the kernel was not started")
    # every image after the boot loader must be the kernel: one appended cannot hide it
    appended = replace(m, boot_chain=(*m.boot_chain, kernel))
    assert posture.evaluate(facts(None, allowed), appended, None).status == "pass"
    evil = replace(m, boot_chain=(shim, loader, A, kernel))
    [reason] = posture.evaluate(facts(None, allowed), evil, None).reasons
    assert reason.startswith(
        f"the boot chain is not an allowed one: kernel {A[:12]}, {kernel[:12]} differs"
    )


def test_kernel_command_line_must_match_whole():
    u = measured(UBUNTU)
    ro = PosturePolicy(kernel_cmdline=r"\S+ root=\S+ ro( .*)?", on_failure="warn")
    assert posture.evaluate(facts(None, ro), u, None).status == "pass"
    no_console = PosturePolicy(kernel_cmdline=r"(?!.*console=).*", on_failure="warn")
    verdict = posture.evaluate(facts(None, no_console), u, None)
    assert verdict.status == "warn" and verdict.extension == "warn"
    assert verdict.reasons[0].startswith("kernel command line not allowed: '/boot/vmlinuz")
    assert posture.evaluate(facts(None, PosturePolicy(kernel_cmdline="ro")), u, None).failed


def test_exact_pcrs_and_the_baseline():
    u = measured(UBUNTU)
    exact = PosturePolicy(pcrs={7: u.pcrs[7]})
    assert posture.evaluate(facts(None, exact), u, None).status == "pass"
    wrong = PosturePolicy(pcrs={7: A})
    assert posture.evaluate(facts(None, wrong), u, None).reasons == (
        "PCR 7 is not the value the policy requires: Secure Boot state or keys differ "
        "(role r0 posture policy)",
    )
    baseline = PosturePolicy(baseline=True, on_failure="deny")
    assert posture.evaluate(facts(None, baseline), u, None).status == "pass"  # enrollment
    assert posture.evaluate(facts(None, baseline), u, u).status == "pass"
    other = measured(SECURE)
    verdict = posture.evaluate(facts(None, baseline), other, u)
    assert verdict.status == "deny"
    assert any(
        r.startswith("PCR 4 changed since enrollment: shim differs") for r in verdict.reasons
    )
    assert any(
        r.startswith("PCR 7 changed since enrollment: Secure Boot was off, now on")
        for r in verdict.reasons
    )
    narrow = PosturePolicy(baseline=True, baseline_pcrs=(14,))
    assert (
        posture.evaluate(facts(None, narrow), replace(u, pcrs={**u.pcrs, 4: A}), u).status == "pass"
    )


def test_drift_without_trusted_logs_names_what_the_pcr_measures():
    u = measured(UBUNTU)
    bare = replace(u, log="absent", pcrs={**u.pcrs, 4: A})
    assert posture.drift(u, bare, (4,)) == ["PCR 4 changed since enrollment: boot loader differs"]
    bare = replace(bare, pcrs={**bare.pcrs, 1: A, 9: A})
    assert posture.drift(u, bare, (1, 9)) == [
        "PCR 1 changed since enrollment: firmware settings differ",
        "PCR 9 changed since enrollment: kernel or initrd files differ",
    ]
    loader = replace(u, pcrs={**u.pcrs, 4: A}, boot_chain=(u.boot_chain[0], B))
    assert posture.drift(u, loader, (4,)) == [
        f"PCR 4 changed since enrollment: boot loader differs (was {u.boot_chain[1][:12]}, "
        f"now {B[:12]})"
    ]
    assert posture.drift(u, bare, (4,), since="during the session")[0].startswith(
        "PCR 4 changed during the session"
    )


def test_the_strictest_failing_policy_wins_and_a_passing_one_costs_nothing():
    u = measured(UBUNTU)
    warn = PosturePolicy(secure_boot=True, on_failure="warn")
    withhold = PosturePolicy(pcrs={7: A}, on_failure="withhold")
    passing = PosturePolicy(pcrs={7: u.pcrs[7]}, on_failure="deny")
    verdict = posture.evaluate(
        facts({"secure_boot": True, "on_failure": "warn"}, withhold, passing), u, None
    )
    assert verdict.status == "withhold" and len(verdict.reasons) == 2
    assert posture.evaluate(facts(None, warn, passing), u, None).status == "warn"


def test_an_unreadable_cluster_policy_denies():
    verdict = posture.evaluate(facts({"on_failure": "never"}), measured(SECURE), None)
    assert verdict.status == "deny" and "cannot be read" in verdict.reasons[0]
    assert posture.needs_log(facts("garbage"))


def test_pcr_selection_adds_what_policies_name_never_16_or_23():
    policy = PosturePolicy(pcrs={11: A}, baseline=True, baseline_pcrs=(15,))
    selected = posture.pcr_selection(facts(None, policy))
    assert selected == tuple(sorted({*POSTURE_PCRS, 11, 15}))
    assert 16 not in selected and 23 not in selected


# -- the certificate and continuous attestation ------------------------------------------------


def test_a_failed_posture_ends_the_devices_certificates():
    failed = DevicePosture("d1", verdict="withhold", reasons=("Secure Boot is off",))
    with pytest.raises(DeviceNotTrusted) as err:
        posture.check_device_posture("pass", facts(device_posture=failed), 0.0)
    assert err.value.message == 'device "laptop-1" failed its posture check: Secure Boot is off'
    posture.check_device_posture(None, facts(device_posture=replace(failed, verdict="warn")), 0.0)


def test_a_certificate_from_before_a_policy_says_nothing_about_the_boot():
    strict = facts({"secure_boot": True})
    with pytest.raises(DeviceNotTrusted, match="carries no posture verdict"):
        posture.check_device_posture(None, strict, 0.0)
    with pytest.raises(DeviceNotTrusted):
        posture.check_device_posture("unchecked", strict, 0.0)
    posture.check_device_posture("pass", strict, 0.0)
    posture.check_device_posture(None, facts({"secure_boot": True, "on_failure": "warn"}), 0.0)


def test_continuous_attestation_deadline():
    asked = PosturePolicy(attest_interval=10, attest_grace=5)
    slower = PosturePolicy(attest_interval=30)
    f = facts(None, asked, slower)
    assert posture.continuous(f) == (10, 5) and not posture.needs_log(f)
    assert posture.attestation_deadline(facts()) is None
    assert posture.attestation_deadline(f) == 0.0
    attested = DevicePosture("d1", verdict="unchecked", attested_until=100.0)
    f = facts(None, asked, device_posture=attested)
    posture.check_device_posture(None, f, 99.0)
    with pytest.raises(DeviceNotTrusted, match="its agent stopped answering"):
        posture.check_device_posture(None, f, 100.0)
    cut = replace(attested, attested_until=0.0, attest_failure="PCR 4 changed during the session")
    with pytest.raises(DeviceNotTrusted, match="no longer attested: PCR 4 changed"):
        posture.check_device_posture(None, facts(None, asked, device_posture=cut), 1.0)
    assert posture.policy_from_doc({"attest_interval": "10s"}).attest_grace == 20
