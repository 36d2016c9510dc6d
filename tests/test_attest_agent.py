"""dtclient agent's own parts: its pidfile, log, backoff, state and what it will quote.

(The agent against a running bastion, started by login and stopped by logout, is
tests/deployed/test_continuous_attestation.py.)
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from bastion.protocol import wire
from bastion.protocol.errors import TPMError, UsageError
from client import attest_agent
from client.attest_agent import AgentLog, Backoff, PidFile, check_challenge, describe, running


def test_backoff_doubles_to_its_limit_and_starts_over():
    b = Backoff()
    assert [b() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    b.reset()
    assert b() == 1
    failed = Backoff(attest_agent.FAILED_BACKOFF, attest_agent.MAX_FAILED_BACKOFF)
    assert [failed() for _ in range(7)] == [10, 20, 40, 80, 160, 300, 300]


@pytest.mark.parametrize(
    "pcrs", [[], [0, 0], [24], [-1], list(range(30))], ids=["none", "twice", "24", "neg", "many"]
)
def test_a_challenge_no_tpm_can_answer_is_refused(pcrs):
    msg = wire.AttestChallenge(nonce=b"n" * 32, pcr_select=pcrs, interval=2, grace=3)
    with pytest.raises(TPMError, match="no TPM makes"):
        check_challenge(msg)


def test_the_pidfile_is_held_while_the_agent_runs(tmp_path):
    path = tmp_path / "agent.pid"
    assert running(path) is None
    first = PidFile(path)
    first.acquire()
    assert running(path) == os.getpid()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(UsageError, match=f"already runs for this profile \\(pid {os.getpid()}\\)"):
        PidFile(path).acquire()
    first.release()
    assert running(path) is None and not path.exists()


def test_a_stale_pidfile_is_no_agent(tmp_path):
    """A pid left by an agent killed with SIGKILL, even a live process's: nobody holds
    the lock, so nobody runs (pid reuse cannot fool status or logout)."""
    path = tmp_path / "agent.pid"
    path.write_text(f"{os.getppid()}\n")
    assert running(path) is None
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from client.attest_agent import PidFile; "
            f"PidFile(__import__('pathlib').Path({str(path)!r})).acquire(); "
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert running(path) == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert running(path) is None


def test_the_log_is_private_and_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(attest_agent, "LOG_LIMIT", 100)
    log = AgentLog(tmp_path / "agent.log")
    for i in range(10):
        log(f"line {i} " + "x" * 20)
    assert stat.S_IMODE((tmp_path / "agent.log").stat().st_mode) == 0o600
    assert (tmp_path / "agent.log").stat().st_size < 200
    assert (tmp_path / "agent.log.1").exists()
    assert "line 9" in (tmp_path / "agent.log").read_text()


def test_the_log_is_never_written_through_a_link(tmp_path):
    target = tmp_path / "elsewhere"
    (tmp_path / "agent.log").symlink_to(target)
    AgentLog(tmp_path / "agent.log")("hello")  # refused, silently: answers go on
    assert not target.exists()


def test_status_says_what_the_agent_does():
    assert describe({"running": False}) == "not running"
    assert (
        describe({"running": True, "pid": 7, "state": "attesting", "interval": 2})
        == "running (pid 7), a quote every 2 s"
    )
    said = describe({"running": True, "pid": 7, "state": "failed", "reason": "PCR 4 changed"})
    assert said == "running (pid 7), failed: PCR 4 changed"
