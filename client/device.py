"""What a Linux device reports about itself, and the asset tag it enrolls under.

The asset tag is the DMI system serial where it is readable and meaningful, else the
board serial, else ``tpm-`` + 16 hex digits of sha256(EK public key DER). It is only
a name: the device's identity that counts is its EK, checked by the bastion.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import socket
from pathlib import Path
from typing import Any

DMI = Path("/sys/class/dmi/id")
TAG_RE = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")
# Placeholders firmware vendors leave in DMI fields; none of them names a machine.
MEANINGLESS = {
    "",
    "to be filled by o.e.m.",
    "default string",
    "system serial number",
    "not specified",
    "not applicable",
    "none",
    "0",
    "00000000",
    "0123456789",
    "123456789",
    "serial",
    "chassis serial number",
    "base board serial number",
}


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def meaningful_serial(value: str | None) -> str | None:
    """A DMI serial fit to be an asset tag, or None."""
    if value is None:
        return None
    value = value.strip()
    if value.lower() in MEANINGLESS or set(value) <= {"0", " ", "-", "."}:
        return None
    return value if TAG_RE.fullmatch(value) else None


def tpm_asset_tag(ek_public_der: bytes) -> str:
    return "tpm-" + hashlib.sha256(ek_public_der).hexdigest()[:16]


def asset_tag(ek_public_der: bytes | None, dmi: Path = DMI) -> str:
    for name in ("product_serial", "board_serial"):
        serial = meaningful_serial(_read(dmi / name))
        if serial:
            return serial
    if ek_public_der is None:
        raise ValueError("no DMI serial and no EK to derive an asset tag from")
    return tpm_asset_tag(ek_public_der)


def _os_release() -> dict[str, str]:
    out = {}
    for line in (_read(Path("/etc/os-release")) or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value.strip().strip('"')
    return out


def collect(ek_public_der: bytes | None, *, tag_override: str | None = None) -> dict[str, Any]:
    """The device data sent at enrollment (and shown by `dtclient device collect`)."""
    release = _os_release()
    data: dict[str, Any] = {
        "os_type": "linux",
        "os_version": release.get("PRETTY_NAME") or platform.platform(),
        "kernel": platform.release(),
        "hostname": socket.gethostname(),
        "machine_id": _read(Path("/etc/machine-id")) or "",
        "system_serial": meaningful_serial(_read(DMI / "product_serial")) or "",
        "board_serial": meaningful_serial(_read(DMI / "board_serial")) or "",
        "ek_pub_hash": hashlib.sha256(ek_public_der).hexdigest() if ek_public_der else "",
        "asset_tag": tag_override or os.environ.get("DT_ASSET_TAG") or asset_tag(ek_public_der),
    }
    return {k: v for k, v in data.items() if isinstance(v, str)}
