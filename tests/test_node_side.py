"""Node-side enforcement with a real sshd (dt-node-principals, KRL) and the PROXY protocol."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import pytest

from bastion.authz.records import Device, DeviceCredential, User
from bastion.ca.certs import load_public_key
from bastion.cluster import init_cluster
from bastion.proxy import proxyproto
from tests.sshd import LOGIN, bastion_server, keygen, sshd_node

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
CRED = DeviceCredential("cred-1", b"\x30", "tpm_ekcert", "ab" * 32)


@pytest.fixture
def cluster(tmp_path):
    c = init_cluster(tmp_path / "state", "node-side")
    c.store.add_user(User("alice", ("access",), (LOGIN,)))
    yield c
    c.close()


def cert_for(cluster, tmp_path, name, device=None):
    key = keygen(tmp_path / name)
    issued = cluster.ca.sign_user(
        "alice", load_public_key((tmp_path / f"{name}.pub").read_bytes()), device=device
    )
    (tmp_path / f"{name}-cert.pub").write_text(issued.openssh + "\n")
    return key, issued


def _skip_unless_sshd_would_run(command: Path) -> None:
    """sshd runs the command only if every directory above it is root's and not writable
    by others; a checkout under /tmp fails that, through no fault of ours."""
    import os
    import stat

    for parent in command.parents:
        st = os.stat(parent)
        if st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o022:
            pytest.skip(f"sshd would refuse a principals command under {parent}")


def direct_ssh(node, key, tmp_path, cluster):
    known = tmp_path / "known_hosts"
    known.write_text(
        f"@cert-authority * {(cluster.state_dir / 'ca' / 'host_ca.pub').read_text().strip()}\n"
    )
    return subprocess.run(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(node.port),
            "-i",
            str(key),
            "-o",
            f"CertificateFile={key}-cert.pub",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={known}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            f"{LOGIN}@127.0.0.1",
            "echo",
            "direct",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_node_refuses_direct_logins_without_device_extensions(cluster, tmp_path):
    device = cluster.store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    plain, _ = cert_for(cluster, tmp_path, "plain")
    trusted, _ = cert_for(cluster, tmp_path, "trusted", device)
    ca = cluster.state_dir / "ca" / "user_ca.pub"
    command = BIN / "dt-node-principals"
    _skip_unless_sshd_would_run(command)
    extra = (
        f"AuthorizedPrincipalsCommand {command} --ca {ca} --state {cluster.state_dir} %u %t %k\n"
        "AuthorizedPrincipalsCommandUser root\n"
    )
    with sshd_node(tmp_path / "node", cluster, extra=extra) as node:
        refused = direct_ssh(node, plain, tmp_path, cluster)
        assert refused.returncode == 255 and "Permission denied" in refused.stderr
        accepted = direct_ssh(node, trusted, tmp_path, cluster)
        assert accepted.returncode == 0 and accepted.stdout.strip() == "direct", accepted.stderr
        # unenrolled now: refused at the node too (it reads the cluster state)
        from dataclasses import replace

        cluster.store.update_device(
            replace(cluster.store.get_device("SN1"), enroll_status="not_enrolled", credential=None)
        )
        assert direct_ssh(node, trusted, tmp_path, cluster).returncode == 255
        assert "does not contain an authorized principal" in node.log()


def test_krl_revokes_a_certificate_at_the_node(cluster, tmp_path):
    key, issued = cert_for(cluster, tmp_path, "alice")
    krl = tmp_path / "revoked.krl"
    subprocess.run(
        [BIN / "dtadmin", "--state", str(cluster.state_dir), "ca", "krl", "--out", str(krl)],
        check=True,
        capture_output=True,
    )
    with sshd_node(tmp_path / "node", cluster, extra=f"RevokedKeys {krl}\n") as node:
        assert direct_ssh(node, key, tmp_path, cluster).returncode == 0
        cluster.store.revoke_cert(issued.record.serial, time.time())
        subprocess.run(
            [BIN / "dtadmin", "--state", str(cluster.state_dir), "ca", "krl", "--out", str(krl)],
            check=True,
            capture_output=True,
        )
        result = direct_ssh(node, key, tmp_path, cluster)
        assert result.returncode == 255
        assert "revoked" in node.log().lower()


# -- the PROXY protocol ---------------------------------------------------------------------------


async def _hello_through(port: int, header: bytes, key_path: Path) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(header)
    try:
        conn = await asyncssh.connect(
            "127.0.0.1",  # named: a socket the bastion already reset has no peer to ask
            port,
            sock=sock,
            username="dt",
            known_hosts=None,
            agent_path=None,
            config=None,
            client_keys=[str(key_path)],
            connect_timeout=10,
        )
        conn.close()
    except (asyncssh.Error, OSError):
        pass


@pytest.mark.parametrize("build", [proxyproto.build_v1, proxyproto.build_v2], ids=["v1", "v2"])
def test_proxy_header_from_a_trusted_balancer(cluster, tmp_path, build):
    config = tmp_path / "bastion.toml"
    config.write_text('[bastion]\nproxy_protocol_from = ["127.0.0.0/8"]\n')
    key = keygen(tmp_path / "plainkey")
    with bastion_server(cluster.state_dir, extra_args=("--config", str(config))) as bastion:
        header = build(("203.0.113.7", 50000), ("127.0.0.1", bastion.port))
        asyncio.run(_hello_through(bastion.port, header, key))
    events = cluster.store.list_audit(type="auth.failed")
    assert events and events[-1].remote_addr == "203.0.113.7"


def test_proxy_header_from_an_untrusted_sender_is_refused(cluster, tmp_path):
    config = tmp_path / "bastion.toml"
    config.write_text('[bastion]\nproxy_protocol_from = ["10.99.0.0/16"]\n')
    key = keygen(tmp_path / "plainkey")
    with bastion_server(cluster.state_dir, extra_args=("--config", str(config))) as bastion:
        header = proxyproto.build_v1(("203.0.113.7", 50000), ("127.0.0.1", bastion.port))
        asyncio.run(_hello_through(bastion.port, header, key))
        time.sleep(0.2)
    events = cluster.store.list_audit(type="auth.failed")
    refused = [e for e in events if "not a trusted load balancer" in e.message]
    assert refused and refused[-1].remote_addr == "127.0.0.1"
    assert not any(e.remote_addr == "203.0.113.7" for e in cluster.store.list_audit())
