"""Processes for the deployed-shape tier: where the product's commands are, starting,
waiting for and stopping what a test runs. Imports nothing of the product.

The commands come from DT_TEST_BIN (default: the directory of the running Python, i.e.
the project's .venv/bin), so the same tests can be pointed at another build.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

BIN = Path(os.environ.get("DT_TEST_BIN") or Path(sys.executable).parent)
SSHD = "/usr/sbin/sshd"
LOGIN = getpass.getuser()  # the Unix login on the nodes (the tests' own user)
PASSWORD = "correct horse battery staple"
DB_NAME = "cluster.db"

T = TypeVar("T")


class DeployedError(AssertionError):
    """A product command did not behave as an admin or user would expect."""


# -- waiting ----------------------------------------------------------------------------------


def wait_for(what: str, probe: Callable[[], T], timeout: float = 10.0, every: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise DeployedError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise DeployedError(f"{what} exited with {proc.returncode} before listening")
        return listening(port)

    wait_for(f"{what} to listen on 127.0.0.1:{port}", up, timeout)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    """Stop one process we started; its exit code (negative: the signal that ended it)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DT_", "SSH_"))}
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env["COLUMNS"] = "200"
    env["TSS2_LOG"] = "all+NONE"
    return env
