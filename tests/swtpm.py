"""Software TPMs for tests: provisioned once per session, one running copy per test.

swtpm_setup writes an EK certificate (RSA 2048 and ECC) signed by a local CA that we
point into the test's temp dir (its default lives in /var/lib/swtpm-localca). The
provisioned state is then copied for each test, so every test gets a fresh TPM
with the same EK in about 50 ms instead of a second.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.sshd import free_port, stop


@dataclass(frozen=True)
class Provisioned:
    state: Path
    root_pem: Path  # the local CA's root
    issuer_pem: Path  # the intermediate that signed the EK certificate


def provision(base: Path) -> Provisioned:
    ca, state = base / "ca", base / "state"
    ca.mkdir(parents=True)
    state.mkdir()
    (ca / "localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n"
    )
    (ca / "localca.options").write_text(
        "--platform-manufacturer dt-test\n--platform-version 2.1\n--platform-model swtpm\n"
    )
    (base / "setup.conf").write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {ca}/localca.conf\n"
        f"create_certs_tool_options = {ca}/localca.options\n"
        "active_pcr_banks = sha256\n"
    )
    subprocess.run(
        [
            "swtpm_setup",
            "--tpm2",
            "--tpmstate",
            str(state),
            "--create-ek-cert",
            "--config",
            str(base / "setup.conf"),
            "--overwrite",
            "--pcr-banks",
            "sha256",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return Provisioned(state, ca / "swtpm-localca-rootca-cert.pem", ca / "issuercert.pem")


@dataclass
class RunningTPM:
    tcti: str
    port: int
    provisioned: Provisioned
    proc: subprocess.Popen
    kept: bool = False  # set by `make demo --keep`: left running when the context ends


@contextlib.contextmanager
def run_swtpm(
    template: Provisioned, workdir: Path, *, detach: bool = False
) -> Iterator[RunningTPM]:
    """A running copy of ``template``; ``detach`` as for tests.sshd.sshd_node. Its
    stderr goes to a file, so it never writes into a pipe whose reader has gone."""
    state = workdir / "tpmstate"
    shutil.copytree(template.state, state)
    log_path = workdir / "swtpm.log"
    for _ in range(5):  # a free port can be taken between probing and binding
        port = free_port_pair()
        ctrl = port + 1  # the swtpm TCTI always talks to its control channel on port + 1
        with open(log_path, "wb") as log:
            proc = _start(state, port, ctrl, log, detach)
        if _wait(port, proc):
            break
        error = log_path.read_text(errors="replace")
    else:
        raise RuntimeError(f"swtpm did not start: {error.strip()[-300:]}")
    tpm = RunningTPM(f"swtpm:host=127.0.0.1,port={port}", port, template, proc)
    try:
        yield tpm
    finally:
        if not tpm.kept:
            stop(proc)


def _start(state: Path, port: int, ctrl: int, log: IO[bytes], detach: bool) -> subprocess.Popen:
    return subprocess.Popen(
        [
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={state}",
            "--server",
            f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl",
            f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
            "--flags",
            "not-need-init,startup-clear",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=detach,
    )


def free_port_pair() -> int:
    """A port P with P and P+1 both bindable, below the ephemeral range.

    swtpm binds without SO_REUSEADDR, so a port that an outgoing connection (or one
    in TIME_WAIT) uses locally makes it fail; ports from the kernel's ephemeral range
    (what binding to port 0 returns) collide with those under load.
    """
    import random
    import socket

    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(200):
        port = random.randrange(10000, max(10002, low - 2))
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    return free_port()


def _wait(port: int, proc: subprocess.Popen, timeout: float = 10) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.02)
    stop(proc)
    return False


def trust_test_tpms(store, *templates: Provisioned) -> None:
    """Trust the local CAs that certified these software TPMs' EKs, as an admin would
    with `dtadmin trust-root add`: by default a software TPM is trusted nowhere."""
    import hashlib

    from bastion.enroll.attest import parse_trust_root

    known = {row["fingerprint"] for row in store.list_trust_roots()}
    for template in templates:
        for pem in (template.root_pem, template.issuer_pem):
            data = pem.read_bytes()
            cert = parse_trust_root(data)
            fp = hashlib.sha256(cert.public_bytes(_der())).hexdigest()
            if fp not in known:
                store.add_trust_root(fp, cert.subject.rfc4514_string(), data.decode())
                known.add(fp)


def _der():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER
