"""What a quote and its boot event log prove about a boot: pure functions over bytes.

The quote's PCR values are what the TPM signed; the event log is only the client's
story of how they came to be. So the log is replayed first, and only a log that
replays to exactly the quoted SHA-256 PCRs is read for facts (Secure Boot, the boot
applications, the kernel command line). Any other log (cut, padded, from another boot
or edited) counts as no log: a policy that needs it fails, and says why.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import uuid

from bastion.authz.records import Measurement
from bastion.protocol import eventlog
from bastion.protocol.errors import EventLogMalformed

EV_IPL = 0x0000000D
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
KERNEL_CMDLINE = b"kernel_cmdline: "
ZERO = bytes(32)
MAX_CMDLINE = 4096


def measure(
    quoted: dict[int, bytes], event_log: bytes | None, log_note: str = "", now: float = 0.0
) -> Measurement:
    """The measurement of one quote. ``quoted`` maps PCR index to the SHA-256 value the
    quote covers (already checked against its signed digest); ``log_note`` is the
    client's reason when it sent no log."""
    pcrs = {index: value.hex() for index, value in sorted(quoted.items())}
    if event_log is None:
        note = log_note or "the device sent no boot event log"
        return Measurement(pcrs=pcrs, log="absent", log_note=note, time=now)
    try:
        parsed = eventlog.parse(event_log)
    except EventLogMalformed as exc:
        return Measurement(pcrs=pcrs, log="malformed", log_note=exc.message, time=now)
    if "sha256" not in parsed.banks:
        note = "the boot event log has no SHA-256 digests, so it cannot match the quote"
        return Measurement(pcrs=pcrs, log="mismatch", log_note=note, time=now)
    replayed = eventlog.replay(parsed)["sha256"]
    differ = [
        i
        for i, value in sorted(quoted.items())
        if not hmac.compare_digest(replayed.get(i, _initial(i)), value)
    ]
    if differ:
        listed = ", ".join(str(i) for i in differ)
        note = (
            f"the boot event log does not replay to the quoted PCRs (PCR {listed} differs): "
            "it is not the log of this boot, so it counts as no log"
        )
        return Measurement(pcrs=pcrs, log="mismatch", log_note=note, time=now)
    return Measurement(
        pcrs=pcrs,
        log="replayed",
        secure_boot=_secure_boot(parsed),
        boot_chain=_boot_chain(parsed),
        cmdlines=_cmdlines(parsed),
        kernel_files=_kernel_files(parsed),
        time=now,
    )


def _initial(index: int) -> bytes:
    """A PCR no event extended: zero (a log that skips PCR 0 cannot explain its
    locality byte, so it does not match a real PCR 0 either)."""
    return ZERO


def _sha256(event: eventlog.Event) -> bytes:
    return dict(event.digests)["sha256"]


def _secure_boot(log: eventlog.EventLog) -> bool | None:
    """The SecureBoot variable as the firmware measured it into PCR 7: one byte, 1 when
    on; empty or 0 when off. None when the log has no such measurement (legacy BIOS or
    old firmware). The firmware hashes the whole UEFI_VARIABLE_DATA, so an event whose
    digest is not its data's is skipped."""
    state: bool | None = None
    for event in log.events:
        if event.pcr != 7 or event.event_type != EV_EFI_VARIABLE_DRIVER_CONFIG:
            continue
        if not hmac.compare_digest(_sha256(event), hashlib.sha256(event.data).digest()):
            continue  # the text is not what was measured: believe nothing of it
        variable = _variable(event.data)
        if variable is None:
            continue
        guid, name, value = variable
        if guid == EFI_GLOBAL_VARIABLE and name == "SecureBoot":
            state = value[:1] == b"\x01"
    return state


def _variable(data: bytes) -> tuple[uuid.UUID, str, bytes] | None:
    """UEFI_VARIABLE_DATA: VariableName GUID, UnicodeNameLength and VariableDataLength
    (UINT64, in characters and bytes), the UTF-16 name, the data."""
    if len(data) < 32:
        return None
    guid = uuid.UUID(bytes_le=data[:16])
    name_chars, value_len = struct.unpack_from("<QQ", data, 16)
    name_end = 32 + 2 * name_chars
    if name_end + value_len != len(data):
        return None
    name = data[32:name_end].decode("utf-16-le", errors="replace").rstrip("\x00")
    return guid, name, data[name_end:]


def _boot_chain(log: eventlog.EventLog) -> tuple[str, ...]:
    """The UEFI applications the firmware started, in order (shim, boot loader, and a
    kernel loaded as one), by their PCR 4 SHA-256 digests."""
    return tuple(
        _sha256(e).hex()
        for e in log.events
        if e.pcr == 4 and e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION
    )


def _cmdlines(log: eventlog.EventLog) -> tuple[str, ...]:
    """grub's ``kernel_cmdline:`` measurements in PCR 8: the kernel path, then its
    arguments. The PCR covers only the digest, never the event's text, so a line is
    believed only when the digest is the text's own (grub hashes the command line
    without the prefix and the NUL): else the text could say anything."""
    lines = []
    for event in log.events:
        if event.pcr != 8 or event.event_type != EV_IPL:
            continue
        if not event.data.startswith(KERNEL_CMDLINE):
            continue
        value = event.data.rstrip(b"\x00")[len(KERNEL_CMDLINE) :]
        if len(value) > MAX_CMDLINE or not hmac.compare_digest(
            _sha256(event), hashlib.sha256(value).digest()
        ):
            continue
        lines.append(value.decode("utf-8", errors="replace"))
    return tuple(lines)


def _kernel_files(log: eventlog.EventLog) -> tuple[str, ...]:
    """Kernel images grub read and measured into PCR 9 (the event names the file; the
    digest is of its contents)."""
    return tuple(
        _sha256(e).hex()
        for e in log.events
        if e.pcr == 9 and e.event_type == EV_IPL and b"vmlinuz" in e.data.rsplit(b"/", 1)[-1]
    )
