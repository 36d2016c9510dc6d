"""Measuring a quote with its boot event log: the real logs in ../shared/eventlogs/,
and the ways a log can lie about the quote it comes with."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from bastion.authz.records import POSTURE_PCRS
from bastion.enroll.measured import measure
from bastion.protocol import eventlog

LOGS = Path(__file__).resolve().parents[2] / "shared" / "eventlogs"
UBUNTU = LOGS / "ubuntu_2104_shielded_vm_no_secure_boot_eventlog.bin"
SECURE = LOGS / "sb_cert_eventlog.bin"


def quoted_for(log: bytes, pcrs=POSTURE_PCRS) -> dict[int, bytes]:
    """What a TPM that booted this log would quote: its replay, zero where untouched."""
    replayed = eventlog.replay(log)["sha256"]
    return {i: replayed.get(i, bytes(32)) for i in pcrs}


def events_of(log: bytes) -> list[tuple[int, int, int]]:
    """(offset of the event's sha256 digest, pcr, type) for each crypto-agile event."""
    parsed = eventlog.parse(log)
    out = []
    for event in parsed.events:
        digest = dict(event.digests)["sha256"]
        out.append((log.index(digest), event.pcr, event.event_type))
    return out


@pytest.mark.parametrize("path", sorted(LOGS.glob("*.bin")), ids=lambda p: p.stem)
def test_every_shipped_log_replays_to_its_own_quote(path):
    log = path.read_bytes()
    m = measure(quoted_for(log), log, now=5.0)
    assert m.log == "replayed" and m.trusted_log, m.log_note
    assert set(m.pcrs) == set(POSTURE_PCRS) and m.time == 5.0
    assert all(len(v) == 64 for v in m.pcrs.values())


def test_what_the_logs_say_about_the_boot():
    ubuntu = measure(quoted_for(UBUNTU.read_bytes()), UBUNTU.read_bytes())
    assert ubuntu.secure_boot is False
    assert len(ubuntu.boot_chain) == 2  # shim, grub; grub reads the kernel itself
    assert ubuntu.cmdlines == (
        "/boot/vmlinuz-5.11.0-1006-gcp root=PARTUUID=6443a6ae-e5e9-4df7-9a06-d1329e50f33c "
        "ro console=ttyS0 panic=-1",
    )
    assert len(ubuntu.kernel_files) == 1
    secure = measure(quoted_for(SECURE.read_bytes()), SECURE.read_bytes())
    assert secure.secure_boot is True and len(secure.boot_chain) == 3 and secure.cmdlines == ()


def test_no_log_is_absent_with_the_clients_reason():
    log = UBUNTU.read_bytes()
    m = measure(quoted_for(log), None, "permission denied on the event log")
    assert m.log == "absent" and m.log_note == "permission denied on the event log"
    assert m.secure_boot is None and m.boot_chain == ()
    assert measure(quoted_for(log), None).log_note == "the device sent no boot event log"


def test_a_log_of_another_boot_counts_as_no_log():
    quoted = quoted_for(UBUNTU.read_bytes())
    other = SECURE.read_bytes()
    m = measure(quoted, other)
    assert m.log == "mismatch" and "PCR 0" in m.log_note and "counts as no log" in m.log_note
    assert m.secure_boot is None  # nothing read from a log that is not this boot's


def test_a_log_cut_between_events_does_not_match_the_full_boot():
    log = UBUNTU.read_bytes()
    for size in range(len(log) - 1, 0, -1):  # the last boundary before the end
        try:
            eventlog.parse(log[:size])
            break
        except eventlog.EventLogMalformed:
            continue
    m = measure(quoted_for(log), log[:size])
    assert m.log == "mismatch"


def test_a_truncated_log_is_malformed_not_a_crash():
    log = UBUNTU.read_bytes()
    m = measure(quoted_for(log), log[:-3])
    assert m.log == "malformed" and m.log_note


def test_an_edited_digest_no_longer_replays():
    log = bytearray(UBUNTU.read_bytes())
    offset = next(o for o, pcr, _ in events_of(bytes(log)) if pcr == 4)
    log[offset] ^= 1
    m = measure(quoted_for(UBUNTU.read_bytes()), bytes(log))
    assert m.log == "mismatch" and "PCR 4" in m.log_note


def test_a_command_line_whose_text_is_not_what_was_measured_is_not_believed():
    """The PCR covers only the digest: a log that keeps grub's digest but shows a
    different text replays fine, and must not be read for its text."""
    log = UBUNTU.read_bytes()
    old = b"ro console=ttyS0 panic=-1"
    new = b"rw console=ttyS0 panic=-1"
    at = log.index(b"kernel_cmdline: ")
    forged = log[:at] + log[at:].replace(old, new, 1)  # same length: still parses, replays
    m = measure(quoted_for(log), forged)
    assert m.log == "replayed" and m.cmdlines == ()


def test_a_secureboot_variable_whose_data_is_not_what_was_measured_is_not_believed():
    log = bytearray(UBUNTU.read_bytes())
    name = "SecureBoot".encode("utf-16-le")
    at = log.index(name) + len(name)
    assert log[at] == 0  # off, as measured
    log[at] = 1  # claims "on"; the digest (and so the replay) is unchanged
    m = measure(quoted_for(UBUNTU.read_bytes()), bytes(log))
    assert m.log == "replayed" and m.secure_boot is None


def test_a_log_without_a_sha256_bank_cannot_match():
    # A legacy SHA-1 log: one event, the header itself.
    data = b"\x00" * 4
    event = struct.pack("<II", 0, 1) + hashlib.sha1(data).digest() + struct.pack("<I", 4) + data
    m = measure({0: bytes(32)}, event)
    assert m.log == "mismatch" and "SHA-256" in m.log_note


def test_what_a_measurement_keeps_is_bounded_and_starts_with_the_real_boot():
    """Root on the device can append thousands of PCR 8 extends after boot; the stored
    measurement (posture row, audit, user message) keeps the first lines, which are the
    boot's own."""
    from tests import tpm_eventlog as logs

    line = "/boot/vmlinuz root=/dev/vda1 ro quiet"
    extra = tuple(
        logs.SynthEvent(8, logs.EV_IPL, b"kernel_cmdline: x" + str(i).encode(), measured=b"x%d" % i)
        for i in range(500)
    )
    boot = logs.SyntheticBoot(cmdline=line, extra=extra)
    log = boot.log()
    m = measure(quoted_for(log), log)
    assert m.log == "replayed" and len(m.cmdlines) == 32 and m.cmdlines[0] == line
