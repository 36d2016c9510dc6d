"""dt-node-principals: the node-side device-trust decision, pure and via its CLI."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz.records import Device, DeviceCredential, Lock, User
from bastion.ca.certs import parse_cert
from bastion.cluster import init_cluster
from bastion.node_principals import decide, main

CRED = DeviceCredential("cred-1", b"\x30", "tpm_ekcert", "ab" * 32)


@pytest.fixture
def cluster(tmp_path):
    c = init_cluster(tmp_path / "state", "test")
    c.store.add_user(User("alice", ("access",), ("root",)))
    yield c
    c.close()


def sign(cluster, device=None):
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return parse_cert(cluster.ca.sign_user("alice", key, device=device).openssh.encode())


def fps(cluster):
    return {cluster.ca.user_ca_fingerprint}


def test_device_cert_accepted_plain_refused(cluster):
    device = cluster.store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    good = decide("root", sign(cluster, device), ca_fingerprints=fps(cluster), require_device=True)
    assert good.principals == ("root",)
    plain = decide("root", sign(cluster), ca_fingerprints=fps(cluster), require_device=True)
    assert plain.principals == () and "no device extensions" in plain.reason
    optional = decide("root", sign(cluster), ca_fingerprints=fps(cluster), require_device=False)
    assert optional.principals == ("root",)


def test_wrong_login_and_wrong_ca(cluster):
    cert = sign(cluster)
    assert decide("bob", cert, ca_fingerprints=fps(cluster), require_device=False).principals == ()
    other = decide("root", cert, ca_fingerprints={"SHA256:other"}, require_device=False)
    assert "untrusted CA" in other.reason


def test_state_check_sees_unenrollment_and_locks(cluster):
    store = cluster.store
    device = store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    cert = sign(cluster, device)
    kw = dict(ca_fingerprints=fps(cluster), require_device=True, store=store)
    assert decide("root", cert, **kw).principals == ("root",)
    store.add_lock(Lock("", "device", "SN1"))
    assert "locked" in decide("root", cert, **kw).reason
    store.remove_locks_for("device", "SN1")
    store.update_device(
        Device(device.id, "SN1", "linux", "not_enrolled", "alice", None, created=device.created)
    )
    assert "not enrolled" in decide("root", cert, **kw).reason


def test_state_check_sees_a_re_enrolled_device_as_the_bastion_does(cluster):
    """The helper's own copy of the device check had no credential-id check: a
    certificate for a device re-enrolled since (a new credential) was accepted here and
    refused at the bastion. Both now call the one rule in bastion.authz.decide."""
    from dataclasses import replace

    store = cluster.store
    device = store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    cert = sign(cluster, device)
    kw = dict(ca_fingerprints=fps(cluster), require_device=True, store=store)
    assert decide("root", cert, **kw).principals == ("root",)
    store.update_device(replace(store.get_device("SN1"), credential=replace(CRED, id="cred-2")))
    refused = decide("root", cert, **kw)
    assert refused.principals == () and "re-enrolled" in refused.reason


def test_cli_prints_login_or_nothing(cluster, capsys):
    ca_pub = cluster.state_dir / "ca" / "user_ca.pub"
    device = cluster.store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    for dev, expected in ((device, "root\n"), (None, "")):
        key = ed25519.Ed25519PrivateKey.generate().public_key()
        line = cluster.ca.sign_user("alice", key, device=dev).openssh.split()
        assert main(["--ca", str(ca_pub), "root", line[0], line[1]]) == 0
        assert capsys.readouterr().out == expected


@pytest.mark.parametrize(
    "args",
    [
        ["root", "ssh-ed25519", "AAAA"],
        ["root", "ssh-ed25519-cert-v01@openssh.com", "!!notbase64"],
        ["root", "ssh-ed25519-cert-v01@openssh.com", base64.b64encode(b"junk").decode()],
    ],
)
def test_cli_garbage_is_denied_without_traceback(cluster, args):
    ca_pub = cluster.state_dir / "ca" / "user_ca.pub"
    proc = subprocess.run(
        [sys.executable, "-m", "bastion.node_principals", "--ca", str(ca_pub), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout == ""
    assert "denied" in proc.stderr and "Traceback" not in proc.stderr
