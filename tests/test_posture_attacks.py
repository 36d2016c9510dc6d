"""Attacks on measured-boot posture, each a way an attacker who owns a device's OS (root
on a laptop booted into something it should not have) gets a posture verdict it should
not, or keeps one longer than it should.

What the attacker can do, on real hardware as on the swtpm here: extend any PCR 0-15
from the running OS (``tpm2_pcrextend``) and write the event log it sends however it
likes. It cannot undo an extend, nor change the order of the events the firmware
extended into one PCR before it. So every test boots the swtpm as the log says (the
firmware's events, then the attacker's own extends) and sends that very log: it
replays to the quote exactly.

End to end through the dt-api ceremonies of tests/test_device_posture_ceremonies.py
(its ``env``: a cluster, alice, a swtpm), except where the core alone shows it.
"""

from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import replace

import pytest

from bastion.authz import decide, posture
from bastion.authz.facts import Facts
from bastion.authz.records import Role
from bastion.enroll import measured
from bastion.node_principals import decide as node_decide
from bastion.protocol import eventlog
from bastion.protocol.certs import parse_cert
from bastion.protocol.errors import DeviceNotTrusted, PostureDenied
from client import ceremony as client_ceremony
from tests import test_device_posture_ceremonies as ceremonies
from tests import tpm_eventlog as logs
from tests.test_node_principals import publish

pytestmark = pytest.mark.integration
env = ceremonies.env  # the fixture: a cluster, alice, her device's swtpm
GOOD, TAG = ceremonies.GOOD, ceremonies.TAG

CHAIN = {k: GOOD.digest(k) for k in ("shim", "bootloader", "kernel")}


def _secure_boot_variable(on: bool) -> logs.SynthEvent:
    value = b"\x01" if on else b"\x00"
    return logs.SynthEvent(
        7,
        logs.EV_EFI_VARIABLE_DRIVER_CONFIG,
        logs.variable_data(logs.EFI_GLOBAL_VARIABLE, "SecureBoot", value),
    )


def _agile_event(log: bytes, event: logs.SynthEvent) -> bytes:
    """``event`` encoded for ``log``'s digest banks (the shipped logs carry several)."""
    spec = eventlog.parse(log).spec_id
    assert spec is not None
    out = struct.pack("<III", event.pcr, event.event_type, len(spec.algorithms))
    for alg in spec.algorithms:
        out += struct.pack("<H", alg.alg_id) + hashlib.new(alg.name, event.data).digest()
    return out + struct.pack("<I", len(event.data)) + event.data


# -- lies the log tells in event text, yet replays to the quote ------------------------------


def test_secure_boot_on_extended_from_the_os_after_an_off_boot_is_not_believed(env):
    """Booted with Secure Boot off; root then ran ``tpm2_pcrextend 7:sha256=...`` with
    the digest of a SecureBoot=1 variable and appended that event to the log. The
    firmware's own SecureBoot event comes before PCR 7's separator; anything after it
    was measured by someone else and says nothing about the firmware's setting."""
    env.boot(logs.SyntheticBoot(secure_boot=False, extra=(_secure_boot_variable(True),)).log())
    env.policy({"secure_boot": True, "on_failure": "deny"})
    with pytest.raises(PostureDenied, match="Secure Boot is off"):
        env.enroll()


def test_secure_boot_on_real_logs_is_read_before_the_separator_only():
    """The shipped firmware logs (all with Secure Boot off) read as off, also with an
    'on' variable appended after the fact."""
    for name in logs.NO_SECURE_BOOT_LOGS:
        log = logs.shipped(name)
        forged = log + _agile_event(log, _secure_boot_variable(True))
        for sent in (log, forged):
            quoted = eventlog.replay(sent)["sha256"]
            got = measured.measure({i: quoted.get(i, bytes(32)) for i in (0, 4, 7)}, sent)
            assert got.log == "replayed" and got.secure_boot is False, name


def test_an_allowed_kernel_digest_extended_after_boot_does_not_hide_the_kernel_booted(env):
    """Booted an evil kernel; root extends PCR 9 with the allowed kernel's digest and
    appends a matching ``/boot/vmlinuz-...`` event: one allowed kernel among those
    measured must not make the boot chain an allowed one."""
    good_path = GOOD.cmdline.split(" ", 1)[0].encode() + b"\0"
    forged = logs.SynthEvent(9, logs.EV_IPL, good_path, measured=GOOD.kernel)
    evil = replace(GOOD, kernel=b"vmlinuz-6.1.0-18-amd64 rootkit", extra=(forged,))
    env.boot(evil.log())
    env.policy({"boot_chains": [{"name": "debian", **CHAIN}], "on_failure": "deny"})
    with pytest.raises(PostureDenied, match="boot chain is not an allowed one"):
        env.enroll()


# -- the baseline ------------------------------------------------------------------------------


def test_enrolling_again_is_no_way_around_an_admins_approval(env):
    """A drifted device (withheld) whose owner simply enrolls it again, same user, same
    TPM: the new enrollment must not make the tampered boot its baseline without
    ``dtadmin device posture approve``."""
    env.policy({"baseline": True, "on_failure": "withhold"})
    env.enroll()
    env.boot(replace(GOOD, bootloader=b"grubx64.efi evil").log())
    assert env.login()[1].posture == "withhold"
    env.enroll()  # dtclient device enroll --current-device, again
    _, issued = env.login()
    assert issued.posture == "withhold", "re-enrollment approved the tampered boot"
    assert env.posture().baseline_by == "enrollment"


def test_a_baseline_the_client_chose_to_quote_little_of_still_drifts(env, monkeypatch):
    """Enrolled while no policy named a selection: the client may quote any PCRs (here
    PCR 0 alone), and that becomes the baseline. Once a baseline policy applies, a PCR
    the baseline lacks must not count as 'unchanged'."""
    monkeypatch.setattr(client_ceremony, "pcr_selection", lambda asked: (0,))
    env.enroll()
    monkeypatch.undo()
    assert sorted(env.posture().baseline.pcrs) == [0]
    env.policy({"baseline": True, "on_failure": "withhold"})
    env.boot(replace(GOOD, bootloader=b"grubx64.efi evil").log())
    _, issued = env.login()
    assert issued.posture == "withhold", "a baseline of PCR 0 alone let PCR 4 change"


# -- a certificate issued under one policy, used under another ---------------------------------


def _set_role_policy(env):
    env.store.put_role(Role(name="booted", posture=posture.policy_from_doc({"secure_boot": True})))
    user = env.store.get_user("alice")
    env.store.update_user(replace(user, roles=(*user.roles, "booted")))


@pytest.mark.parametrize(
    "change",
    [
        lambda env: env.policy({"secure_boot": True, "on_failure": "withhold"}),
        _set_role_policy,
        lambda env: env.store.set_setting("posture_policy", {"secure_boot": "maybe"}),
    ],
    ids=["warn-becomes-withhold", "role-with-policy-granted", "cluster-policy-unreadable"],
)
def test_a_stricter_policy_reaches_certificates_issued_before_it(env, change):
    """Secure Boot off under a warn-only policy: a certificate with device extensions
    (posture "warn"). Then the admin makes the failure cost something, or alice gains a
    role whose policy her boot fails, or the policy becomes unreadable (which must deny
    every device). Her certificate from before must not keep the device trusted."""
    env.boot(logs.SyntheticBoot(secure_boot=False).log())
    env.policy({"secure_boot": True, "on_failure": "warn"})
    env.enroll()
    _, issued = env.login()
    assert issued.posture == "warn"
    claims = decide.claims_of(parse_cert(issued.certificate.encode()))
    change(env)
    now = time.time()
    with pytest.raises(DeviceNotTrusted):
        decide.check_device(claims, env.store.facts(user="alice", asset_tag=TAG, now=now), now)


# -- nodes reached without the bastion (dt-node-principals) ------------------------------------


def test_the_node_helper_holds_a_certificate_to_its_devices_posture(env):
    """A certificate from a good boot; the device's next login shows a tampered boot
    (withheld). The bastion no longer accepts the earlier certificate; a node checking
    with the published state must not either (the issue: node-side checks can require
    the posture too)."""
    env.policy({"secure_boot": True, "on_failure": "withhold"})
    env.enroll()
    _, issued = env.login()
    cert = parse_cert(issued.certificate.encode())
    env.boot(logs.SyntheticBoot(secure_boot=False).log())
    assert env.login()[1].posture == "withhold"
    now = time.time()
    with pytest.raises(DeviceNotTrusted, match="failed its posture check"):
        decide.check_device(
            decide.claims_of(cert), env.store.facts(user="alice", asset_tag=TAG, now=now), now
        )
    decision = node_decide(
        "root",
        cert,
        ca_fingerprints={env.cluster.ca.user_ca_fingerprint},
        require_device=True,
        state=publish(env.cluster),
    )
    assert decision.principals == (), "the node admits a device whose boot failed"


# -- what one login may cost the bastion ---------------------------------------------------------


def test_one_login_with_many_bad_command_lines_costs_a_bounded_audit_row():
    """A device whose root extended PCR 8 with thousands of (self-consistent) command
    lines: every one fails the pattern, and each becomes a reason, stored in the
    posture row, the audit row and the user's message. Bounded they must be."""
    lines = [f"/boot/vmlinuz x{i} " + "A" * 3000 for i in range(1000)]
    events = logs.SyntheticBoot().events() + [
        logs.SynthEvent(
            8, logs.EV_IPL, b"kernel_cmdline: " + line.encode() + b"\0", measured=line.encode()
        )
        for line in lines
    ]
    log = logs.encode_log(events)
    assert len(log) < eventlog.MAX_LOG_SIZE
    assert len(eventlog.compress_log(log)) < 1024 * 1024  # fits one dt-api message
    quoted = eventlog.replay(log)["sha256"]
    got = measured.measure({i: quoted.get(i, bytes(32)) for i in posture.POSTURE_PCRS}, log)
    assert got.log == "replayed"
    facts = Facts(
        cluster_posture={"kernel_cmdline": r"\S+ root=/dev/vda1 ro", "on_failure": "withhold"}
    )
    verdict = posture.evaluate(facts, got, None)
    assert verdict.failed
    assert len(verdict.message) < 16 * 1024, (
        f"{len(verdict.reasons)} reasons, {len(verdict.message)} chars"
    )


# -- the event type and text are the client's: only each PCR's digests are the TPM's ------------
#
# The attacker's device extends the PCRs below for real (so the quote is what the log
# replays to); the log it sends keeps every digest in order and changes the rest: an
# event's type, or its data where the digest is not the data's own hash. measure()
# is given exactly the PCRs that log replays to, as the swtpm's quote would be.


def _measure(events: list[logs.SynthEvent]) -> measured.Measurement:
    log = logs.encode_log(events)
    quoted = eventlog.replay(log)["sha256"]
    got = measured.measure({i: quoted.get(i, bytes(32)) for i in posture.POSTURE_PCRS}, log)
    assert got.log == "replayed"
    return got


def _retold(events: list[logs.SynthEvent], index: int, **changes: object) -> list[logs.SynthEvent]:
    """The same extend (its digest kept), told as another event."""
    return logs.with_event(events, index, digest=events[index].sha256, **changes)


SEPARATOR = logs.SynthEvent(7, logs.EV_SEPARATOR, b"\0\0\0\0")


def test_secure_boot_off_retold_and_the_separator_retyped_still_reads_off():
    """The firmware's SecureBoot=0 event sent with junk data (its digest kept), PCR 7's
    separator sent as another type; then the OS's own SecureBoot=1 and separator."""
    boot = logs.SyntheticBoot(secure_boot=False, extra=(_secure_boot_variable(True), SEPARATOR))
    events = boot.events()
    sb = boot.index(logs.EV_EFI_VARIABLE_DRIVER_CONFIG, 7)
    sep = boot.index(logs.EV_SEPARATOR, 7)
    events = _retold(events, sb, data=b"junk")
    events = _retold(events, sep, event_type=logs.EV_EFI_ACTION)
    assert _measure(events).secure_boot is not True


def test_a_boot_loader_retyped_is_still_in_the_boot_chain():
    """An evil grub's PCR 4 extend sent as an EV_EFI_ACTION; then the OS extends the
    allowed grub's digest as a boot application. The chain must still show the evil
    grub second."""
    evil = replace(GOOD, bootloader=b"grubx64.efi evil")
    events = evil.events()
    grub = evil.index(logs.EV_EFI_BOOT_SERVICES_APPLICATION, 4, nth=1)
    kernel = evil.index(logs.EV_EFI_BOOT_SERVICES_APPLICATION, 4, nth=2)
    events = _retold(events, grub, event_type=logs.EV_EFI_ACTION)
    events = _retold(events, kernel, event_type=logs.EV_EFI_ACTION)
    forged = [
        logs.SynthEvent(4, logs.EV_EFI_BOOT_SERVICES_APPLICATION, b"", measured=GOOD.bootloader),
        logs.SynthEvent(4, logs.EV_EFI_BOOT_SERVICES_APPLICATION, b"", measured=GOOD.kernel),
    ]
    got = _measure(events + forged)
    policy = posture.policy_from_doc({"boot_chains": [CHAIN], "on_failure": "deny"})
    assert posture.evaluate(Facts(cluster_posture=policy), got, None).status == "deny"


@pytest.mark.parametrize("how", ["junk data", "another type", "another prefix"])
def test_a_bad_kernel_command_line_cannot_be_retold_away(how):
    """grub measured ``init=/bin/sh``; the log tells that extend as something else, and
    the OS extends an allowed line after it."""
    bad = replace(GOOD, cmdline=GOOD.cmdline + " init=/bin/sh")
    events = bad.events()
    at = next(i for i, e in enumerate(events) if e.data.startswith(b"kernel_cmdline: "))
    line = bad.cmdline.encode()
    if how == "junk data":
        events = _retold(events, at, data=b"kernel_cmdline: ok\0")
    elif how == "another type":
        events = _retold(events, at, event_type=logs.EV_EFI_ACTION)
    else:
        events = _retold(events, at, data=b"grub_cmd: " + line + b"\0")
    good = GOOD.cmdline.encode()
    events.append(
        logs.SynthEvent(8, logs.EV_IPL, b"kernel_cmdline: " + good + b"\0", measured=good)
    )
    got = _measure(events)
    policy = posture.policy_from_doc({"kernel_cmdline": r"\S+ root=/dev/vda1 ro( quiet)?"})
    verdict = posture.evaluate(Facts(cluster_posture=policy), got, None)
    assert verdict.failed, got.cmdlines
