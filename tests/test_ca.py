"""The CA: signing policy, key files, and what is recorded with each certificate."""

from __future__ import annotations

import os
import stat
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz.rbac import Permissions
from bastion.authz.records import Device, DeviceCredential, Lock, Role, User
from bastion.ca import keys
from bastion.ca.certs import (
    EXT_ASSET_TAG,
    EXT_CREDENTIAL_ID,
    EXT_DEVICE_ID,
    EXT_USER,
    load_public_key,
    parse_cert,
    user_cert_spec,
)
from bastion.cluster import Cluster, init_cluster
from bastion.protocol.certs import JUMP_PRINCIPAL
from bastion.protocol.errors import (
    AccessDenied,
    AlreadyExists,
    CertificateError,
    DeviceNotTrusted,
    StateError,
)

PERMS = Permissions(("root",), 3600, "optional", True, True, False, False, False)
CRED = DeviceCredential("cred-1", b"\x30", "tpm_ekcert", "ab" * 32)


def enrolled(owner="alice", tag="SN1"):
    return Device("dev-1", tag, "linux", "enrolled", owner, CRED)


@pytest.fixture
def cluster(tmp_path):
    c = init_cluster(tmp_path / "state", "test")
    c.store.add_user(User("alice", ("access",), ("root", "ubuntu")))
    yield c
    c.close()


def user_key():
    return ed25519.Ed25519PrivateKey.generate().public_key()


# -- pure policy ------------------------------------------------------------------------


def test_spec_principals_ttl_and_backdating():
    spec = user_cert_spec(user="alice", perms=PERMS, serial=5, now=1000, ttl=99999)
    assert spec.principals == ("root", JUMP_PRINCIPAL)
    assert spec.valid_after == 1000 - 60 and spec.valid_before == 1000 + 3600
    assert spec.extensions[EXT_USER] == "alice"
    assert "permit-port-forwarding" in spec.extensions
    assert "permit-agent-forwarding" not in spec.extensions
    assert not any(k.startswith("device-") for k in spec.extensions)


def test_spec_device_extensions_come_from_the_record():
    spec = user_cert_spec(user="alice", perms=PERMS, serial=5, now=1000, device=enrolled())
    assert spec.extensions[EXT_DEVICE_ID] == "dev-1"
    assert spec.extensions[EXT_ASSET_TAG] == "SN1"
    assert spec.extensions[EXT_CREDENTIAL_ID] == "cred-1"


def test_spec_refuses_unenrolled_device_and_odd_values():
    with pytest.raises(CertificateError, match="not enrolled"):
        user_cert_spec(
            user="alice",
            perms=PERMS,
            serial=1,
            now=0,
            device=Device("d", "SN1", "linux", "not_enrolled"),
        )
    with pytest.raises(CertificateError):
        user_cert_spec(user="alice\x00permit-pty", perms=PERMS, serial=1, now=0)
    with pytest.raises(CertificateError):
        user_cert_spec(user="alice", perms=PERMS, serial=1, now=0, device=enrolled(tag="a b"))


def test_parse_refuses_garbage_and_plain_keys():
    with pytest.raises(CertificateError, match="malformed"):
        parse_cert(b"ssh-ed25519-cert-v01@openssh.com AAAA")
    with pytest.raises(CertificateError, match="plain public key"):
        parse_cert(keys.public_line(user_key()).encode())
    with pytest.raises(CertificateError, match="too large"):
        parse_cert(b"x" * 20000)


def test_every_truncation_of_a_certificate_is_refused(cluster):
    blob = cluster.ca.sign_user("alice", user_key()).openssh.encode()
    parts = blob.split()
    import base64

    raw = base64.b64decode(parts[1])
    for cut in range(0, len(raw), 7):
        line = parts[0] + b" " + base64.b64encode(raw[:cut])
        with pytest.raises(CertificateError):
            parse_cert(line)


def test_tampered_certificate_fails_signature(cluster):
    import base64

    blob = cluster.ca.sign_user("alice", user_key()).openssh.encode().split()
    raw = bytearray(base64.b64decode(blob[1]))
    raw[-80] ^= 1  # inside the signed body, before the signature
    with pytest.raises(CertificateError):
        parse_cert(blob[0] + b" " + base64.b64encode(bytes(raw)))


def test_load_public_key_refuses_weak_and_garbage():
    with pytest.raises(CertificateError):
        load_public_key(b"not a key")


# -- the authority ------------------------------------------------------------------------


def test_sign_records_serial_and_audit(cluster):
    issued = cluster.ca.sign_user("alice", user_key(), ttl=600, remote_addr="10.0.0.9")
    parsed = parse_cert(issued.openssh.encode())
    assert parsed.ca_fingerprint == cluster.ca.user_ca_fingerprint
    assert parsed.principals == ("root", "ubuntu", JUMP_PRINCIPAL)
    assert parsed.valid_before - parsed.valid_after == 660
    assert cluster.store.find_cert(parsed.serial).user == "alice"
    event = cluster.store.list_audit(type="cert.create")[-1]
    assert event.success and event.remote_addr == "10.0.0.9"
    assert event.fields["serial"] == str(parsed.serial)


def test_role_ttl_caps_the_certificate(cluster):
    cluster.store.put_role(Role("short", max_session_ttl=300))
    cluster.store.update_user(User("alice", ("access", "short"), ("root",)))
    parsed = parse_cert(cluster.ca.sign_user("alice", user_key(), ttl=3600).openssh.encode())
    assert parsed.valid_before - parsed.valid_after == 360


def test_unknown_and_locked_users_are_refused_and_audited(cluster):
    with pytest.raises(AccessDenied, match="does not exist"):
        cluster.ca.sign_user("mallory", user_key())
    cluster.store.add_lock(Lock("", "user", "alice", "left the company"))
    with pytest.raises(AccessDenied, match="left the company"):
        cluster.ca.sign_user("alice", user_key())
    denied = [e for e in cluster.store.list_audit(type="cert.create") if not e.success]
    assert [e.user for e in denied] == ["mallory", "alice"]
    assert cluster.store.list_certs() == []


def test_device_must_be_enrolled_owned_and_unlocked(cluster):
    store = cluster.store
    mine = store.add_device(enrolled())
    parsed = parse_cert(cluster.ca.sign_user("alice", user_key(), device=mine).openssh.encode())
    assert parsed.device_extensions[EXT_ASSET_TAG] == "SN1"
    theirs = store.add_device(Device("", "SN2", "linux", "enrolled", "bob", CRED))
    with pytest.raises(DeviceNotTrusted, match="another user"):
        cluster.ca.sign_user("alice", user_key(), device=theirs)
    store.add_lock(Lock("", "device", "SN1"))
    with pytest.raises(DeviceNotTrusted, match="locked"):
        cluster.ca.sign_user("alice", user_key(), device=mine)


def test_unknown_role_is_refused_not_a_grant(cluster):
    """One rule for an unknown role everywhere (authz.decide.check_user): deny."""
    cluster.store.update_user(User("alice", ("ghost",), ("root",)))
    with pytest.raises(AccessDenied, match="ghost"):
        cluster.ca.sign_user("alice", user_key())


def test_host_certificate(cluster):
    issued = cluster.ca.sign_host(user_key(), ("node-1", "10.0.0.1"))
    parsed = parse_cert(issued.openssh.encode())
    assert parsed.cert_type == "host" and parsed.principals == ("node-1", "10.0.0.1")
    assert parsed.ca_fingerprint == cluster.ca.host_ca_fingerprint


# -- key files ------------------------------------------------------------------------------


def test_ca_keys_are_private(cluster):
    for name in (keys.USER_CA, keys.HOST_CA):
        mode = stat.S_IMODE(os.stat(keys.ca_dir(cluster.state_dir) / name).st_mode)
        assert mode == 0o600
    assert stat.S_IMODE(os.stat(cluster.state_dir / "cluster.db").st_mode) == 0o600


def test_init_refuses_existing_cluster(cluster):
    with pytest.raises(AlreadyExists, match="refusing to overwrite"):
        init_cluster(cluster.state_dir, "again")


def test_open_refuses_readable_or_corrupt_ca_key(cluster):
    path = keys.ca_dir(cluster.state_dir) / keys.USER_CA
    os.chmod(path, 0o644)
    with pytest.raises(StateError, match="chmod 600"):
        Cluster.open(cluster.state_dir)
    os.chmod(path, 0o600)
    path.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n")
    with pytest.raises(StateError, match="corrupt"):
        Cluster.open(cluster.state_dir)
    path.unlink()
    with pytest.raises(StateError, match="missing"):
        Cluster.open(cluster.state_dir)


def test_bastion_host_cert_is_made_once_and_renewed_when_needed(cluster):
    path = cluster.ensure_bastion_host_cert(("localhost",))
    first = path.read_bytes()
    assert cluster.ensure_bastion_host_cert(("localhost",)).read_bytes() == first
    assert cluster.ensure_bastion_host_cert(("localhost", "bastion")).read_bytes() != first


def test_a_renewal_is_decided_again_inside_the_signing_transaction(cluster):
    """The bastion re-checks a connection's credential before it asks; a revocation
    committing in the milliseconds after that must not get a fresh certificate out."""
    from bastion.ca.authority import UserCertRequest

    first = cluster.ca.sign_user("alice", user_key())
    serial = first.record.serial
    cluster.store.revoke_certs(time.time(), serials=(serial,))
    with pytest.raises(AccessDenied, match="revoked"):
        cluster.ca.sign(UserCertRequest("alice", user_key(), renewal_of=serial))
    with pytest.raises(AccessDenied, match="not issued"):
        cluster.ca.sign(UserCertRequest("alice", user_key(), renewal_of=12345))


def test_a_password_request_is_refused_once_the_password_changed(cluster):
    from bastion.ca.authority import UserCertRequest

    cluster.store.set_user_secrets("alice", "hash-now", "SECRET", None)
    cluster.ca.sign(UserCertRequest("alice", user_key(), password_hash="hash-now"))
    with pytest.raises(AccessDenied, match="changed or reset"):
        cluster.ca.sign(UserCertRequest("alice", user_key(), password_hash="hash-before"))
