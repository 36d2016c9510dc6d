"""Boot event logs for tests: made up small and exact, and replayed into a running swtpm.

A real device's PCRs are what its firmware, shim and grub extended while it booted, and
its event log says so. A fresh swtpm has every PCR at zero; :func:`replay_into_tpm`
extends each SHA-256 digest of a log into it (EV_NO_ACTION events are never extended,
as the TPM never saw them), so the swtpm's quote and the log agree as they do on a
machine that booted that way. :func:`reboot` resets the swtpm's PCRs (a power cycle of
the same TPM, keys kept) for a device that boots again, differently.

:class:`SyntheticBoot` writes a small crypto-agile log (SHA-256 only, the bank
tests/swtpm.py provisions) with the events posture reads, each digest the one firmware
would compute: the Spec ID header; the SecureBoot variable (on or off) and a separator
in PCR 7; shim, grub and the kernel as EV_EFI_BOOT_SERVICES_APPLICATION in PCR 4; grub's
``kernel_cmdline: ...`` in PCR 8 and the kernel file in PCR 9. ``events()`` is a list a
test may change one item of (:func:`with_event`) before :func:`encode_log`: a lie told
with a digest that no longer matches, or a consistent other boot.

Nothing here imports the product (the deployed tier uses it too): the little reader
below is its own, so a test's log is checked by two parsers, not one. It needs
tpm2-pytss for the TPM.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_S_CRTM_VERSION = 0x00000008
EV_IPL = 0x0000000D
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
SHA1, SHA256 = 0x0004, 0x000B
DIGEST_SIZES = {0x0004: 20, 0x000B: 32, 0x000C: 48, 0x000D: 64}
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
SHIPPED = Path(__file__).resolve().parents[2] / "shared" / "eventlogs"
NO_SECURE_BOOT_LOGS = (
    "ubuntu_2104_shielded_vm_no_secure_boot_eventlog.bin",
    "coreos_36_shielded_vm_no_secure_boot_eventlog.bin",
)


# -- reading (SHA-256 digests only) -------------------------------------------------------------


@dataclass(frozen=True)
class LogEvent:
    pcr: int
    event_type: int
    sha256: bytes | None  # None in a log without a SHA-256 bank
    data: bytes


def read_events(log: bytes) -> list[LogEvent]:
    """Every event after a crypto-agile log's Spec ID header, with its SHA-256 digest."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(log):
            raise ValueError(f"event log cut short at byte {pos}")
        out = log[pos : pos + n]
        pos += n
        return out

    def u32() -> int:
        return int(struct.unpack("<I", take(4))[0])

    pcr, event_type = u32(), u32()
    take(20)
    header = take(u32())
    if event_type != EV_NO_ACTION or not header.startswith(b"Spec ID Event03\0") or pcr != 0:
        raise ValueError("not a crypto-agile event log (no Spec ID header)")
    (count,) = struct.unpack_from("<I", header, 24)
    sizes = dict(struct.unpack_from("<HH", header, 28 + 4 * i) for i in range(count))
    events = []
    while pos < len(log):
        pcr, event_type = u32(), u32()
        digests = {}
        for _ in range(u32()):
            (alg,) = struct.unpack("<H", take(2))
            digests[alg] = take(sizes[alg])
        events.append(LogEvent(pcr, event_type, digests.get(SHA256), take(u32())))
    return events


def startup_locality(events: list[LogEvent]) -> int:
    for e in events:
        if e.pcr == 0 and e.event_type == EV_NO_ACTION and e.data.startswith(b"StartupLocality\0"):
            return e.data[-1]
    return 0


def expected_pcrs(log: bytes) -> dict[int, bytes]:
    """What the SHA-256 PCRs read after the log's boot (only those it extends)."""
    events = read_events(log)
    pcrs: dict[int, bytes] = {}
    for e in events:
        if e.event_type == EV_NO_ACTION or e.sha256 is None:
            continue
        old = pcrs.get(e.pcr, bytes(32))
        if e.pcr == 0 and e.pcr not in pcrs:
            old = bytes(31) + bytes([startup_locality(events)])
        pcrs[e.pcr] = hashlib.sha256(old + e.sha256).digest()
    return pcrs


# -- the TPM --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _esapi(tcti: str) -> Iterator[object]:
    from tpm2_pytss import ESAPI

    esapi = ESAPI(tcti)
    try:
        yield esapi
    finally:
        esapi.close()


def replay_into_tpm(tcti: str, log: bytes) -> dict[int, bytes]:
    """Extend every SHA-256 digest of ``log`` into the (freshly started or rebooted)
    TPM at ``tcti``, skipping EV_NO_ACTION; returns the PCRs it reads afterwards, which
    must be the log's own replay."""
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    events = read_events(log)
    if startup_locality(events):
        raise ValueError("this log's PCR 0 starts at a locality swtpm's startup does not give")
    with _esapi(tcti) as esapi:
        for e in events:
            if e.event_type == EV_NO_ACTION:
                continue
            if e.sha256 is None:
                raise ValueError("the log has no SHA-256 digests to replay into the TPM")
            digest = TPML_DIGEST_VALUES(
                [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=e.sha256))]
            )
            esapi.pcr_extend(ESYS_TR.PCR0 + e.pcr, digest)  # type: ignore[attr-defined]
        got = read_pcrs(tcti, sorted({e.pcr for e in events}))
    want = expected_pcrs(log)
    if {i: got[i] for i in want} != want:
        raise AssertionError("the TPM's PCRs are not the log's replay")
    return got


def read_pcrs(tcti: str, pcrs: list[int]) -> dict[int, bytes]:
    from tpm2_pytss.types import TPML_PCR_SELECTION

    out = {}
    with _esapi(tcti) as esapi:
        for pcr in pcrs:
            _, _, digests = esapi.pcr_read(  # type: ignore[attr-defined]
                TPML_PCR_SELECTION.parse(f"sha256:{pcr}")
            )
            out[pcr] = bytes(digests.digests[0])
    return out


def reboot(tcti: str) -> None:
    """Power-cycle the swtpm at ``tcti`` (swtpm_ioctl --init on its control port, then
    TPM2_Startup(CLEAR)): PCRs back to zero, keys and NV kept, as after a reboot."""
    from tpm2_pytss.constants import TPM2_SU

    params = dict(p.split("=", 1) for p in tcti.split(":", 1)[1].split(","))
    ctrl = f"{params.get('host', '127.0.0.1')}:{int(params['port']) + 1}"
    subprocess.run(
        ["swtpm_ioctl", "--tcp", ctrl, "-i"], check=True, capture_output=True, timeout=10
    )
    with _esapi(tcti) as esapi:
        esapi.startup(TPM2_SU.CLEAR)  # type: ignore[attr-defined]


# -- writing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthEvent:
    """One event; ``digest`` None: the digest firmware computes for ``data``."""

    pcr: int
    event_type: int
    data: bytes
    digest: bytes | None = None
    measured: bytes | None = None  # what was hashed, when not ``data`` (images, lines)

    @property
    def sha256(self) -> bytes:
        if self.digest is not None:
            return self.digest
        return hashlib.sha256(self.data if self.measured is None else self.measured).digest()


def spec_id_header() -> bytes:
    """The first event: TCG_EfiSpecIDEvent in the SHA-1 event format, SHA-256 only."""
    spec = (
        b"Spec ID Event03\0"
        + struct.pack("<IBBBB", 0, 0, 2, 0, 2)  # platform class; version 2.0 errata 0; UINTN
        + struct.pack("<I", 1)
        + struct.pack("<HH", SHA256, 32)
        + b"\0"  # no vendor info
    )
    return struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec)) + spec


def encode_event(event: SynthEvent) -> bytes:
    return (
        struct.pack("<IIIH", event.pcr, event.event_type, 1, SHA256)
        + event.sha256
        + struct.pack("<I", len(event.data))
        + event.data
    )


def encode_log(events: list[SynthEvent]) -> bytes:
    return spec_id_header() + b"".join(encode_event(e) for e in events)


def variable_data(guid: uuid.UUID, name: str, value: bytes) -> bytes:
    """UEFI_VARIABLE_DATA, which firmware measures whole."""
    encoded = name.encode("utf-16-le")
    return guid.bytes_le + struct.pack("<QQ", len(name), len(value)) + encoded + value


def image_load_event(path: str) -> bytes:
    """UEFI_IMAGE_LOAD_EVENT with a small device path (the digest is the image's)."""
    device_path = path.encode("utf-16-le") + b"\0\0"
    return struct.pack("<QQQQ", 0x7E000000, 0x100000, 0, len(device_path)) + device_path


def with_event(events: list[SynthEvent], index: int, **changes: object) -> list[SynthEvent]:
    """``events`` with one of them changed (``digest=`` to lie, ``data=`` to retell)."""
    out = list(events)
    out[index] = replace(out[index], **changes)  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class SyntheticBoot:
    """A small UEFI boot: firmware, Secure Boot state, shim -> grub -> kernel, cmdline."""

    secure_boot: bool = True
    firmware: bytes = b"dt-test firmware 1.0"
    shim: bytes = b"shimx64.efi 15.8"
    bootloader: bytes = b"grubx64.efi 2.12"
    kernel: bytes = b"vmlinuz-6.1.0-18-amd64"
    cmdline: str = "/boot/vmlinuz-6.1.0-18-amd64 root=/dev/vda1 ro quiet"
    extra: tuple[SynthEvent, ...] = field(default=())

    def digest(self, part: str) -> str:
        """The SHA-256 a policy's boot chain names for ``part`` (shim, bootloader, kernel)."""
        return hashlib.sha256(getattr(self, part)).hexdigest()

    def events(self) -> list[SynthEvent]:
        separator = b"\0\0\0\0"
        sb = b"\x01" if self.secure_boot else b"\x00"
        out = [
            SynthEvent(0, EV_S_CRTM_VERSION, "1.0".encode("utf-16-le") + b"\0\0"),
            SynthEvent(
                0,
                EV_EFI_PLATFORM_FIRMWARE_BLOB,
                struct.pack("<QQ", 0xFFC00000, 0x400000),
                measured=self.firmware,
            ),  # fmt: skip
            SynthEvent(
                7,
                EV_EFI_VARIABLE_DRIVER_CONFIG,
                variable_data(EFI_GLOBAL_VARIABLE, "SecureBoot", sb),
            ),  # fmt: skip
            SynthEvent(
                7,
                EV_EFI_VARIABLE_DRIVER_CONFIG,
                variable_data(EFI_IMAGE_SECURITY_DATABASE, "db", b"dt-test db"),
            ),  # fmt: skip
        ]
        out += [SynthEvent(pcr, EV_SEPARATOR, separator) for pcr in range(8)]
        out += [
            SynthEvent(4, EV_EFI_ACTION, b"Calling EFI Application from Boot Option"),
            SynthEvent(
                4,
                EV_EFI_BOOT_SERVICES_APPLICATION,
                image_load_event("\\EFI\\debian\\shimx64.efi"),
                measured=self.shim,
            ),  # fmt: skip
            SynthEvent(
                4,
                EV_EFI_BOOT_SERVICES_APPLICATION,
                image_load_event("\\EFI\\debian\\grubx64.efi"),
                measured=self.bootloader,
            ),  # fmt: skip
            SynthEvent(
                4,
                EV_EFI_BOOT_SERVICES_APPLICATION,
                image_load_event("\\vmlinuz"),
                measured=self.kernel,
            ),  # fmt: skip
        ]
        kernel_path = self.cmdline.split(" ", 1)[0]
        line = self.cmdline.encode()
        out += [
            SynthEvent(
                8, EV_IPL, b"grub_cmd: linux " + line + b"\0", measured=b"linux " + line
            ),  # fmt: skip
            SynthEvent(8, EV_IPL, b"kernel_cmdline: " + line + b"\0", measured=line),
            SynthEvent(9, EV_IPL, kernel_path.encode() + b"\0", measured=self.kernel),
        ]
        return out + list(self.extra)

    def log(self) -> bytes:
        return encode_log(self.events())

    def index(self, event_type: int, pcr: int, nth: int = 0) -> int:
        """Where the ``nth`` event of this type in ``pcr`` is in :meth:`events`."""
        found = [
            i for i, e in enumerate(self.events()) if e.event_type == event_type and e.pcr == pcr
        ]
        return found[nth]


def shipped(name: str) -> bytes:
    """One of the real firmware logs in ../shared/eventlogs."""
    return (SHIPPED / name).read_bytes()
