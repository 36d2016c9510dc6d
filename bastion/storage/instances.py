"""Which bastion processes sharing a state directory are alive.

Every running bastion holds an exclusive ``flock`` on ``run/<instance>.lock`` in the
state directory for as long as it lives. The kernel drops a flock when its process
dies, however it dies (``kill -9`` included), so "can I take that lock?" is an exact
liveness test for a process on this host: no PIDs (which are reused) and no heartbeats
(which need clocks and a timeout someone has to pick).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from bastion.protocol.errors import StateError

RUN_DIR = "run"
_NAME = re.compile(r"^[0-9a-f]{12}$")


def run_dir(state_dir: Path) -> Path:
    return state_dir / RUN_DIR


class InstanceLock:
    """This process's claim to be alive, held until ``release`` or death."""

    def __init__(self, state_dir: Path, path: Path, fd: int) -> None:
        self.state_dir = state_dir
        self.path = path
        self.name = path.stem
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> InstanceLock:
        directory = run_dir(state_dir)
        try:
            directory.mkdir(mode=0o700, exist_ok=True)
            while True:
                path = directory / f"{secrets.token_hex(6)}.lock"
                fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
                # Blocking: a sweeper may hold it for a moment, believing a fresh,
                # not yet locked file to be a dead bastion's; it then unlinks it.
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if os.fstat(fd).st_ino == os.stat(path).st_ino:
                        return cls(state_dir, path, fd)
                except FileNotFoundError:
                    pass
                os.close(fd)  # swept away under us: take another name
        except OSError as exc:
            raise StateError(
                f"cannot record this bastion as running in {directory}: {exc.strerror}"
            ) from exc

    def release(self) -> None:
        if self._fd is None:
            return
        # A read-only disk must not turn a clean stop into a crash: the file left
        # behind is unlocked once we exit, and a later sweep removes it.
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def _probe(state_dir: Path, name: str) -> tuple[bool, int | None]:
    """(dead, fd): whether no live process holds instance ``name``'s lock, and, if we
    took that lock to find out, the descriptor holding it (the caller closes it)."""
    if not _NAME.match(name):
        return True, None  # no bastion ever had this name; nothing can be holding it
    try:
        fd = os.open(run_dir(state_dir) / f"{name}.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True, None  # a bastion creates its lock first and removes it last
    except OSError:
        return False, None  # cannot tell: assume alive, and look again later
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # flock needs no write access
    except OSError:  # held (EWOULDBLOCK), or cannot tell (ENOLCK): alive
        os.close(fd)
        return False, None
    return True, fd


@contextlib.contextmanager
def claim_if_dead(state_dir: Path, name: str) -> Iterator[bool]:
    """Yield True, holding its lock, if no live process holds instance ``name``.

    The lock file is removed only if the body finishes, so a sweep that fails (the
    database is busy) is simply tried again later.
    """
    dead, fd = _probe(state_dir, name)
    if fd is None:
        yield dead
        return
    try:
        yield True
        with contextlib.suppress(OSError):  # a read-only disk: the next sweep retries
            (run_dir(state_dir) / f"{name}.lock").unlink()
    finally:
        os.close(fd)


def is_alive(state_dir: Path, name: str) -> bool:
    """Whether a process holds instance ``name``'s lock; changes nothing."""
    dead, fd = _probe(state_dir, name)
    if fd is not None:
        os.close(fd)  # drops the lock we took to find out
    return not dead


def stale_names(state_dir: Path, alive: str) -> list[str]:
    """Names of lock files in the run directory other than ``alive``."""
    directory = run_dir(state_dir)
    try:
        names = [p.stem for p in directory.glob("*.lock")]
    except OSError:
        return []
    return [n for n in names if n != alive and _NAME.match(n)]
