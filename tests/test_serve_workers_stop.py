"""`dt-bastion serve --workers 4` stopped (SIGTERM) while it is still starting its
workers: the ones it starts after the signal are stopped too, and it exits.

The signal lands as the first worker appears; the parent used to forward SIGTERM to
the workers running then, go on starting the rest, and wait for ever for those
(they serve, never told to stop). A race: it showed 3 times in 4 runs here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.sshd import VENV_BIN, free_port

pytestmark = pytest.mark.integration


def _workers(pid: int) -> list[int]:
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if b"server_cli" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
        except OSError:
            pass
    return found


def test_sigterm_while_workers_start_stops_every_worker(dt_cluster):
    proc = subprocess.Popen(
        [str(VENV_BIN / "dt-bastion"), "serve", "--state", str(dt_cluster.state_dir),
         "--listen", f"127.0.0.1:{free_port()}", "--workers", "4",
         "--set", "drain_timeout=1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _workers(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(25)
        except subprocess.TimeoutExpired:
            left = _workers(proc.pid)
            pytest.fail(f"the supervisor never exited; workers {left} were never stopped")
    finally:
        if proc.poll() is None:
            for pid in _workers(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
        proc.wait(10)
