"""Software TPMs, one per device: a provisioned swtpm state copied and run on free ports.

(tests/swtpm.py does the same for the in-process tiers; it imports the product, so this
tier, which must run against any build's commands, keeps its own few lines.)
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.deployed.processes import DeployedError, stop, wait_for_port


def provision_tpm(base: Path) -> Path:
    """A swtpm state with an EK certificate from a local CA in ``base``; copied per device.

    (tests/swtpm.py does the same for the in-process tiers; it imports the product, so this
    tier, which must run against any checkout's binaries, keeps its own few lines.)
    """
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
        ["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--create-ek-cert",
         "--config", str(base / "setup.conf"), "--overwrite", "--pcr-banks", "sha256"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return state


def _free_port_pair() -> int:
    """P and P+1 both free, below the ephemeral range (swtpm binds without SO_REUSEADDR)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(10000, max(10002, low - 2))
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise DeployedError("no free pair of ports for swtpm")


@contextlib.contextmanager
def swtpm(template: Path, workdir: Path) -> Iterator[str]:
    """A running copy of ``template``; yields its TCTI string."""
    state = workdir / "tpmstate"
    shutil.copytree(template, state)
    error = ""
    for _ in range(5):  # a port can be taken between probing and binding
        port = _free_port_pair()
        proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
             "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            wait_for_port(port, proc, "swtpm", timeout=10)
            break
        except DeployedError:
            stop(proc)
            error = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    else:
        raise DeployedError(f"swtpm did not start: {error.strip()[-300:]}")
    try:
        yield f"swtpm:host=127.0.0.1,port={port}"
    finally:
        stop(proc)
