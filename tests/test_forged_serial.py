"""A presented certificate must be the one issued under its serial.

Attack: someone holding the user CA's private key (a stolen backup, a second signer
outside the CA) signs a certificate that reuses a serial the CA really issued to the
victim, so the serial is "issued and unrevoked", but for the attacker's own public key
and with another user's device extensions. Before this change the bastion looked the
serial up and admitted it. Now the issued record (key fingerprint, user, device id)
is compared with what is presented, and the certificate is refused and audited.
"""

from __future__ import annotations

import time

import pytest

from bastion.authz.records import Device, DeviceCredential, User
from bastion.ca.certs import load_public_key, sign_user_cert, user_cert_spec
from bastion.ca.keys import load_private_key
from tests.audit_rows import messages_once
from tests.sshd import LOGIN, keygen, ssh, write_ssh_config

pytestmark = pytest.mark.integration


def enrolled(store, owner: str, tag: str) -> Device:
    cred = DeviceCredential(f"cred-{owner}", b"\x30", "tpm_ekcert", "ab" * 32)
    return store.add_device(Device("", tag, "linux", "enrolled", owner, cred))


@pytest.mark.parametrize(
    "user, device_of",
    [("alice", "alice"), ("alice", "bob"), ("bob", "bob")],
    ids=["victim-user-own-device", "victim-user-other-device", "other-user"],
)
def test_a_certificate_reusing_an_issued_serial_is_refused(
    dt_cluster, dt_node, dt_bastion, tmp_path, user, device_of
):
    store = dt_cluster.store
    store.add_user(User("alice", ("access",), (LOGIN,)))
    store.add_user(User("bob", ("access",), (LOGIN,)))
    devices = {"alice": enrolled(store, "alice", "SN-A"), "bob": enrolled(store, "bob", "SN-B")}
    # the victim's real certificate, as the CA issued and recorded it
    victim = tmp_path / "victim"
    victim.mkdir()
    keygen(victim / "id")
    issued = dt_cluster.ca.sign_user(
        "alice", load_public_key((victim / "id.pub").read_bytes()), device=devices["alice"]
    )
    serial = issued.record.serial
    # the forgery: the real CA key, read from its file outside the CA, the same serial
    ca_key = load_private_key(dt_cluster.state_dir / "ca" / "user_ca")
    forged = tmp_path / "forged"
    forged.mkdir()
    key = keygen(forged / "id")
    spec = user_cert_spec(
        user=user,
        perms=dt_cluster.ca.permissions(store.get_user("alice")),
        serial=serial,
        now=int(time.time()),
        ttl=600,
        device=devices[device_of],
    )
    cert = sign_user_cert(ca_key, load_public_key((forged / "id.pub").read_bytes()), spec)
    (forged / "id-cert.pub").write_text(cert.public_bytes().decode() + "\n")
    config = write_ssh_config(
        forged / "ssh_config",
        bastion_port=dt_bastion.port,
        key=key,
        cert=forged / "id-cert.pub",
        cluster=dt_cluster,
    )
    result = ssh(config, f"{LOGIN}@node-1", "echo", "in")
    assert result.returncode == 255 and "in" not in result.stdout, result.stdout
    expected = (
        f"certificate serial {serial} does not match the certificate issued under that serial"
        if user == "alice"
        else f"certificate serial {serial} was not issued by this cluster"
    )
    refusals = messages_once(store, "auth.failed", expected)
    assert expected in refusals, refusals
    assert not store.list_audit(type="session.start")
    # the victim's own certificate still works: the record is not spoiled by the attempt
    (victim / "id-cert.pub").write_text(issued.openssh + "\n")
    own = write_ssh_config(
        victim / "ssh_config",
        bastion_port=dt_bastion.port,
        key=victim / "id",
        cert=victim / "id-cert.pub",
        cluster=dt_cluster,
    )
    assert ssh(own, f"{LOGIN}@node-1", "true").returncode == 0
