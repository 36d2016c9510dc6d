"""Files that another local user cannot redirect, in directories only their owner can write.

Whoever can write a directory can plant a symbolic link where a program is about to
write (a fresh private key then lands in a file of theirs), or swap a file it reads
(a CA key, a host CA to trust). Both programs therefore:

- write every file under a fresh, unpredictable temporary name opened with
  ``O_CREAT|O_EXCL|O_NOFOLLOW`` (a name already there, or a link, fails the open
  instead of being followed), fsync it, and rename it over the final name (a rename
  replaces a link; it never writes through it);
- keep their files in a directory that belongs to them and that nobody else can
  write, whose ancestors only they or root can write (or that are sticky, like /tmp).

The checks use ``os.lstat`` only: they never open what they look at, so they are safe
in a process that holds SQLite connections to a file in the directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import stat
from pathlib import Path

from bastion.protocol.errors import StateError

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole or not at all, never through a link planted in its place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, _CREATE, mode & 0o777)
    try:
        try:
            os.fchmod(fd, mode & 0o777)  # exactly ``mode``, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; a file system that cannot fsync a directory is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- who can write a directory --------------------------------------------------------------


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def mode_text(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def check_ancestors(path: Path, what: str) -> None:
    """Refuse a path whose existing parents someone other than us or root could change.

    A writable parent lets another user rename our directory away and put theirs in
    its place. A sticky directory (/tmp) is fine: there only an entry's owner may
    rename it.
    """
    me = os.geteuid()
    for parent in Path(path).parents:
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            continue
        if st.st_uid not in (0, me):
            raise StateError(
                f"{what} {path} is inside {parent}, which belongs to {user_name(st.st_uid)}: "
                f"they could replace it. Use a directory under one that only you or root "
                f"own, or run: chown {user_name(me)} {parent}"
            )
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise StateError(
                f"{what} {path} is inside {parent}, which group or others can write "
                f"(mode {mode_text(st)}): they could replace it. Run: chmod go-w {parent}"
            )


def check_own_dir(path: Path, what: str, *, private: bool = False) -> None:
    """Refuse a directory that is a link, another user's, or writable by others.

    ``private`` also refuses any access by group or others (mode 0700), for the
    directory that holds private keys.
    """
    me = os.geteuid()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise StateError(
            f"{what} {path} is a symbolic link; it must be a real directory "
            f"(remove the link: rm {path})"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{what} {path} is not a directory")
    if st.st_uid != me:
        owner = user_name(st.st_uid)
        raise StateError(
            f"{what} {path} belongs to {owner}, not to you ({user_name(me)}): run as "
            f"{owner} (sudo -u {owner} ...), or take it over: chown -R {user_name(me)} {path}"
        )
    if private and st.st_mode & 0o077:
        raise StateError(
            f"{what} {path} holds private keys but group or others can open it (mode "
            f"{mode_text(st)}); run: chmod 700 {path}"
        )
    if st.st_mode & 0o022:
        raise StateError(
            f"{what} {path} can be written by group or others (mode {mode_text(st)}), so "
            f"another local user could plant or replace files in it; run: chmod 700 {path}"
        )


def private_dir(path: Path, what: str) -> Path:
    """``path`` as a checked directory of ours, made (with its missing parents) mode 0700.

    Returns the resolved path, which later steps should use so that no link in the
    name is followed again.
    """
    path = Path(os.path.realpath(path))
    check_ancestors(path, what)
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile: checked below
            os.mkdir(directory, 0o700)
            os.chmod(directory, 0o700)
        check_own_dir(directory, what)
    check_own_dir(path, what)
    return path
