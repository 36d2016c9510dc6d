"""`dtclient ssh` finds the destination in an ssh command line as OpenSSH's getopt does."""

from __future__ import annotations

import pytest

from bastion.protocol.errors import UsageError
from client.ssh_args import parse


@pytest.mark.parametrize(
    ("argv", "index", "login", "host"),
    [
        (["root@node-1"], 0, "root", "node-1"),
        (["node-1"], 0, None, "node-1"),
        (["-v", "root@node-1", "uptime"], 1, "root", "node-1"),
        (["-vvA", "node-1"], 1, None, "node-1"),
        (["-p", "2222", "node-1"], 2, None, "node-1"),
        (["-p2222", "-l", "admin", "node-1", "ls", "-la"], 3, "admin", "node-1"),
        (["-o", "User=ops", "node-1"], 2, "ops", "node-1"),
        (["-oUser ops", "node-1"], 1, "ops", "node-1"),
        (["-L", "8080:localhost:80", "-N", "node-1"], 3, None, "node-1"),
        (["-v", "--", "root@node-1", "-l", "x"], 2, "root", "node-1"),
        (["node-1", "-l", "late"], 0, "late", "node-1"),
        (["ssh://ops@node-1:22"], 0, "ops", "node-1"),
        (["-i", "key", "-J", "other", "a@b@node-1"], 4, "a@b", "node-1"),
    ],
)
def test_destination(argv: list[str], index: int, login: str | None, host: str):
    command = parse(argv)
    assert (command.index, command.login, command.host) == (index, login, host)
    assert command.argv == tuple(argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give a destination"),
        (["-v"], "give a destination"),
        (["-p"], "-p needs a value"),
        (["-Z", "node-1"], "unknown ssh option -Z"),
        (["root@"], "no host"),
        # After `--` every word is the destination or the command, as for ssh.
        (["--", "-v", "root@node-1"], "destination '-v' starts with '-'"),
    ],
)
def test_refused(argv: list[str], message: str):
    with pytest.raises(UsageError, match=message):
        parse(argv)
