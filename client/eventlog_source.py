"""Where this device's boot event log comes from, read once, as the bastion asks for it.

The kernel exports what firmware, shim and the boot loader measured into the TPM as
``/sys/kernel/security/tpm0/binary_bios_measurements`` (DT_EVENT_LOG names another file:
tests, the demo). The file is read once into memory and that copy is what is sent: the
client never parses it (the bastion does, and believes it only if it replays to the
quote), and a file that changes while something reads it twice could otherwise say two
things.

The kernel makes the file readable by root only, so on most machines a user's login
cannot read it until the admin lets the ``tss`` group read it. When it cannot be read,
:func:`read_event_log` says why and how to fix it; the login goes on without it (the
bastion's policy decides what a missing log costs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bastion.protocol.eventlog import MAX_LOG_SIZE

DEFAULT_PATH = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
ENV = "DT_EVENT_LOG"

PERMISSION_FIX = (
    "The kernel lets only root read it. Have the tss group read it at every boot, with a "
    "tmpfiles.d line (/etc/tmpfiles.d/tpm-eventlog.conf):\n"
    "    z /sys/kernel/security/tpm0/binary_bios_measurements 0440 root tss -\n"
    "or a udev rule (/etc/udev/rules.d/70-tpm-eventlog.rules):\n"
    '    SUBSYSTEM=="tpm", KERNEL=="tpm0", ACTION=="add", RUN+="/bin/sh -c \'chgrp tss '
    "/sys/kernel/security/tpm0/binary_bios_measurements && chmod 0440 "
    "/sys/kernel/security/tpm0/binary_bios_measurements'\"\n"
    "then sudo systemd-tmpfiles --create (or sudo udevadm trigger -s tpm), and add yourself "
    "to the tss group (sudo usermod -aG tss $USER, then log in again). See docs/posture.md."
)
MISSING_FIX = (
    "The kernel exports no TPM boot event log here: the firmware is not UEFI with a "
    "TPM 2.0 (or does not hand the log over), or securityfs is not mounted "
    "(sudo mount -t securityfs securityfs /sys/kernel/security)."
)


@dataclass(frozen=True, slots=True)
class EventLogRead:
    """The log's bytes, or ``reason`` (sent to the bastion as event_log_error) and
    ``advice`` (for the person, on stderr)."""

    log: bytes | None
    reason: str | None = None
    advice: str | None = None


def log_path() -> tuple[Path, bool]:
    """The file to read, and whether DT_EVENT_LOG chose it."""
    chosen = os.environ.get(ENV, "").strip()
    return (Path(chosen), True) if chosen else (DEFAULT_PATH, False)


def read_event_log() -> EventLogRead:
    path, chosen = log_path()
    try:
        with path.open("rb") as f:  # securityfs reports size 0: read to the end
            data = f.read(MAX_LOG_SIZE + 1)
    except PermissionError:
        reason = f"permission denied reading {path} (readable by root only)"
        return EventLogRead(
            None, reason, f"cannot read the boot event log {path}. {PERMISSION_FIX}"
        )
    except FileNotFoundError:
        if chosen:
            reason = f"{ENV} names {path}, which does not exist"
            return EventLogRead(None, reason, f"{reason}; unset {ENV} to send this boot's log")
        reason = f"no boot event log at {path}"
        return EventLogRead(None, reason, f"{reason}. {MISSING_FIX}")
    except OSError as exc:
        reason = f"cannot read {path}: {exc.strerror or exc}"
        return EventLogRead(None, reason, f"{reason}; the bastion gets no boot event log")
    if not data:
        reason = f"the boot event log {path} is empty"
        return EventLogRead(None, reason, f"{reason}. {MISSING_FIX}")
    if len(data) > MAX_LOG_SIZE:
        reason = f"the boot event log {path} is larger than {MAX_LOG_SIZE} bytes"
        return EventLogRead(None, reason, f"{reason}; the bastion accepts no more")
    return EventLogRead(bytes(data))
