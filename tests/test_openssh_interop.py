"""Our certificates and OpenSSH's, in both directions."""

from __future__ import annotations

import subprocess

import pytest

from bastion.authz.records import Device, DeviceCredential, User
from bastion.ca.certs import load_public_key, parse_cert
from bastion.cluster import init_cluster
from tests.sshd import LOGIN, keygen, sshd_node

CRED = DeviceCredential("cred-1", b"\x30", "tpm_ekcert", "ab" * 32)


@pytest.fixture
def cluster(tmp_path):
    c = init_cluster(tmp_path / "state", "interop")
    c.store.add_user(User("alice", ("access",), (LOGIN, "ubuntu")))
    yield c
    c.close()


def signed(cluster, tmp_path, device=None):
    key = keygen(tmp_path / "id")
    issued = cluster.ca.sign_user(
        "alice", load_public_key((tmp_path / "id.pub").read_bytes()), device=device
    )
    (tmp_path / "id-cert.pub").write_text(issued.openssh + "\n")
    return key, tmp_path / "id-cert.pub"


def test_ssh_keygen_lists_every_principal_and_extension(cluster, tmp_path):
    device = cluster.store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    _, cert = signed(cluster, tmp_path, device)
    out = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(cert)], capture_output=True, text=True, check=True
    ).stdout
    for principal in (LOGIN, "ubuntu", "-dt-jump"):
        assert f"                {principal}\n" in out
    for ext in (
        "dt-user@dt-bastion",
        "device-id@dt-bastion",
        "device-asset-tag@dt-bastion",
        "device-credential-id@dt-bastion",
        "permit-port-forwarding",
        "permit-pty",
    ):
        assert ext in out
    assert "Critical Options: (none)" in out


def test_ssh_keygen_certificates_decode_in_ours(tmp_path):
    keygen(tmp_path / "ca")
    keygen(tmp_path / "id")
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-s",
            str(tmp_path / "ca"),
            "-I",
            "kid",
            "-n",
            "root,-dt-jump",
            "-z",
            "77",
            "-V",
            "+1h",
            "-O",
            "clear",
            "-O",
            "extension:dt-user@dt-bastion=alice",
            "-O",
            "extension:device-asset-tag@dt-bastion=SN1",
            "-O",
            "extension:permit-port-forwarding",
            "-O",
            "source-address=127.0.0.1/32",
            str(tmp_path / "id.pub"),
        ],
        check=True,
    )
    parsed = parse_cert((tmp_path / "id-cert.pub").read_bytes())
    assert parsed.user == "alice" and parsed.serial == 77 and parsed.key_id == "kid"
    assert parsed.principals == ("root", "-dt-jump")
    assert parsed.extensions["device-asset-tag@dt-bastion"] == "SN1"
    assert parsed.extensions["permit-port-forwarding"] == ""
    assert parsed.critical_options == {"source-address": "127.0.0.1/32"}


@pytest.mark.integration
def test_stock_sshd_accepts_listed_principal_only(cluster, tmp_path):
    key, cert = signed(cluster, tmp_path)
    with sshd_node(tmp_path / "node", cluster) as node:
        known = tmp_path / "known_hosts"
        host_ca = (cluster.state_dir / "ca" / "host_ca.pub").read_text().strip()
        known.write_text(f"@cert-authority * {host_ca}\n")
        base = [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(node.port),
            "-i",
            str(key),
            "-o",
            f"CertificateFile={cert}",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={known}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
        ]
        ok = subprocess.run(
            [*base, f"{LOGIN}@127.0.0.1", "echo", "hi"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        # the host certificate was accepted through @cert-authority: no TOFU prompt
        assert ok.returncode == 0 and ok.stdout.strip() == "hi", ok.stderr
        other = "nobody" if LOGIN != "nobody" else "daemon"
        refused = subprocess.run(
            [*base, f"{other}@127.0.0.1", "true"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert refused.returncode == 255 and "Permission denied" in refused.stderr
        assert "not in the list of valid principals" in node.log() or "principal" in node.log()


@pytest.mark.integration
def test_ssh_refuses_a_host_certificate_from_another_ca(cluster, tmp_path):
    key, cert = signed(cluster, tmp_path)
    with sshd_node(tmp_path / "node", cluster) as node:
        keygen(tmp_path / "rogue_ca")
        known = tmp_path / "known_hosts"
        known.write_text(f"@cert-authority * {(tmp_path / 'rogue_ca.pub').read_text().strip()}\n")
        result = subprocess.run(
            [
                "ssh",
                "-F",
                "/dev/null",
                "-p",
                str(node.port),
                "-i",
                str(key),
                "-o",
                f"CertificateFile={cert}",
                "-o",
                f"UserKnownHostsFile={known}",
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                f"{LOGIN}@127.0.0.1",
                "true",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 255 and "Host key verification failed" in result.stderr
