"""Checklist #26: a bastion killed mid-session still gets its sessions ended in the audit.

A SIGTERM is handled in tests/test_bastion_robustness.py. Here the bastion is killed
with SIGKILL, so it writes nothing: the sessions it held must be ended, audited as
such, by the next bastion to start on the state directory or by a sibling already
serving it, and never while the bastion that holds them is alive.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from contextlib import ExitStack

import pytest

from bastion.proxy import instances
from tests.sshd import VENV_BIN, bastion_server, held_session, wait

pytestmark = pytest.mark.integration




def _started(store, user):
    return [e for e in store.list_audit(type="session.start") if e.user == user]


def _ended(store, user):
    return [e for e in store.list_audit(type="session.end") if e.user == user]


def _sessions_ls(cluster):
    """What `dtadmin sessions ls --format json` shows an admin."""
    proc = subprocess.run(
        [VENV_BIN / "dtadmin", "--state", str(cluster.state_dir), "sessions", "ls"]
        + ["--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return {(d["user"], d["state"]) for d in json.loads(proc.stdout)}


def _kill9(bastion):
    bastion.proc.send_signal(signal.SIGKILL)
    bastion.proc.wait(10)



def test_the_next_bastion_ends_what_a_killed_one_left_open(dt_cluster, dt_node, tmp_path, clients):
    store = dt_cluster.store
    with bastion_server(dt_cluster.state_dir) as first:
        clients.append(held_session(dt_cluster, tmp_path, "alice", first.port))
        start = wait(lambda: _started(store, "alice"), "session.start")[0]
        [row] = store.list_open_sessions()
        assert (row.user, row.node, row.session_id) == (
            "alice",
            "node-1",
            start.fields["session_id"],
        )
        assert row.instance == start.fields["bastion"]
        assert _sessions_ls(dt_cluster) == {("alice", "live")}
        _kill9(first)
        # The kernel closes the client's connection, but nothing was written.
        assert clients[0].wait(30) != 0
        assert _ended(store, "alice") == []
        assert len(store.list_open_sessions()) == 1
        lock = instances.run_dir(dt_cluster.state_dir) / f"{row.instance}.lock"
        assert lock.exists()
        assert _sessions_ls(dt_cluster) == {("alice", "orphaned")}

    with bastion_server(dt_cluster.state_dir) as second:
        end = wait(lambda: _ended(store, "alice"), "the recovered session.end")
        assert len(end) == 1
        end = end[0]
        assert end.fields["recovered"] is True
        assert end.fields["session_id"] == start.fields["session_id"]
        assert end.fields["bastion"] == row.instance
        assert "killed or crashed" in end.message
        assert end.fields["node"] == "node-1" and end.remote_addr == "127.0.0.1"
        assert store.list_open_sessions() == []
        assert _sessions_ls(dt_cluster) == set()
        assert not lock.exists()
        # The new bastion serves, and its own sessions are recorded under its name.
        clients.append(held_session(dt_cluster, tmp_path, "bob", second.port))
        wait(lambda: _started(store, "bob"), "bob's session.start")
        [mine] = store.list_open_sessions()
        assert mine.user == "bob" and mine.instance != row.instance
        assert (instances.run_dir(dt_cluster.state_dir) / f"{mine.instance}.lock").exists()
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0, second.log()
    [bob_end] = _ended(store, "bob")
    assert bob_end.message == "bastion shutting down" and "recovered" not in bob_end.fields
    assert store.list_open_sessions() == []
    assert list(instances.run_dir(dt_cluster.state_dir).iterdir()) == []
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_sibling_ends_a_killed_bastions_sessions_and_no_live_ones(
    dt_cluster, dt_node, tmp_path, clients
):
    """Two bastions on one state directory: killing one must not end the other's
    sessions in the audit (it is alive; its lock says so), and the survivor ends the
    dead one's sessions without being restarted."""
    store = dt_cluster.store
    fast = ("--set", "session_sweep_interval=0.3")
    with ExitStack() as stack:
        a = stack.enter_context(bastion_server(dt_cluster.state_dir, extra_args=fast))
        b = stack.enter_context(bastion_server(dt_cluster.state_dir, extra_args=fast))
        clients.append(held_session(dt_cluster, tmp_path, "alice", a.port))
        clients.append(held_session(dt_cluster, tmp_path, "bob", b.port))
        wait(lambda: _started(store, "alice") and _started(store, "bob"), "both sessions")
        assert len(store.list_open_sessions()) == 2

        _kill9(a)
        [end] = wait(lambda: _ended(store, "alice"), "alice's recovered session.end")
        assert end.fields["recovered"] is True

        # A third bastion starting now sweeps too: bob's bastion is alive, so
        # bob's session is left alone, in the audit and on the wire.
        c = stack.enter_context(bastion_server(dt_cluster.state_dir, extra_args=fast))
        # Its start-up sweep runs before it says it is ready.
        wait(lambda: "dt-bastion ready" in c.log(), "the third bastion to be ready")
        assert len(list(instances.run_dir(dt_cluster.state_dir).iterdir())) == 2
        [open_now] = store.list_open_sessions()
        assert open_now.user == "bob"
        assert _ended(store, "bob") == []
        assert clients[1].poll() is None, "bob's live session was cut"
        assert c.proc.poll() is None

    # Leaving the stack stopped b and c cleanly: bob's session ends once, normally.
    [bob_end] = _ended(store, "bob")
    assert bob_end.message == "bastion shutting down"
    assert len(_ended(store, "alice")) == 1
    assert store.list_open_sessions() == []


def test_liveness_is_the_lock_not_a_pid(tmp_path):
    """A lock held by a live process is never claimed; once that process is killed it
    is, at once. A lock file nobody holds and a missing one both mean dead."""
    state = tmp_path / "state"
    state.mkdir()
    code = (
        "import sys, time; from pathlib import Path; from bastion.proxy import instances; "
        f"lock = instances.InstanceLock.acquire(Path({str(state)!r})); "
        "print(lock.name, flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        name = holder.stdout.readline().strip()
        assert len(name) == 12
        with instances.claim_if_dead(state, name) as dead:
            assert dead is False
        assert (instances.run_dir(state) / f"{name}.lock").exists()
        holder.kill()
        holder.wait(10)
        with instances.claim_if_dead(state, name) as dead:
            assert dead is True
        assert not (instances.run_dir(state) / f"{name}.lock").exists()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()
    with instances.claim_if_dead(state, "0123456789ab") as dead:
        assert dead is True  # no file at all
    with instances.claim_if_dead(state, "../../etc/passwd") as dead:
        assert dead is True  # not a name a bastion makes; no path is built from it

    mine = instances.InstanceLock.acquire(state)
    assert instances.stale_names(state, mine.name) == []
    mine.release()
    assert not mine.path.exists()
