"""What stock `ssh` prints when the bastion refuses it the moment it connects.

The flood limits refuse a connection at connect (bastion.authz.limits.admit_connection:
too many failed logins from the address, too many connections from it, too many of
them still logging in, the bastion full). Before, that refusal was an SSH disconnect
packet sent ahead of the version line: OpenSSH 9.2 printed "kex_exchange_identification:
banner line contains invalid characters" and never the reason. Lines ahead of the version
line (RFC 4253 4.2) are no way to say it either: ssh shows them only with -v
("debug1: kex_exchange_identification: banner line 0: ..."). Now the bastion sends its
version line and a DISCONNECT with the reason, before any key exchange (a refusal costs
no CPU), and closes only once the client has read it and hung up: closing at once, with
the client's version line and KEXINIT unread, resets the connection, and the reset can
overtake the reason ("Connection reset by peer").

Real `dt-bastion serve` with small limits, real `ssh`; each refused connection comes from
an address of its own (127.0.0.3) so the readiness probe's connection is no part of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest

from bastion.authz import limits
from bastion.cluster import init_cluster
from tests.sshd import bastion_server

pytestmark = pytest.mark.integration
SOURCE = "127.0.0.3"

CASES = {
    "failed logins": ("max_auth_failures_per_source=1", limits.TOO_MANY_FAILURES),
    "connections": ("max_connections_per_source=1", limits.TOO_MANY_CONNECTIONS),
    "still logging in": (
        "max_unauthenticated_per_source=1",
        "too many connections from your address are still logging in",
    ),
    "full": ("max_unauthenticated=1", limits.FULL),
}


def stock_ssh(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", f"BindAddress={SOURCE}",
            "-o", "ConnectTimeout=20", "-p", str(port), "dt@127.0.0.1", "true",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def hold(port: int) -> socket.socket:
    """A connection from SOURCE that is admitted and stays logging in (it says nothing)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(SOURCE, 0))
    assert sock.recv(256).startswith(b"SSH-2.0-dt-bastion\r\n")
    return sock


def fail_once(port: int) -> None:
    """One failed login from SOURCE: a certificate of a CA of no cluster."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    ca = asyncssh.generate_private_key("ssh-ed25519")
    cert = ca.generate_user_certificate(key, "alice", principals=["-dt-jump"])

    async def attempt() -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            async with asyncssh.connect(
                "127.0.0.1", port, local_addr=(SOURCE, 0), username="dt", known_hosts=None,
                agent_path=None, config=None, client_keys=[(key, cert)], kbdint_auth=False,
                password_auth=False, connect_timeout=20,
            ):  # fmt: skip
                pass

    asyncio.run(asyncio.wait_for(attempt(), 30))


@pytest.mark.parametrize("case", CASES)
def test_stock_ssh_refused_at_connect_prints_why(tmp_path: Path, case: str) -> None:
    setting, reason = CASES[case]
    cluster = init_cluster(tmp_path / "state", "refused")
    try:
        with (
            bastion_server(cluster.state_dir, extra_args=("--set", setting)) as bastion,
            contextlib.ExitStack() as held,
        ):
            if case == "failed logins":
                fail_once(bastion.port)
            else:
                held.enter_context(hold(bastion.port))
            for _ in range(3):  # every time, not by luck of timing
                start = time.monotonic()
                result = stock_ssh(bastion.port)
                assert result.returncode == 255, result
                assert f"Received disconnect from 127.0.0.1 port {bastion.port}:12: {reason}" in (
                    result.stderr
                ), result.stderr
                assert time.monotonic() - start < 10  # no waiting for a timeout
            if case != "failed logins":
                # The refusals held no slot: once the held connection goes, SOURCE is
                # let in (and refused only at authentication: it has no key).
                held.close()
                deadline = time.monotonic() + 15
                while "Permission denied" not in (result := stock_ssh(bastion.port)).stderr:
                    assert time.monotonic() < deadline, result.stderr
                    time.sleep(0.1)
            assert "Traceback" not in bastion.log(), bastion.log()
    finally:
        cluster.close()
