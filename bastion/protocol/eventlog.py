"""The TCG PC Client boot event log: a small, strict parser and the PCR replay.

The log is what firmware, shim and the boot loader measured into the TPM, in the order
they did (``/sys/kernel/security/tpm0/binary_bios_measurements``; TCG PC Client Platform
Firmware Profile, section 10). Its first event is always in the old SHA-1 format
(TCG_PCClientPCREvent). In a crypto-agile log that event is an EV_NO_ACTION carrying the
"Spec ID Event03" structure, which lists every digest algorithm and its size; every later
event (TCG_PCR_EVENT2) then carries one digest per listed algorithm. A log whose first
event is anything else is a legacy SHA-1-only log, every event in the old format.

Pure functions over bytes, no I/O. Nothing here believes the log: it is sent by the
client, and means something only once :func:`replay` matches a quote. Every malformed,
truncated or oversized input raises :class:`EventLogMalformed` and nothing else; the
bounds below keep a hostile log from costing more than its (bounded) size in memory.

A log cut exactly at an event boundary is a valid, shorter log (the firmware may still
be appending; its replay simply will not match a quote of the full PCRs). A log cut
inside an event is refused.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

from bastion.protocol.errors import EventLogMalformed

MAX_LOG_SIZE = 4 * 1024 * 1024
MAX_EVENTS = 20_000
MAX_EVENT_SIZE = 1024 * 1024
MAX_ALGORITHMS = 8
NUM_PCRS = 24

EV_NO_ACTION = 0x00000003
EV_EFI_HCRTM_EVENT = 0x80000010
SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"

EVENT_TYPES: dict[int, str] = {
    0x00000000: "EV_PREBOOT_CERT",
    0x00000001: "EV_POST_CODE",
    0x00000002: "EV_UNUSED",
    0x00000003: "EV_NO_ACTION",
    0x00000004: "EV_SEPARATOR",
    0x00000005: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG",
    0x00000007: "EV_S_CRTM_CONTENTS",
    0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE",
    0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000B: "EV_TABLE_OF_DEVICES",
    0x0000000C: "EV_COMPACT_HASH",
    0x0000000D: "EV_IPL",
    0x0000000E: "EV_IPL_PARTITION_DATA",
    0x0000000F: "EV_NONHOST_CODE",
    0x00000010: "EV_NONHOST_CONFIG",
    0x00000011: "EV_NONHOST_INFO",
    0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000000: "EV_EFI_EVENT_BASE",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}

# TPM_ALG_ID -> (bank name as tpm2-tools prints it, digest size). A log naming any
# other algorithm cannot be replayed and is refused.
ALGORITHMS: dict[int, tuple[str, int]] = {
    0x0004: ("sha1", 20),
    0x000B: ("sha256", 32),
    0x000C: ("sha384", 48),
    0x000D: ("sha512", 64),
    0x0027: ("sha3_256", 32),
    0x0028: ("sha3_384", 48),
    0x0029: ("sha3_512", 64),
}
SHA1 = 0x0004


def event_type_name(event_type: int) -> str:
    return EVENT_TYPES.get(event_type, f"0x{event_type:08x}")


@dataclass(frozen=True, slots=True)
class Algorithm:
    alg_id: int
    name: str
    digest_size: int


@dataclass(frozen=True, slots=True)
class SpecID:
    """The TCG_EfiSpecIDEvent of a crypto-agile log's first event."""

    platform_class: int
    spec_version: tuple[int, int, int]  # major, minor, errata
    uintn_size: int
    algorithms: tuple[Algorithm, ...]
    vendor_info: bytes


@dataclass(frozen=True, slots=True)
class Event:
    """One measurement: ``digests`` maps a bank name to the digest extended into ``pcr``."""

    index: int  # position in the log, the header event being 0
    pcr: int
    event_type: int
    digests: tuple[tuple[str, bytes], ...]
    data: bytes

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)


@dataclass(frozen=True, slots=True)
class EventLog:
    """A parsed log. ``spec_id`` is None for a legacy SHA-1-only log; ``header`` is the
    first (SHA-1-format) event, included in ``events`` only for a legacy log, where it
    is an ordinary measurement."""

    spec_id: SpecID | None
    header: Event
    events: tuple[Event, ...]

    @property
    def banks(self) -> tuple[str, ...]:
        if self.spec_id is None:
            return ("sha1",)
        return tuple(a.name for a in self.spec_id.algorithms)


def _bad(what: str, offset: int) -> EventLogMalformed:
    return EventLogMalformed(f"the boot event log is malformed: {what} (at byte {offset})")


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.remaining():
            raise _bad(f"truncated {what}", self.pos)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        value: int = struct.unpack("<H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value


def _pcr_index(r: _Reader) -> int:
    start = r.pos
    pcr = r.u32("PCR index")
    if pcr >= NUM_PCRS:
        raise _bad(f"PCR index {pcr} is not 0-{NUM_PCRS - 1}", start)
    return pcr


def _event_data(r: _Reader) -> bytes:
    start = r.pos
    size = r.u32("event size")
    if size > MAX_EVENT_SIZE:
        raise _bad(f"an event of {size} bytes (at most {MAX_EVENT_SIZE})", start)
    return r.take(size, "event data")


def _legacy_event(r: _Reader, index: int) -> Event:
    pcr = _pcr_index(r)
    event_type = r.u32("event type")
    digest = r.take(20, "SHA-1 digest")
    return Event(index, pcr, event_type, (("sha1", digest),), _event_data(r))


def _spec_id(data: bytes) -> SpecID:
    r = _Reader(data)
    r.take(16, "Spec ID signature")
    platform_class = r.u32("platform class")
    minor = r.u8("spec version")
    major = r.u8("spec version")
    errata = r.u8("spec errata")
    uintn_size = r.u8("uintn size")
    count = r.u32("number of algorithms")
    if not 1 <= count <= MAX_ALGORITHMS:
        raise _bad(f"{count} digest algorithms in the Spec ID event", 0)
    algorithms: list[Algorithm] = []
    for _ in range(count):
        at = r.pos
        alg_id = r.u16("algorithm id")
        size = r.u16("digest size")
        known = ALGORITHMS.get(alg_id)
        if known is None:
            raise _bad(f"unsupported digest algorithm 0x{alg_id:04x}", at)
        if known[1] != size:
            raise _bad(f"{known[0]} digests of {size} bytes (not {known[1]})", at)
        if any(a.alg_id == alg_id for a in algorithms):
            raise _bad(f"{known[0]} listed twice in the Spec ID event", at)
        algorithms.append(Algorithm(alg_id, known[0], size))
    vendor_info = r.take(r.u8("vendor info size"), "vendor info")
    if r.remaining():
        raise _bad("trailing bytes after the Spec ID event", r.pos)
    return SpecID(
        platform_class, (major, minor, errata), uintn_size, tuple(algorithms), vendor_info
    )


def _agile_event(r: _Reader, index: int, spec: SpecID) -> Event:
    pcr = _pcr_index(r)
    event_type = r.u32("event type")
    at = r.pos
    count = r.u32("digest count")
    if count != len(spec.algorithms):
        raise _bad(f"{count} digests where the Spec ID event lists {len(spec.algorithms)}", at)
    sizes = {a.alg_id: a for a in spec.algorithms}
    digests: list[tuple[str, bytes]] = []
    for _ in range(count):
        at = r.pos
        alg = sizes.pop(r.u16("digest algorithm"), None)
        if alg is None:
            raise _bad("a digest of an algorithm not listed (or listed twice)", at)
        digests.append((alg.name, r.take(alg.digest_size, f"{alg.name} digest")))
    return Event(index, pcr, event_type, tuple(digests), _event_data(r))


def parse(log: bytes) -> EventLog:
    """Parse a whole log; raise EventLogMalformed unless every byte is a whole event."""
    if not isinstance(log, bytes | bytearray | memoryview):
        raise EventLogMalformed("the boot event log must be bytes")
    log = bytes(log)
    if not log:
        raise EventLogMalformed("the boot event log is empty")
    if len(log) > MAX_LOG_SIZE:
        raise EventLogMalformed(
            f"the boot event log is {len(log)} bytes (at most {MAX_LOG_SIZE} accepted)"
        )
    r = _Reader(log)
    header = _legacy_event(r, 0)
    spec: SpecID | None = None
    if header.event_type == EV_NO_ACTION and header.data.startswith(SPEC_ID_SIGNATURE):
        if header.pcr != 0 or header.digests[0][1] != bytes(20):
            raise _bad("the Spec ID event is not in PCR 0 with a zero digest", 0)
        spec = _spec_id(header.data)
    events: list[Event] = [] if spec is not None else [header]
    while r.remaining():
        if len(events) >= MAX_EVENTS:
            raise _bad(f"more than {MAX_EVENTS} events", r.pos)
        index = len(events) + (1 if spec is not None else 0)
        events.append(_legacy_event(r, index) if spec is None else _agile_event(r, index, spec))
    return EventLog(spec, header, tuple(events))


def startup_locality(log: EventLog) -> int:
    """The last byte of PCR 0's initial value: 4 after an H-CRTM sequence (an
    EV_EFI_HCRTM_EVENT in PCR 0; TPM 2.0 Library part 1, 34.3), else the locality of the
    StartupLocality EV_NO_ACTION event (PC Client PFP 10.4.5.3), else 0."""
    locality = 0
    for event in log.events:
        if event.pcr != 0:
            continue
        if event.event_type == EV_EFI_HCRTM_EVENT:
            return 4
        if (
            event.event_type == EV_NO_ACTION
            and event.data.startswith(STARTUP_LOCALITY_SIGNATURE)
            and len(event.data) == len(STARTUP_LOCALITY_SIGNATURE) + 1
        ):
            locality = event.data[-1]
    return locality


def replay(log: EventLog | bytes) -> dict[str, dict[int, bytes]]:
    """The PCR values the log extends to, per bank: ``{"sha256": {0: b"...", ...}}``.

    Each PCR starts at zero, except PCR 0's last byte, which is the startup locality
    (:func:`startup_locality`), as the TPM does. EV_NO_ACTION events are never extended
    (Debian 12's tpm2_eventlog 5.4 wrongly extends those after the first; upstream
    tpm2-tools now replays as here). Only PCRs that some event extends are listed.
    """
    parsed = log if isinstance(log, EventLog) else parse(log)
    locality = startup_locality(parsed)
    sizes = {name: size for name, size in ALGORITHMS.values()}
    banks: dict[str, dict[int, bytes]] = {name: {} for name in parsed.banks}
    for event in parsed.events:
        if event.event_type == EV_NO_ACTION:
            continue
        for name, digest in event.digests:
            pcrs = banks[name]
            old = pcrs.get(event.pcr)
            if old is None:
                old = bytes(sizes[name])
                if event.pcr == 0:
                    old = old[:-1] + bytes([locality])
            pcrs[event.pcr] = hashlib.new(name, old + digest).digest()
    return banks


def _utf16(raw: bytes) -> str:
    return raw.decode("utf-16-le", errors="replace").rstrip("\x00")


def summary(event: Event, limit: int = 64) -> str:
    """A short, printable description of an event's data, for people; never raises."""
    data = event.data
    text: str
    if event.event_type in (0x80000001, 0x80000002, 0x800000E0, 0x8000000C) and len(data) >= 32:
        # UEFI_VARIABLE_DATA: GUID, name length (chars), data length, name, data
        name_len, data_len = struct.unpack_from("<QQ", data, 16)
        name = data[32 : 32 + 2 * min(name_len, 256)]
        text = f"{_utf16(name)} ({data_len} bytes)"
    elif event.event_type in (0x80000003, 0x80000004, 0x80000005) and len(data) >= 32:
        # UEFI_IMAGE_LOAD_EVENT: location, length, link-time address, device path length
        _, length, _, path_len = struct.unpack_from("<QQQQ", data, 0)
        text = f"image of {length} bytes, device path of {path_len} bytes"
    elif event.event_type == EV_NO_ACTION and data.startswith(STARTUP_LOCALITY_SIGNATURE):
        text = f"StartupLocality {data[-1] if len(data) > 16 else '?'}"
    else:
        stripped = data.rstrip(b"\x00")
        if len(stripped) % 2:
            stripped += b"\x00"
        if len(stripped) >= 4 and not any(stripped[1::2]):  # a UCS-2 string (firmware version)
            stripped = stripped[::2]
        if stripped and all(32 <= b < 127 or b in (9, 10, 13) for b in stripped):
            text = stripped.decode("ascii")
        else:
            text = data[:32].hex() + ("..." if len(data) > 32 else "")
    text = " ".join(text.split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- on the wire -----------------------------------------------------------------------------


def compress_log(log: bytes) -> bytes:
    """The log as dt-api carries it (``event_log``): zlib, so a 40 KB log costs ~25 KB
    (its digests do not compress; its zero padding and repeated text do)."""
    if len(log) > MAX_LOG_SIZE:
        raise EventLogMalformed(
            f"the boot event log is {len(log)} bytes (at most {MAX_LOG_SIZE} accepted)"
        )
    return zlib.compress(bytes(log), 9)


def decompress_log(data: bytes) -> bytes:
    """The log a peer sent, never more than MAX_LOG_SIZE bytes of it: a small message
    that inflates without end (a zlib bomb) is refused before it costs the memory."""
    inflater = zlib.decompressobj()
    try:
        log = inflater.decompress(bytes(data), MAX_LOG_SIZE + 1)
    except zlib.error as exc:
        raise EventLogMalformed(f"the boot event log is not zlib-compressed data ({exc})") from None
    if len(log) > MAX_LOG_SIZE or inflater.unconsumed_tail:
        raise EventLogMalformed(
            f"the boot event log inflates to more than {MAX_LOG_SIZE} bytes, the most accepted"
        )
    if not inflater.eof:
        raise EventLogMalformed("the boot event log's compressed data is cut short")
    if inflater.unused_data:
        raise EventLogMalformed("the boot event log's compressed data has trailing bytes")
    return log
