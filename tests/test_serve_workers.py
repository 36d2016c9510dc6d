"""`dt-bastion serve --workers 2`: one supervisor, two bastions on one port and one state.

Real processes throughout: the supervisor and its workers, stock `ssh -J` clients, a
stock sshd node, `dtadmin`. Which worker holds a session is read from the audit (each
`session.start` names its bastion instance) and which process is that instance from
/proc (the worker holds `run/<instance>.lock` open).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from bastion.proxy import instances
from tests.sshd import VENV_BIN, bastion_server, held_session, notice, wait

pytestmark = pytest.mark.integration



def _children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


def _instance_pid(state: Path, instance: str, pids: set[int]) -> int:
    """The worker process holding ``instance``'s liveness lock open."""
    lock = str(instances.run_dir(state) / f"{instance}.lock")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == lock:
                    return pid
    raise AssertionError(f"no worker holds {lock}")


def _audit(store, type_, user=None):
    return [e for e in store.list_audit(type=type_) if user is None or e.user == user]




def test_two_workers_share_the_port_the_state_and_the_signals(
    dt_cluster, dt_node, tmp_path, clients, monkeypatch, notify_socket
):
    store, state, notify = dt_cluster.store, dt_cluster.state_dir, notify_socket
    with contextlib.ExitStack() as stack:
        monkeypatch.setenv("NOTIFY_SOCKET", notify.getsockname())
        bastion = stack.enter_context(
            bastion_server(
                state,
                extra_args=("--workers", "2", "--set", "session_sweep_interval=0.5"),
            )
        )
        monkeypatch.delenv("NOTIFY_SOCKET")
        parent = bastion.proc.pid
        ready = notice(notify)  # once, from the parent, when both workers listen
        assert ready.get("READY") == "1" and ready.get("MAINPID") == str(parent), ready
        wait(lambda: "2 workers serving on" in bastion.log(), "the ready line")
        workers = _children(parent)
        assert len(workers) == 2

        # Stock `ssh -J` sessions land on both workers (opened together, so one
        # worker's loop is busy with a handshake while the other accepts).
        names = [f"u{i}" for i in range(12)]
        batch = 0
        while True:
            for name in names[batch : batch + 4]:
                clients.append(held_session(dt_cluster, tmp_path, name, bastion.port))
            batch += 4
            want = batch
            wait(lambda: len(_audit(store, "session.start")) == want, "the sessions")  # noqa: B023
            starts = {e.user: e for e in _audit(store, "session.start")}
            held = {user: e.fields["bastion"] for user, e in starts.items()}
            if len(set(held.values())) == 2 or batch == len(names):
                break
        assert len(set(held.values())) == 2, f"every session on one worker: {held}"
        by_instance: dict[str, list[str]] = {}
        for user, instance in held.items():
            by_instance.setdefault(instance, []).append(user)
        first, second = sorted(by_instance, key=lambda i: by_instance[i][0])
        pids = {i: _instance_pid(state, i, workers) for i in (first, second)}
        assert set(pids.values()) == workers

        # A lock made with dtadmin cuts a session on the second worker.
        locked = by_instance[second][0]
        subprocess.run(
            [str(VENV_BIN / "dtadmin"), "--state", str(state), "lock", "--user", locked]
            + ["--message", "laptop lost"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        cut = wait(lambda: _audit(store, "session.terminated", locked), "the cut")
        assert cut[0].fields["session_id"] == starts[locked].fields["session_id"]
        client = clients[names.index(locked)]
        assert client.wait(30) != 0
        assert "laptop lost" in client.stderr.read()

        # SIGHUP: every worker reloads; the parent says READY=1 again after both.
        bastion.proc.send_signal(signal.SIGHUP)
        assert notice(notify).get("RELOADING") == "1"
        assert notice(notify).get("READY") == "1"
        assert len(_audit(store, "bastion.reload")) == 2

        # kill -9 of the first worker: the supervisor starts another, and a sibling
        # ends the dead one's sessions in the audit (recovered).
        os.kill(pids[first], signal.SIGKILL)
        orphans = set(by_instance[first])
        recovered = wait(
            lambda: (
                {
                    e.user
                    for e in _audit(store, "session.end")
                    if e.fields.get("recovered") and e.fields.get("bastion") == first
                }
                == orphans
            ),
            "the dead worker's sessions ended by a sibling",
        )
        assert recovered
        restart = wait(lambda: _audit(store, "bastion.restart"), "the restart audited")
        assert f"pid {pids[first]}" in restart[0].message
        assert "SIGKILL" in restart[0].message
        now = wait(lambda: len(_children(parent)) == 2 and _children(parent), "a new worker")
        assert pids[first] not in now and pids[second] in now
        clients.append(held_session(dt_cluster, tmp_path, "late", bastion.port))
        wait(lambda: _audit(store, "session.start", "late"), "a session after the restart")

        # SIGTERM: STOPPING=1, both workers drain (sessions cut after drain_timeout)
        # and the supervisor exits 0 with nothing left behind.
        bastion.proc.send_signal(signal.SIGTERM)
        assert notice(notify).get("STOPPING") == "1"
        assert bastion.proc.wait(30) == 0, bastion.log()
    assert store.list_open_sessions() == []
    assert list(instances.run_dir(state).iterdir()) == []
    assert len(_audit(store, "bastion.drain")) == 2
    for pid in now:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )


def test_one_worker_runs_no_supervisor(dt_cluster, tmp_path):
    with bastion_server(dt_cluster.state_dir) as bastion:  # the fixture: --workers 1
        wait(lambda: "dt-bastion ready on" in bastion.log(), "the ready line")
        assert _children(bastion.proc.pid) == set()
        assert "workers" not in bastion.log()
