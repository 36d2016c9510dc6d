"""A real HAProxy (the Debian package) in front of bastions, on a free loopback port.

TCP mode, ``send-proxy-v2`` to every bastion (so each learns the client's address from
the PROXY header, ``proxy_protocol_from``), health checks every 200 ms on each
bastion's /healthz (``metrics_listen``): three failed checks take a bastion out, one
good one puts it back, and a draining bastion (503) gets no new connection. A
connection refused by a dead bastion is redispatched to another (``retries`` and
``option redispatch``), so clients never meet a dead backend in the window before
the checks notice. HAProxy connects from ``source`` (127.0.0.3 in the tests), so an
audit row showing that address would mean the PROXY header was ignored.

The same configuration, with real addresses, is the example in
docs/getting-started.md ("Several bastions").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sshd import VENV_BIN, free_port, stop, wait_for_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@dataclass(frozen=True)
class Backend:
    name: str
    ssh_port: int  # the bastion's SSH port (it gets the PROXY header)
    health_port: int  # its metrics_listen port (/healthz)


@dataclass
class HAProxy:
    port: int
    proc: subprocess.Popen
    config: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict[str, str]:
        """Each bastion's state as HAProxy's health checks see it ("UP", "DOWN", ...),
        from its runtime API (``show stat``)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.config.parent / "admin.sock"))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines() if line and line[0] != "#"]
        return {r[1]: r[17].split()[0] for r in rows if r[0] == "bastions" and r[1] != "BACKEND"}

    def wait_status(self, name: str, want: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while (seen := self.status().get(name)) != want:
            assert time.monotonic() < deadline, f"haproxy still sees {name} {seen}, not {want}"
            time.sleep(0.05)


def config_text(
    port: int,
    backends: Sequence[Backend],
    *,
    source: str = "127.0.0.3",
    listen: str = "127.0.0.1",
    stats_socket: Path | None = None,
) -> str:
    servers = "\n".join(
        f"    server {b.name} 127.0.0.1:{b.ssh_port} send-proxy-v2 "
        f"check port {b.health_port} inter 200ms fall 3 rise 1"
        for b in backends
    )
    stats = f"    stats socket {stats_socket} mode 600 level admin\n" if stats_socket else ""
    return f"""global
    maxconn 512
{stats}    log stderr format short local0 info

defaults
    mode tcp
    log global
    option tcplog
    retries 3
    option redispatch 1
    timeout connect 2s
    # /healthz reads the database within 2 s; a busy CI host must not flap it down.
    timeout check 2s
    # An SSH session may sit idle: the bastion's own keepalives bound it, not these.
    timeout client 10m
    timeout server 10m

frontend ssh
    bind {listen}:{port}
    default_backend bastions

backend bastions
    balance roundrobin
    source {source}
    option httpchk GET /healthz
    http-check expect status 200
{servers}
"""


@contextlib.contextmanager
def haproxy(directory: Path, backends: Sequence[Backend]) -> Iterator[HAProxy]:
    """``haproxy -db`` (foreground) with :func:`config_text`; stopped on exit."""
    if not Path(HAPROXY).exists():
        pytest.skip("haproxy is not installed (run scripts/setup.sh)")
    port = free_port()
    text = config_text(port, backends, stats_socket=directory / "admin.sock")
    with run_haproxy(directory, text, port) as proc:
        # The frontend may answer before the runtime API's socket exists.
        admin, deadline = directory / "admin.sock", time.monotonic() + 15
        while not admin.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "haproxy has no admin.sock"
            time.sleep(0.02)
        yield HAProxy(port, proc, directory / "haproxy.cfg", directory / "haproxy.log")


@contextlib.contextmanager
def run_haproxy(directory: Path, text: str, port: int) -> Iterator[subprocess.Popen]:
    """``haproxy -db`` with the configuration ``text`` (checked first) in
    ``directory``, once its frontend on ``port`` answers; stopped on exit."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "haproxy.cfg"
    config.write_text(text)
    check = subprocess.run(
        [HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, f"haproxy refused its config:\n{check.stdout}{check.stderr}"
    with open(directory / "haproxy.log", "wb") as log:
        proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, proc)
        yield proc
    finally:
        stop(proc)


# -- bastions behind it: `dt-bastion serve` processes that can be killed and restarted ------


@dataclass
class Serve:
    """One `dt-bastion serve` on fixed ports (the balancer's config names them), so it
    can be stopped and started again as a rolling restart does."""

    state: Path
    name: str
    args: tuple[str, ...] = ()
    port: int = 0
    health_port: int = 0
    proc: subprocess.Popen | None = None
    runs: int = 0

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.health_port = self.health_port or free_port()

    @property
    def backend(self) -> Backend:
        return Backend(self.name, self.port, self.health_port)

    def log_path(self) -> Path:
        return self.state.parent / f"{self.name}-{self.runs}.log"

    def log(self) -> str:
        path = self.log_path()
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> Serve:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self.runs += 1
        with open(self.log_path(), "wb") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "dt-bastion"), "serve", "--state", str(self.state),
                 "--listen", f"127.0.0.1:{self.port}",
                 "--set", f"metrics_listen=127.0.0.1:{self.health_port}",
                 "--set", "drain_timeout=2", "--workers", "1", *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while "dt-bastion ready on" not in self.log():
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"{self.name} never said ready:\n{self.log()}"
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def instance(self) -> str:
        """Its instance name: the run/<name>.lock it holds open (as the kernel says)."""
        assert self.proc is not None
        fds = Path(f"/proc/{self.proc.pid}/fd")
        deadline = time.monotonic() + 10
        while True:
            for fd in fds.iterdir():
                with contextlib.suppress(OSError):
                    target = Path(os.readlink(fd))
                    if target.parent.name == "run" and target.suffix == ".lock":
                        return target.stem
            assert time.monotonic() < deadline, f"{self.name} holds no instance lock"
            time.sleep(0.05)
