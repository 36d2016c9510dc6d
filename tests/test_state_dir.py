"""The cluster state directory as another local user attacks it: modes, owners, links.

`dtadmin init`, `dtadmin users ls` and `dt-bastion serve` as real processes; the
checks they share (``bastion.cluster.check_state_dir``) also in-process, where an
audit hook proves they never open the database file. Changing an owner uses
`nobody` (chown as root); those tests skip cleanly without root.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.cluster import Cluster, check_state_dir, init_cluster
from bastion.protocol.errors import StateError
from tests.sshd import free_port

BIN = Path(sys.executable).parent
NOBODY = 65534


def cli(*args, state: Path):
    proc = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DT_STATE": str(state), "COLUMNS": "200"},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def serve(state: Path):
    """`dt-bastion serve` on a state it must refuse: it exits, never listening."""
    return cli(
        "dt-bastion", "serve", "--state", str(state), "--listen", f"127.0.0.1:{free_port()}",
        state=state,
    )  # fmt: skip


@pytest.fixture
def state(tmp_path):
    path = tmp_path / "state"
    assert cli("dtadmin", "init", "--cluster", "sd", state=path).returncode == 0
    return path


def need_root():
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")


def test_init_refuses_a_directory_others_can_write(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    result = cli("dtadmin", "init", "--cluster", "sd", "--state", str(state), state=state)
    assert result.returncode == 5 and f"run: chmod 700 {state}" in result.stderr
    assert list(state.iterdir()) == []  # no key and no database were written


def test_init_makes_a_new_state_directory_private(tmp_path):
    state = tmp_path / "new" / "state"
    assert cli("dtadmin", "init", "--cluster", "sd", state=state).returncode == 0
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "ca").stat().st_mode) == 0o700
    check_state_dir(state)  # what init made passes the checks of every later open


def test_a_state_directory_opened_up_after_init_is_refused_everywhere(state):
    state.chmod(0o777)
    listed = cli("dtadmin", "users", "ls", state=state)
    assert listed.returncode == 5 and f"run: chmod 700 {state}" in listed.stderr
    served = serve(state)
    assert served.returncode == 5 and f"run: chmod 700 {state}" in served.stderr
    assert "ready" not in served.stdout
    state.chmod(0o700)
    assert cli("dtadmin", "users", "ls", state=state).returncode == 0


@pytest.mark.parametrize(
    ("path", "mode", "fix"),
    [
        ("ca", 0o755, "chmod 700"),
        ("ca/host_ca", 0o640, "chmod 600"),
        ("cluster.db", 0o666, "chmod go-w"),
        ("ca/user_ca.pub", 0o666, "chmod go-w"),
    ],
)
def test_loose_modes_inside_are_refused_naming_the_fix(state, path, mode, fix):
    os.chmod(state / path, mode)
    result = cli("dtadmin", "users", "ls", state=state)
    assert result.returncode == 5 and f"{fix} {state / path}" in result.stderr


def test_a_ca_key_replaced_by_a_link_is_refused(state, tmp_path):
    """Another user's copy of the key, linked in: same key, so no fingerprint check notices."""
    theirs = tmp_path / "theirs"
    shutil.copy2(state / "ca" / "user_ca", theirs)
    (state / "ca" / "user_ca").unlink()
    (state / "ca" / "user_ca").symlink_to(theirs)
    for result in (cli("dtadmin", "users", "ls", state=state), serve(state)):
        assert result.returncode == 5 and "is a symbolic link" in result.stderr
        assert str(state / "ca" / "user_ca") in result.stderr


def test_a_ca_key_owned_by_another_user_is_refused(state):
    need_root()
    os.chown(state / "ca" / "host_ca", NOBODY, NOBODY)
    for result in (cli("dtadmin", "users", "ls", state=state), serve(state)):
        assert result.returncode == 5 and "belongs to nobody" in result.stderr
        assert f"chown root {state / 'ca' / 'host_ca'}" in result.stderr


def test_a_state_directory_another_user_owns_is_refused(state):
    need_root()
    os.chown(state, NOBODY, NOBODY)
    result = cli("dtadmin", "users", "ls", state=state)
    assert result.returncode == 5 and "belongs to nobody" in result.stderr
    assert "sudo -u nobody" in result.stderr and f"chown -R root {state}" in result.stderr


def test_a_parent_others_can_write_is_refused(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    state = parent / "state"
    init_cluster(state, "sd").close()
    parent.chmod(0o777)  # not sticky: anyone could rename the state away and put theirs
    with pytest.raises(StateError, match=f"chmod go-w {parent}"):
        Cluster.open(state)
    parent.chmod(0o1777)  # sticky, like /tmp: only the owner may rename
    Cluster.open(state).close()


def test_the_checks_never_open_the_database_file(tmp_path):
    """A process holding SQLite connections must not open (and close) cluster.db."""
    cluster = init_cluster(tmp_path / "state", "sd")
    opened: list[str] = []
    watching = [True]

    def hook(event, args):
        if watching[0] and event == "open":
            opened.append(str(args[0]))

    sys.addaudithook(hook)
    try:
        check_state_dir(cluster.state_dir)
        second = Cluster.open(cluster.state_dir)  # as dt-bastion's issuer does
        watching[0] = False
        second.close()
    finally:
        watching[0] = False
        cluster.close()
    assert not [p for p in opened if os.path.basename(p).startswith("cluster.db")], opened
