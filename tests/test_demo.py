"""`make demo` is part of CI: the whole enrollment story must keep working."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36


@pytest.mark.integration
def test_demo_walks_the_story():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "demo passed" in result.stdout
    assert "registered and enrolled" in result.stdout
    # The posture chapter: a changed boot loader costs the device extensions until approved.
    assert "PCR 4 changed since enrollment: boot loader differs" in result.stdout
    assert "is now its baseline (verdict pass)" in result.stdout


def _subreaper(on: bool) -> bool:
    """Orphans of the demo become this process's children, so the test can reap them
    (and tell a stopped server from a zombie nobody waits for)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


@pytest.mark.integration
@pytest.mark.timeout(300)  # the demo's own bound: under load it outlasts the default 120 s
def test_demo_keep_leaves_the_cluster_running_until_stopped(tmp_path):
    """`make demo DEMO_ARGS=--keep`: the printed PIDs are running, in sessions of their
    own, `ssh -F demo-state/ssh_config node-1` gets through, and the printed stop
    command leaves nothing behind."""
    if not _subreaper(True):
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) is not available")
    keep = tmp_path / "demo-state"
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    pids: list[int] = []
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "demo.py"), "--keep", "--dir", str(keep)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        match = re.search(r"run as PIDs ([\d ]+)\.\n", result.stdout)
        assert match, result.stdout[-2000:]
        pids = [int(p) for p in match.group(1).split()]
        assert len(pids) == 3
        assert [int(p) for p in (keep / "demo.pids").read_text().split()] == pids
        for pid in pids:
            # Alive after the demo exited, each the leader of a session of its own.
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), f"PID {pid} has exited"
            assert os.getsid(pid) == pid

        reached = subprocess.run(
            ["ssh", "-F", str(keep / "ssh_config"), "-o", "BatchMode=yes", "node-1", "true"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        assert reached.returncode == 0, reached.stderr

        assert f"Stop them with:  kill {match.group(1)}\n" in result.stdout
        later = re.search(r"or later:  (.+)\n", result.stdout + "\n")
        assert later and "--stop" in later.group(1), result.stdout[-2000:]
        stopped = subprocess.run(
            ["bash", "-c", later.group(1)], capture_output=True, text=True, timeout=60
        )
        assert stopped.returncode == 0, stopped.stderr
        assert f"stopped the kept demo in {keep}" in stopped.stdout
        for pid in pids:
            os.waitpid(pid, 0)  # returns once it exited: nothing is left running
        pids = []
    finally:
        if not pids and (keep / "demo.pids").exists() and not stopped_cleanly(keep):
            # Cut short before the PIDs were read (a timeout): the demo wrote them down
            # as each server started, and --stop finds them there.
            subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "demo.py"), "--stop", "--dir", str(keep)],
                capture_output=True, timeout=60,
            )  # fmt: skip
        for pid in pids:  # a failed assertion above: stop what the demo left
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        _subreaper(False)


def stopped_cleanly(keep) -> bool:
    """Every PID in a kept demo's demo.pids has exited."""
    for pid in (int(p) for p in (keep / "demo.pids").read_text().split()):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


def test_demo_keep_refuses_to_wipe_a_demo_that_still_runs(tmp_path):
    """A second --keep run would delete the state of servers still running from the
    first: it says so and how to stop them instead."""
    keep = tmp_path / "demo-state"
    keep.mkdir()
    # A process whose command line names the folder, as the demo's servers' do.
    running = subprocess.Popen(["sh", "-c", "sleep 60", str(keep)])
    try:
        (keep / "demo.pids").write_text(f"{running.pid}\n")
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "demo.py"), "--keep", "--dir", str(keep)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1
        assert f"still running in {keep} (PIDs {running.pid})" in result.stderr
        assert f"stop it first: kill {running.pid}" in result.stderr
        assert (keep / "demo.pids").exists()
    finally:
        running.kill()
        running.wait()


def test_demo_keep_ignores_stale_pids_of_other_processes(tmp_path):
    """After a reboot demo.pids may name unrelated processes: they do not count."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    assert spec and spec.loader
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    keep = tmp_path / "demo-state"
    keep.mkdir()
    (keep / "demo.pids").write_text(f"{os.getpid()}\n999999999\n")
    demo.refuse_running(keep)  # returns: this test's own process is not the demo's


def test_demo_keep_never_empties_a_folder_it_did_not_make(tmp_path):
    """--keep empties its folder first: a mistyped --dir must not cost the user a folder."""
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--keep", "--dir", str(precious)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "is not a demo folder; --keep would delete it" in result.stderr
    assert (precious / "todo.txt").read_text() == "keep me\n"


@pytest.mark.integration
def test_demo_ha_walks_several_bastions_and_leaves_nothing_running():
    """`make demo DEMO_ARGS=--ha`: PostgreSQL, HAProxy, two bastions on two state
    directories; a lock written on one host cuts the session the other holds, a
    bastion killed with -9 and alice still gets in, its sibling ends the dead one's
    session. The demo checks each step itself; here: it passed, said so, and no
    process it started outlived it (orphans would be reparented to this process)."""
    from tests.haproxy import HAPROXY
    from tests.postgres import available

    if not available() or not Path(HAPROXY).exists():
        pytest.skip("PostgreSQL or HAProxy is not installed (run scripts/setup.sh)")
    before = _children()
    subreaper = _subreaper(True)
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "demo.py"), "--ha"],
            capture_output=True,
            text=True,
            timeout=240,
            env={k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"},
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        out = result.stdout
        assert "demo passed" in out
        assert re.search(r"cut \d+ ms after the lock was committed", out)
        assert "is locked: demo: locked on host-" in out
        assert "killed or crashed); ended on its behalf by bastion" in out
        assert "audit log intact" in out
        if subreaper:  # a server the demo left behind would be our child now
            _reap()
            assert _children() <= before, f"left running: {_children() - before}"
    finally:
        if subreaper:
            _subreaper(False)


def _children() -> set[int]:
    """This process's children that are running (not zombies)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _reap() -> None:
    """Wait for the orphans that have exited (PostgreSQL's postmaster, forked by pg_ctl)."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                return
        except ChildProcessError:
            return


def test_demo_ha_refuses_keep():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--ha", "--keep"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--keep is not supported with --ha" in result.stderr
