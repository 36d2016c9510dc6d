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
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
KERNEL_CMDLINE = b"kernel_cmdline: "
ZERO = bytes(32)
# EV_SEPARATOR's data is 0 (or 0xFFFFFFFF after an error), as a UINT32: its digest,
# not its type (the client's word), says which event it is.
SEPARATOR_DIGESTS = frozenset(hashlib.sha256(v).digest() for v in (bytes(4), b"\xff" * 4))
MAX_CMDLINE = 4096
# Boot images, command lines and kernel files kept per measurement (stored, shown,
# audited): a real boot has a handful. The first are the firmware's and grub's own, in
# the TPM's order; anything root on the device extends after boot comes later, so what
# is cut is never what booted, and what is kept still fails a policy it breaks.
MAX_KEPT = 32
LINUX_COMMANDS = (b"linux", b"linuxefi", b"linux16")


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
        boot_chain=_boot_chain(parsed)[:MAX_KEPT],
        cmdlines=_cmdlines(parsed)[:MAX_KEPT],
        kernel_files=_kernel_files(parsed)[:MAX_KEPT],
        time=now,
    )


def _initial(index: int) -> bytes:
    """A PCR no event extended: zero (a log that skips PCR 0 cannot explain its
    locality byte, so it does not match a real PCR 0 either)."""
    return ZERO


def _sha256(event: eventlog.Event) -> bytes:
    return dict(event.digests)["sha256"]


def _self_evident(event: eventlog.Event) -> bool:
    """The event's digest is its data's own hash: its text is what was measured. Of any
    other event only the digest is the TPM's; its type and data are the client's word."""
    return hmac.compare_digest(_sha256(event), hashlib.sha256(event.data).digest())


def _secure_boot(log: eventlog.EventLog) -> bool | None:
    """The SecureBoot variable as the firmware measured it into PCR 7: one byte, 1 when
    on; empty or 0 when off. None when the log has no such measurement (legacy BIOS or
    old firmware).

    Only the firmware's counts: the first SecureBoot UEFI_VARIABLE_DATA (hashed whole,
    so its text is believed, whatever type the log gives it) before PCR 7's separator,
    known by its digest, not by its type. The running OS can extend PCR 7 too, but only
    after that separator (the replay fixes each PCR's order); and a firmware event whose
    text was replaced hides nothing: with no believable SecureBoot event before the
    separator the answer is None."""
    state: bool | None = None
    for event in log.events:
        if event.pcr != 7 or event.event_type == eventlog.EV_NO_ACTION:
            continue
        if _sha256(event) in SEPARATOR_DIGESTS:
            return state
        if state is not None or not _self_evident(event):
            continue
        variable = _variable(event.data)
        if variable is None:
            continue
        guid, name, value = variable
        if guid == EFI_GLOBAL_VARIABLE and name == "SecureBoot":
            state = value[:1] == b"\x01"
    return None


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
    kernel loaded as one), by their PCR 4 SHA-256 digests. Every PCR 4 extend whose
    digest is not its own text's hash (the firmware's actions and separator are) is
    an image, whatever type the log gives it: an evil grub told as an EV_EFI_ACTION
    keeps its place in the chain."""
    return tuple(
        _sha256(e).hex()
        for e in log.events
        if e.pcr == 4 and e.event_type != eventlog.EV_NO_ACTION and not _self_evident(e)
    )


def _cmdlines(log: eventlog.EventLog) -> tuple[str, ...]:
    """grub's ``kernel_cmdline:`` measurements in PCR 8: the kernel path, then its
    arguments. The PCR covers only the digest, never the event's text, so a line is
    believed only when the digest is the text's own (grub hashes what follows the
    ``prefix: `` without the NUL), whatever type or prefix the log gives it: the line
    of a ``linux`` command counts as much as a ``kernel_cmdline:`` one. And grub explains
    every PCR 8 extend so: one that is not explained may be the real command line told
    as something else, so then no line is believed at all (a kernel_cmdline policy
    fails: none measured)."""
    lines = []
    for event in log.events:
        if event.pcr != 8 or event.event_type == eventlog.EV_NO_ACTION:
            continue
        text = event.data.rstrip(b"\x00")
        prefix, sep, value = text.partition(b": ")
        if not sep or not hmac.compare_digest(_sha256(event), hashlib.sha256(value).digest()):
            return ()
        if prefix + sep != KERNEL_CMDLINE:
            # grub's own ``linux PATH ARGS`` command: its text is bound by the digest
            # even where the log's prefix is not, so it is read as a command line too.
            word, _, rest = value.partition(b" ")
            if word not in LINUX_COMMANDS:
                continue
            value = rest
        if len(value) > MAX_CMDLINE:
            return ()  # skipped, it would hide what it says behind the lines after it
        lines.append(value.decode("utf-8", errors="replace"))
    return tuple(dict.fromkeys(lines))  # grub's linux command and its kernel_cmdline: once


def _kernel_files(log: eventlog.EventLog) -> tuple[str, ...]:
    """Kernel images grub read and measured into PCR 9 (the event names the file; the
    digest is of its contents)."""
    return tuple(
        _sha256(e).hex()
        for e in log.events
        if e.pcr == 9 and e.event_type == EV_IPL and b"vmlinuz" in e.data.rsplit(b"/", 1)[-1]
    )
