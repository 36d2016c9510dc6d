"""Small file systems under a test's temp dir, for full and read-only disk faults.

Mounting needs root; without it (or without mount) the test is skipped, not failed.
Everything is unmounted in teardown.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting file systems needs root")


def umount(mount: Path) -> None:
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@contextlib.contextmanager
def tmpfs(mount: Path, size: str = "16m") -> Iterator[Path]:
    need_root()
    mount.mkdir(parents=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)]
    if subprocess.run(cmd, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        umount(mount)


def fill(mount: Path) -> Path:
    """Write zeros until the file system is full; returns the file to delete."""
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    return filler
