"""Real OpenSSH and a real dt-bastion for tests, on free loopback ports.

Everything lives in the test's temp dir; every process started here is stopped by the
context manager that started it, in reverse order.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bastion.authz.records import Device, User
from bastion.ca.certs import load_public_key
from bastion.ca.keys import atomic_write
from bastion.cluster import Cluster

SSHD = "/usr/sbin/sshd"
VENV_BIN = Path(sys.executable).parent
LOGIN = getpass.getuser()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait(predicate, what: str, timeout: float = 30.0):
    """``predicate()``'s first true value, polled every 0.1 s for up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def keygen(path: Path, comment: str = "test") -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True
    )
    return path


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Node:
    port: int
    dir: Path
    proc: subprocess.Popen
    kept: bool = False  # set by `make demo --keep`: left running when the context ends

    def log(self) -> str:
        path = self.dir / "sshd.log"
        return path.read_text() if path.exists() else ""


@contextlib.contextmanager
def sshd_node(
    tmp: Path,
    cluster: Cluster,
    *,
    names: tuple[str, ...] = ("node-1",),
    extra: str = "",
    detach: bool = False,
) -> Iterator[Node]:
    """A stock sshd trusting the cluster's user CA, with a host certificate from its host CA.

    ``detach``: in a session of its own, so that a terminal's Ctrl-C or hang-up to the
    starter's process group does not reach it (the demo's --keep sets ``kept`` too)."""
    tmp.mkdir(parents=True, exist_ok=True)
    host_key = keygen(tmp / "ssh_host_ed25519_key", "node")
    issued = cluster.ca.sign_host(
        load_public_key((tmp / "ssh_host_ed25519_key.pub").read_bytes()),
        (*names, "127.0.0.1", "localhost"),
    )
    atomic_write(tmp / "ssh_host_ed25519_key-cert.pub", (issued.openssh + "\n").encode(), 0o644)
    (tmp / "user_ca.pub").write_text((cluster.state_dir / "ca" / "user_ca.pub").read_text())
    port = free_port()
    config = tmp / "sshd_config"
    config.write_text(
        f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
HostCertificate {tmp}/ssh_host_ed25519_key-cert.pub
TrustedUserCAKeys {tmp}/user_ca.pub
PidFile {tmp}/sshd.pid
StrictModes no
UsePAM no
AuthorizedKeysFile none
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
MaxStartups 200
LogLevel VERBOSE
{extra}
"""
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config), "-E", str(tmp / "sshd.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=detach,
    )
    node = Node(port, tmp, proc)
    try:
        wait_for_port(port, proc)
        yield node
    finally:
        if not node.kept:
            stop(proc)


@dataclass
class BastionProcess:
    port: int
    proc: subprocess.Popen
    log_path: Path
    kept: bool = False  # as Node.kept

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@contextlib.contextmanager
def bastion_server(
    state_dir: Path,
    *,
    extra_args: tuple[str, ...] = (),
    listen_host: str = "127.0.0.1",
    detach: bool = False,
) -> Iterator[BastionProcess]:
    """The real `dt-bastion serve` as a subprocess on a free port (``listen_host`` "::"
    for a dual-stack listener; it is still polled on 127.0.0.1). ``detach`` as for
    sshd_node."""
    port = free_port()
    listen = f"[{listen_host}]" if ":" in listen_host else listen_host
    log_path = state_dir.parent / f"bastion-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(VENV_BIN / "dt-bastion"),
                "serve",
                "--state",
                str(state_dir),
                "--listen",
                f"{listen}:{port}",
                # SIGTERM drains: sessions a test leaves open are cut after this, not
                # after the 30 s default (a test asks for more with extra_args).
                "--set",
                "drain_timeout=2",
                # One process, no supervisor: the default (one worker per core) would
                # double every test's processes (tests/test_serve_workers.py: N > 1).
                "--workers",
                "1",
                *extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=detach,
        )
    bastion = BastionProcess(port, proc, log_path)
    try:
        wait_for_port(port, proc)
        yield bastion
    finally:
        if not bastion.kept:
            stop(proc)


def write_known_hosts(path: Path, cluster: Cluster) -> Path:
    """A known_hosts trusting every host certificate from the cluster's host CA."""
    host_ca = (cluster.state_dir / "ca" / "host_ca.pub").read_text().strip()
    path.write_text(f"@cert-authority * {host_ca}\n")
    return path


def write_ssh_config(
    path: Path,
    *,
    bastion_port: int,
    key: Path,
    cert: Path,
    cluster: Cluster,
    node_port: int | None = None,
) -> Path:
    """An ssh_config in which `ssh -F path -J bastion LOGIN@node-1` works (no TOFU)."""
    known = write_known_hosts(path.parent / "known_hosts", cluster)
    common = f"""    IdentityFile {key}
    CertificateFile {cert}
    IdentitiesOnly yes
    UserKnownHostsFile {known}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10
"""
    node_port_line = f"    Port {node_port}\n" if node_port else ""
    path.write_text(
        f"""Host bastion
    HostName 127.0.0.1
    Port {bastion_port}
    User dt
    HostKeyAlias 127.0.0.1
{common}
Host * !bastion
    ProxyJump bastion
{node_port_line}{common}"""
    )
    return path


def user_client(
    cluster: Cluster,
    directory: Path,
    user: str,
    *,
    bastion_port: int,
    device: Device | None = None,
    ttl: int = 600,
) -> Path:
    """Key, certificate from the cluster's CA and ssh_config for an existing user."""
    directory.mkdir(parents=True, exist_ok=True)
    key = keygen(directory / "id", user)
    issued = cluster.ca.sign_user(
        user, load_public_key((directory / "id.pub").read_bytes()), ttl=ttl, device=device
    )
    (directory / "id-cert.pub").write_text(issued.openssh + "\n")
    return write_ssh_config(
        directory / "ssh_config",
        bastion_port=bastion_port,
        key=key,
        cert=directory / "id-cert.pub",
        cluster=cluster,
    )


def held_session(cluster: Cluster, tmp_path: Path, name: str, port: int) -> subprocess.Popen:
    """A user's `ssh -J` session through the bastion on ``port``, holding a node shell
    open until killed (the user is added with the access role if new)."""
    if cluster.store.find_user(name) is None:
        cluster.store.add_user(User(name, ("access",), (LOGIN,)))
    config = user_client(cluster, tmp_path / f"{name}-{port}", name, bastion_port=port)
    return subprocess.Popen(
        ["ssh", "-F", str(config), f"{LOGIN}@node-1", "sleep", "120"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def notify_socket() -> Iterator[socket.socket]:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET (its address:
    ``getsockname()``; a short path under /tmp, as sun_path is short)."""
    folder = tempfile.mkdtemp(prefix="dtn-", dir="/tmp")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    try:
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(folder)


def notice(sock: socket.socket) -> dict[str, str]:
    """One sd_notify datagram as its KEY=VALUE fields."""
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)


@pytest.fixture
def clients():
    """Client processes a test starts; killed and reaped at its end."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def ssh(config: Path, target: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-F", str(config), target, *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _sshd_would_run(command: Path) -> bool:
    """sshd runs a principals command only if every directory above it is root's and not
    writable by others; a checkout under /tmp fails that, through no fault of ours."""
    import os
    import stat

    for parent in command.parents:
        st = os.stat(parent)
        if st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o022:
            return False
    return True


@pytest.fixture
def sshd_runnable():
    """``wrap(*argv)``: a command line sshd will run as its AuthorizedPrincipalsCommand.

    Where the checkout (and so the venv's python) sits under a world-writable /tmp, the
    command is a two-line shell script in a directory of the test's own, made under
    root's /run and removed at teardown, so the test runs wherever CI clones."""
    import os
    import shlex
    import shutil
    import tempfile

    made: list[Path] = []

    def wrap(*argv: object) -> str:
        if _sshd_would_run(Path(str(argv[0]))):
            return " ".join(str(a) for a in argv)
        if os.geteuid() != 0 or not os.access("/run", os.W_OK):
            pytest.skip("sshd would refuse a principals command here, and /run is not ours")
        folder = Path(tempfile.mkdtemp(prefix="dt-test-", dir="/run"))
        made.append(folder)
        script = folder / "principals"
        script.write_text(
            "#!/bin/sh\nexec " + " ".join(shlex.quote(str(a)) for a in argv) + ' "$@"\n'
        )
        script.chmod(0o755)
        return str(script)

    yield wrap
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)
