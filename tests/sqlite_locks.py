"""Who holds SQLite's lock on a database file, asked of the kernel by another process.

A process never sees its own POSIX locks as conflicting, so a child puts the question:
F_GETLK on SQLite's SHARED byte range names the process holding it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# SQLite's lock bytes (os_unix.c): a SHARED lock is a read lock on these 510 bytes,
# held for as long as a WAL-mode connection is open.
PENDING_BYTE = 0x40000000
SHARED_FIRST, SHARED_SIZE = PENDING_BYTE + 2, 510

LOCK_HOLDER = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, int(sys.argv[2]), int(sys.argv[3]), 0)
kind, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
print("unlocked" if kind == fcntl.F_UNLCK else pid)
"""


def python(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter of this tree, as a dtadmin process would."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def shared_lock_holder(db: Path) -> str:
    """The pid holding a SHARED lock on ``db``, or "unlocked"."""
    return python(LOCK_HOLDER, str(db), str(SHARED_FIRST), str(SHARED_SIZE)).strip()
