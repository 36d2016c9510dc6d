"""Reading an ``ssh`` command line as OpenSSH does, to find its destination.

``dtclient ssh [SSH OPTIONS] [LOGIN@]NODE [COMMAND...]`` hands everything to the system
ssh unchanged; dtclient only needs to know which word is the destination (to write
its config block and pick a default login). OpenSSH reads options with getopt: a
letter from ``ARG_FLAGS`` takes the rest of its word or the next word as its value,
flags may be bundled (``-vvA``), ``--`` ends the options, and after the destination
it reads options once more until the first word that is not one (``ssh node -v ls``).
"""

from __future__ import annotations

from dataclasses import dataclass

from bastion.protocol.errors import UsageError

# OpenSSH 9.x ssh(1): getopt "1246ab:c:e:fgi:kl:m:no:p:qstvxAB:CD:E:F:GI:J:KL:MNO:P:Q:R:S:TVw:W:XYy"
ARG_FLAGS = frozenset("bceilmopBDEFIJLOPQRSwW")
NO_ARG_FLAGS = frozenset("1246afgknqstvxACGKMNTVXYy")


@dataclass(frozen=True, slots=True)
class SshCommand:
    argv: tuple[str, ...]  # what the user typed after `dtclient ssh`
    index: int  # where the destination is in argv
    login: str | None  # from LOGIN@, ssh://LOGIN@, -l or -o User=
    host: str  # the destination's host part

    @property
    def destination(self) -> str:
        return self.argv[self.index]


def _options(argv: list[str], i: int, found: dict[str, str]) -> tuple[int, bool]:
    """Read options from argv[i:] as getopt does; the index after them, and whether
    ``--`` ended them."""
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return i + 1, True
        if not word.startswith("-") or word == "-":
            return i, False
        j = 1
        while j < len(word):
            flag = word[j]
            if flag in ARG_FLAGS:
                value = word[j + 1 :]
                if not value:
                    i += 1
                    if i >= len(argv):
                        raise UsageError(f"ssh option -{flag} needs a value")
                    value = argv[i]
                _note(flag, value, found)
                break
            if flag not in NO_ARG_FLAGS:
                raise UsageError(f"unknown ssh option -{flag} (see man ssh)")
            j += 1
        i += 1
    return i, False


def _note(flag: str, value: str, found: dict[str, str]) -> None:
    if flag == "l":
        found["login"] = value
    elif flag == "o":
        key, _, rest = value.replace("=", " ", 1).partition(" ")
        if key.lower() == "user" and rest.strip():
            found.setdefault("user_option", rest.strip())


def split_destination(dest: str) -> tuple[str | None, str]:
    """LOGIN and HOST of ``[LOGIN@]HOST`` or ``ssh://[LOGIN@]HOST[:PORT]``."""
    if dest.startswith("ssh://"):
        rest = dest[len("ssh://") :].rstrip("/")
        login, _, host = rest.rpartition("@")
        if host.startswith("["):
            host = host[1:].partition("]")[0]
        else:
            host = host.partition(":")[0]
        return login or None, host
    login, _, host = dest.rpartition("@")
    return login or None, host


def parse(argv: list[str]) -> SshCommand:
    """The destination of an ssh command line, or UsageError when there is none."""
    found: dict[str, str] = {}
    i, _ = _options(argv, 0, found)
    if i >= len(argv):
        raise UsageError("give a destination: dtclient ssh [SSH OPTIONS] [LOGIN@]NODE [COMMAND]")
    index = i
    if argv[index].startswith("-"):
        raise UsageError(f"destination {argv[index]!r} starts with '-'; put ssh's options first")
    login, host = split_destination(argv[index])
    if not host:
        raise UsageError(f"no host in destination {argv[index]!r}")
    # ssh reads options after the destination too, unless `--` came before it.
    if not (index > 0 and argv[index - 1] == "--"):
        _options(argv, index + 1, found)
    login = login or found.get("login") or found.get("user_option")
    return SshCommand(tuple(argv), index, login, host)
