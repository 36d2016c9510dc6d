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

from bastion.authz.records import Device, DeviceCredential, DevicePosture, User
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


def dtadmin(cluster, *args):
    return subprocess.run(
        [BIN / "dtadmin", "--state", str(cluster.state_dir), *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def printed_sshd_config(cluster, tmp_path, wrap, node_name="node-1"):
    """The lines `dtadmin nodes sshd-config` prints, with the node's files where the
    test keeps them, and the helper written by `dtadmin nodes helper`."""
    helper = tmp_path / "dt-node-principals"
    dtadmin(cluster, "nodes", "helper", "--out", str(helper), "--python", sys.executable)
    files = {
        "/etc/ssh/dt_user_ca.pub": str(cluster.state_dir / "ca" / "user_ca.pub"),
        "/etc/ssh/dt_node_state.json": str(tmp_path / "dt_node_state.json"),
        "/etc/ssh/dt_revoked.krl": str(tmp_path / "dt_revoked.krl"),
        # sshd checks the command's own path; the helper is one file Python runs
        "/usr/local/bin/dt-node-principals": wrap(sys.executable, helper),
    }
    text = dtadmin(cluster, "nodes", "sshd-config", node_name)
    assert "--state /etc/ssh/dt_node_state.json" in text
    kept = []
    for line in text.splitlines():
        # the fixture's sshd already has the CA and host certificate lines
        if line.startswith(("RevokedKeys", "AuthorizedPrincipalsCommand")):
            for old, new in files.items():
                line = line.replace(old, new)
            kept.append(line)
    # the temp dir is root's alone (0700): `nobody` could not read the files in it
    return "\n".join(kept).replace("CommandUser nobody", "CommandUser root") + "\n"


def publish(cluster, tmp_path):
    dtadmin(cluster, "nodes", "publish", "--out", str(tmp_path / "dt_node_state.json"))
    dtadmin(cluster, "ca", "krl", "--out", str(tmp_path / "dt_revoked.krl"))


def test_node_follows_the_cluster_and_role_modes_with_the_printed_config(
    cluster, tmp_path, sshd_runnable
):
    """The printed sshd-config denied every certificate without device extensions even
    in `optional` mode: users without a device were locked out of every node."""
    device = cluster.store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    plain, _ = cert_for(cluster, tmp_path, "plain")
    trusted, _ = cert_for(cluster, tmp_path, "trusted", device)
    dtadmin(cluster, "nodes", "add", "node-1", "--addr", "127.0.0.1:22")
    extra = printed_sshd_config(cluster, tmp_path, sshd_runnable)
    publish(cluster, tmp_path)
    with sshd_node(tmp_path / "node", cluster, extra=extra) as node:
        # optional (the default): both log in
        accepted = direct_ssh(node, plain, tmp_path, cluster)
        assert accepted.returncode == 0 and accepted.stdout.strip() == "direct", node.log()
        assert direct_ssh(node, trusted, tmp_path, cluster).returncode == 0
        # required by the cluster: only the device's certificate
        dtadmin(cluster, "cluster", "set", "device-trust-mode", "required")
        publish(cluster, tmp_path)
        refused = direct_ssh(node, plain, tmp_path, cluster)
        assert refused.returncode == 255 and "Permission denied" in refused.stderr
        assert "does not contain an authorized principal" in node.log()
        assert direct_ssh(node, trusted, tmp_path, cluster).returncode == 0
        # optional cluster, but a role of alice's requires a device
        dtadmin(cluster, "cluster", "set", "device-trust-mode", "optional")
        dtadmin(cluster, "users", "update", "alice", "--add-roles", "require-trusted-device")
        publish(cluster, tmp_path)
        assert direct_ssh(node, plain, tmp_path, cluster).returncode == 255
        assert direct_ssh(node, trusted, tmp_path, cluster).returncode == 0
        dtadmin(cluster, "users", "update", "alice", "--remove-roles", "require-trusted-device")
        publish(cluster, tmp_path)
        assert direct_ssh(node, plain, tmp_path, cluster).returncode == 0
        # unenrolled now: its certificate is refused at the node too, whatever the mode
        from dataclasses import replace

        cluster.store.update_device(
            replace(cluster.store.get_device("SN1"), enroll_status="not_enrolled", credential=None)
        )
        publish(cluster, tmp_path)
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


def test_a_device_whose_boot_failed_is_refused_at_the_node(cluster, tmp_path, sshd_runnable):
    """Reached directly, the node held device certificates only to enrollment: one from
    a good boot kept working after the device's next login showed a tampered one, and
    one from before a checking policy kept working after it."""
    device = cluster.store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    trusted, _ = cert_for(cluster, tmp_path, "trusted", device)
    dtadmin(cluster, "nodes", "add", "node-1", "--addr", "127.0.0.1:22")
    extra = printed_sshd_config(cluster, tmp_path, sshd_runnable)
    dtadmin(cluster, "cluster", "set", "device-trust-mode", "required")
    publish(cluster, tmp_path)
    with sshd_node(tmp_path / "node", cluster, extra=extra) as node:
        assert direct_ssh(node, trusted, tmp_path, cluster).returncode == 0, node.log()
        cluster.store.put_device_posture(
            DevicePosture(device.id, verdict="withhold", reasons=("Secure Boot is off",))
        )
        publish(cluster, tmp_path)
        assert direct_ssh(node, trusted, tmp_path, cluster).returncode == 255
        assert "does not contain an authorized principal" in node.log()
        cluster.store.put_device_posture(DevicePosture(device.id, verdict="pass"))
        publish(cluster, tmp_path)
        assert direct_ssh(node, trusted, tmp_path, cluster).returncode == 0
        policy = tmp_path / "posture.yaml"
        policy.write_text("kind: posture\nspec:\n  secure_boot: true\n")
        dtadmin(cluster, "posture", "set", "-f", str(policy))
        publish(cluster, tmp_path)
        assert direct_ssh(node, trusted, tmp_path, cluster).returncode == 255
