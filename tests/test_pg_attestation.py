"""Continuous attestation across bastions (PostgreSQL): the device's agent attests to
bastion A, its `ssh -J` session runs through bastion B; when A sees a failed quote, B
cuts the session through the change feed, not a poll later.

The device is a real swtpm with its AK on record, the agent the real `dtclient agent`
process, the bastions real `dt-bastion serve` on one database, the session stock ssh.
(Enrollment and login are tested elsewhere; here the device and its certificate are
put in place by the cluster's own store and CA, as the enrollment would.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bastion.authz.records import (
    POSTURE_PCRS,
    Device,
    DeviceCredential,
    DevicePosture,
    Measurement,
    Node,
    PosturePolicy,
    Role,
    User,
)
from bastion.ca.certs import load_public_key
from bastion.cluster import Cluster
from client.profile import DeviceState, Home, Profile
from tests.postgres import available, dtadmin, fresh_database
from tests.sshd import LOGIN, SSHD, bastion_server, keygen, sshd_node, write_ssh_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not available(), reason="PostgreSQL is not installed"),
]
TAG = "PG-LAPTOP"


def enrolled_device(cluster: Cluster, tcti: str, tpm_dir: Path) -> Device:
    """The device as an enrollment leaves it: its AK on record, its boot measured."""
    from client.tpm import TPM

    with TPM.open(tcti) as tpm:
        ak = tpm.load_or_create_ak(tpm_dir)
        ek = tpm.endorsement()
        values = tpm.quote(tpm_dir, bytes(32), POSTURE_PCRS).pcr_values
    ek_hash = hashlib.sha256(ek.public_der).hexdigest()
    device = cluster.store.add_device(
        Device(
            id="dev-pg",
            asset_tag=TAG,
            os_type="linux",
            enroll_status="enrolled",
            owner="alice",
            credential=DeviceCredential("cred-pg", ek.public_der, "tpm_ekcert", ek_hash, ak),
        )
    )
    measured = Measurement(pcrs={i: v.hex() for i, v in zip(POSTURE_PCRS, values, strict=True)})
    cluster.store.put_device_posture(
        DevicePosture(
            device.id, baseline=measured, measured=measured, verdict="pass",
            attested_until=time.time() + 5,
        )
    )  # fmt: skip
    return device


def client_home(cluster: Cluster, root: Path, device: Device, bastion_port: int) -> Path:
    """dtclient's home after `dtclient login` to bastion A with the device."""
    key = keygen(root / "id", "alice")
    issued = cluster.ca.sign_user(
        "alice", load_public_key((root / "id.pub").read_bytes()), ttl=600, device=device
    )
    (root / "id-cert.pub").write_text(issued.openssh + "\n")
    host_ca = (cluster.state_dir / "ca" / "host_ca.pub").read_text().strip()
    home = Home(root / ".dt", cluster.name)
    home.save_profile(
        Profile(proxy=f"127.0.0.1:{bastion_port}", user="alice", cluster=cluster.name,
                host_ca_keys=(host_ca,))
    )  # fmt: skip
    home.save_credentials(key.read_bytes(), (root / "id.pub").read_text().strip(), issued.openssh)
    home.save_device(DeviceState(TAG, "cred-pg", cluster.name))
    return root / ".dt"


def wait_until(what, probe, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def logged_at(log: str, text: str) -> float | None:
    for line in log.splitlines():
        if text in line:
            stamp, _, millis = line[:23].partition(",")
            return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
    return None


def test_a_failed_quote_on_one_bastion_cuts_the_session_on_another(pg_server, swtpm, tmp_path):
    if not os.path.exists(SSHD) or shutil.which("tpm2_pcrextend") is None:
        pytest.skip("needs sshd and tpm2-tools")
    url = fresh_database(pg_server)
    state_a, state_b = tmp_path / "host-a" / "state", tmp_path / "host-b" / "state"
    state_a.parent.mkdir()
    state_b.parent.mkdir()
    dtadmin(url, state_a, "init", "--cluster", "pg.test")
    shutil.copytree(state_a, state_b)
    cluster = Cluster.open(state_a, database=url)
    agent = None
    try:
        store = cluster.store
        store.put_role(
            Role("attested", device_trust_mode="required",
                 posture=PosturePolicy(attest_interval=2, attest_grace=3))
        )  # fmt: skip
        store.add_user(User("alice", ("access", "attested"), (LOGIN,)))
        home = tmp_path / "alice"
        home.mkdir(mode=0o700)
        device = enrolled_device(cluster, swtpm.tcti, home / ".dt" / "tpm")
        with sshd_node(tmp_path / "node", cluster) as node:
            store.add_node(Node("node-1", "127.0.0.1", node.port, {"env": "test"}))
            args = ("--database", url)
            with (
                bastion_server(state_a, extra_args=args) as a,
                bastion_server(state_b, extra_args=args) as b,
            ):
                dt_home = client_home(cluster, home, device, a.port)
                env = {**os.environ, "DT_HOME": str(dt_home), "DT_TPM_TCTI": swtpm.tcti}
                agent = subprocess.Popen(
                    [sys.executable, "-m", "client", "agent"],
                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                state = dt_home / "clusters" / "pg.test" / "agent.json"
                wait_until("the agent to attest", lambda: '"attesting"' in _read(state))
                config = write_ssh_config(
                    home / "ssh_config", bastion_port=b.port, key=home / "id",
                    cert=home / "id-cert.pub", cluster=cluster,
                )  # fmt: skip
                held = subprocess.Popen(
                    ["ssh", "-F", str(config), f"{LOGIN}@node-1", "echo held; exec sleep 60"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
                assert held.stdout is not None and held.stdout.readline().strip() == "held", (
                    held.stderr.read() if held.stderr else "" + b.log()
                )
                time.sleep(6)  # past the first deadline: B follows A's good quotes
                assert held.poll() is None, held.stderr.read() if held.stderr else ""

                subprocess.run(
                    ["tpm2_pcrextend", "-T", swtpm.tcti, "4:sha256=" + "5a" * 32],
                    check=True, capture_output=True, timeout=30,
                )  # fmt: skip
                held.wait(15)
                ended = time.time()
                said = held.stderr.read() if held.stderr else ""
                assert "PCR 4 changed during the session" in said, said
                seen = logged_at(a.log(), f'continuous attestation of device "{TAG}" failed')
                assert seen is not None, a.log()
                assert "closing a connection whose only session was cut" in b.log(), b.log()
                print(f"\ncut on bastion B {ended - seen:.2f} s after bastion A saw the failure")
                assert ended - seen < 5.0
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(10)
        cluster.close()
    assert agent.returncode == 0
    assert "Traceback" not in (agent.stderr.read() if agent.stderr else "")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
