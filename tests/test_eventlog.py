"""The boot event log parser against tpm2_eventlog on real firmware logs, and hostile input.

Reference: ``tpm2_eventlog FILE`` (Debian tpm2-tools) on the logs in ../shared/eventlogs/;
its YAML lists every event and, at the end, the PCR values per bank.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.protocol import eventlog
from bastion.protocol.errors import EventLogMalformed

LOGS_DIR = Path(__file__).resolve().parents[2] / "shared" / "eventlogs"
LOGS = sorted(LOGS_DIR.glob("*.bin")) if LOGS_DIR.is_dir() else []
DTADMIN = Path(sys.executable).parent / "dtadmin"
needs_logs = pytest.mark.skipif(not LOGS, reason="../shared/eventlogs is not present")


@cache
def reference(path: Path) -> dict:
    if shutil.which("tpm2_eventlog") is None:
        pytest.skip("tpm2_eventlog (tpm2-tools) is not installed")
    out = subprocess.run(
        ["tpm2_eventlog", str(path)], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return yaml.safe_load(out)


@needs_logs
@pytest.mark.parametrize("path", LOGS, ids=lambda p: p.name)
def test_real_log_matches_tpm2_eventlog(path):
    log = eventlog.parse(path.read_bytes())
    ref = reference(path)
    header, *events = ref["events"]
    spec = header["SpecID"][0]
    assert log.spec_id is not None
    assert [(a.name, a.digest_size) for a in log.spec_id.algorithms] == [
        (a["algorithmId"], a["digestSize"]) for a in spec["Algorithms"]
    ]
    assert len(log.events) == len(events)
    for ours, theirs in zip(log.events, events, strict=True):
        assert ours.index == theirs["EventNum"]
        assert ours.pcr == theirs["PCRIndex"]
        assert ours.type_name == theirs["EventType"]
        assert len(ours.data) == theirs["EventSize"]
        assert dict(ours.digests) == {
            d["AlgorithmId"]: bytes.fromhex(d["Digest"]) for d in theirs["Digests"]
        }
        eventlog.summary(ours)  # printable for every real event
    replayed = eventlog.replay(log)
    sizes = {a.name: a.digest_size for a in log.spec_id.algorithms}
    assert replayed == {
        bank: {int(pcr): value.to_bytes(sizes[bank], "big") for pcr, value in pcrs.items()}
        for bank, pcrs in ref["pcrs"].items()
    }


def _boundaries(data: bytes) -> list[int]:
    """Where each event of a parsed log ends, from the parser's own view of sizes."""
    log = eventlog.parse(data)
    ends, pos = [], 32 + len(log.header.data)
    ends.append(pos)
    for e in log.events:
        pos += 12 + sum(2 + len(d) for _, d in e.digests) + 4 + len(e.data)
        ends.append(pos)
    assert pos == len(data)
    return ends


SMALL_LOGS = [p for p in LOGS if p.stat().st_size < 20_000]  # one agile SHA-256, one 3-bank


@needs_logs
@pytest.mark.parametrize("path", SMALL_LOGS, ids=lambda p: p.name)
def test_every_truncated_prefix_is_refused_or_a_shorter_log(path):
    """A cut at an event boundary is a valid shorter log (its replay will not match a
    quote of the whole boot); a cut anywhere inside an event is refused, never another
    exception. Every prefix, byte by byte."""
    data = path.read_bytes()
    full = eventlog.parse(data)
    ends = _boundaries(data)
    cuts = range(len(data) + 1)
    for cut in sorted(cuts):
        prefix = data[:cut]
        if cut in ends:
            k = ends.index(cut)
            assert eventlog.parse(prefix).events == full.events[:k], cut
        else:
            with pytest.raises(EventLogMalformed):
                eventlog.parse(prefix)


@needs_logs
@pytest.mark.parametrize("path", LOGS, ids=lambda p: p.name)
def test_every_event_boundary_parses_and_a_byte_short_is_refused(path):
    data = path.read_bytes()
    ends = _boundaries(data)
    for k, end in enumerate(ends):
        assert len(eventlog.parse(data[:end]).events) == k
        with pytest.raises(EventLogMalformed):
            eventlog.parse(data[: end - 1])


def _spec_event(algs=((0x000B, 32),), vendor=b"", extra=b"", vendor_size=None) -> bytes:
    body = eventlog.SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algs))
    body += b"".join(struct.pack("<HH", a, s) for a, s in algs)
    body += bytes([len(vendor) if vendor_size is None else vendor_size]) + vendor + extra
    return (
        struct.pack("<II", 0, eventlog.EV_NO_ACTION)
        + bytes(20)
        + struct.pack("<I", len(body))
        + body
    )


def _event2(pcr: int, etype: int, digests, data: bytes) -> bytes:
    out = struct.pack("<III", pcr, etype, len(digests))
    out += b"".join(struct.pack("<H", a) + d for a, d in digests)
    return out + struct.pack("<I", len(data)) + data


def test_startup_locality_sets_pcr0_and_no_action_is_not_extended():
    """Checked against the spec, not the tool: the shipped logs have no StartupLocality
    event, and Debian 12's tpm2_eventlog (5.4) extends a later EV_NO_ACTION's zero digest
    into PCR 0 and ignores the locality (upstream tpm2-tools now replays as here)."""
    digest = hashlib.sha256(b"crtm").digest()
    log = (
        _spec_event()
        + _event2(0, eventlog.EV_NO_ACTION, [(0x000B, bytes(32))], b"StartupLocality\x00\x03")
        + _event2(0, 0x00000008, [(0x000B, digest)], b"v1")
        + _event2(9, eventlog.EV_NO_ACTION, [(0x000B, b"\x01" * 32)], b"x")
    )
    start = bytes(31) + b"\x03"
    assert eventlog.replay(log) == {"sha256": {0: hashlib.sha256(start + digest).digest()}}
    # an H-CRTM sequence starts PCR 0 at 4 (TPM 2.0 Library part 1, 34.3)
    hcrtm = _spec_event() + _event2(0, eventlog.EV_EFI_HCRTM_EVENT, [(0x000B, digest)], b"HCRTM")
    start = bytes(31) + b"\x04"
    assert eventlog.replay(hcrtm) == {"sha256": {0: hashlib.sha256(start + digest).digest()}}


def test_legacy_sha1_log_replays_the_sha1_bank():
    d1, d2 = hashlib.sha1(b"a").digest(), hashlib.sha1(b"b").digest()  # noqa: S324
    log = b"".join(
        struct.pack("<II", pcr, 0x0D) + d + struct.pack("<I", 3) + b"abc"
        for pcr, d in ((4, d1), (4, d2))
    )
    parsed = eventlog.parse(log)
    assert parsed.spec_id is None and parsed.banks == ("sha1",) and len(parsed.events) == 2
    first = hashlib.sha1(bytes(20) + d1).digest()  # noqa: S324
    assert eventlog.replay(parsed) == {"sha1": {4: hashlib.sha1(first + d2).digest()}}  # noqa: S324


@pytest.mark.parametrize(
    "log",
    [
        b"",
        _spec_event(algs=((0x0012, 32),)),  # SM3: not replayable here
        _spec_event(algs=((0x000B, 20),)),  # wrong size for sha256
        _spec_event(algs=((0x000B, 32), (0x000B, 32))),
        _spec_event(algs=()),
        _spec_event() + _event2(24, 13, [(0x000B, bytes(32))], b""),  # PCR out of range
        _spec_event() + _event2(0, 13, [], b""),  # a digest missing
        _spec_event() + _event2(0, 13, [(0x0004, bytes(20))], b""),  # not the listed bank
        _spec_event()
        + struct.pack("<III", 0, 13, 1)
        + struct.pack("<H", 0x000B)
        + bytes(32)
        + struct.pack("<I", eventlog.MAX_EVENT_SIZE + 1),
        _spec_event(extra=b"\x00"),  # trailing bytes in the Spec ID event
        _spec_event(vendor_size=5),  # vendor info cut short
        bytes(eventlog.MAX_LOG_SIZE + 1),
    ],
)
def test_malformed_logs_are_refused(log):
    with pytest.raises(EventLogMalformed) as raised:
        eventlog.parse(log)
    assert raised.value.code == "eventlog_malformed" and raised.value.exit_code == 11


def test_too_many_events_are_refused():
    one = _event2(1, 13, [(0x000B, bytes(32))], b"")
    with pytest.raises(EventLogMalformed, match="more than"):
        eventlog.parse(_spec_event() + one * (eventlog.MAX_EVENTS + 1))


def _only_malformed(data: bytes) -> None:
    try:
        log = eventlog.parse(data)
    except EventLogMalformed:
        return
    eventlog.replay(log)
    for event in log.events:
        eventlog.summary(event)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_eventlog_malformed(data):
    _only_malformed(data)
    _only_malformed(_spec_event() + data)


@needs_logs
@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_real_logs_only_ever_raise_eventlog_malformed(draw):
    data = bytearray(min(LOGS, key=lambda p: p.stat().st_size).read_bytes())
    for _ in range(draw.draw(st.integers(1, 4))):
        at = draw.draw(st.integers(0, len(data) - 1))
        data[at] = draw.draw(st.integers(0, 255))
    if draw.draw(st.booleans()):
        at = draw.draw(st.integers(0, len(data)))
        data[at:at] = draw.draw(st.binary(max_size=8))
    _only_malformed(bytes(data))


def _dtadmin(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [DTADMIN, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@needs_logs
def test_dtadmin_eventlog_show(tmp_path):
    path = next(p for p in LOGS if p.name.startswith("ubuntu"))
    proc = _dtadmin("eventlog", "show", str(path), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["banks"] == ["sha1", "sha256", "sha384"] and len(doc["events"]) == 105
    ref = reference(path)
    assert doc["pcrs"]["sha256"] == {
        str(pcr): f"{value:064x}" for pcr, value in ref["pcrs"]["sha256"].items()
    }
    assert any("grub" in e["summary"] for e in doc["events"])
    tsv = _dtadmin("eventlog", "show", str(path)).stdout.splitlines()
    assert tsv[0].split("\t") == ["#", "PCR", "Type", "Digests", "Event"]
    assert ["Bank", "PCR", "Value"] in [line.split("\t") for line in tsv]
    # a cut log, a missing file, a directory: one line, the contract's exit codes
    cut = tmp_path / "cut.bin"
    cut.write_bytes(path.read_bytes()[:-3])
    bad = _dtadmin("eventlog", "show", str(cut))
    assert bad.returncode == 11 and bad.stderr.startswith("error: the boot event log is malformed")
    assert _dtadmin("eventlog", "show", str(tmp_path / "none")).returncode == 3
    assert _dtadmin("eventlog", "show", str(tmp_path)).returncode == 2
