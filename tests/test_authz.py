"""The decision core, with plain values: no store, no sockets, ``now`` passed in."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import ssh

from bastion.authz import decide
from bastion.authz.facts import Facts
from bastion.authz.rbac import PRESET_ROLES
from bastion.authz.records import Device, DeviceCredential, IssuedCert, Lock, Node, User
from bastion.protocol.certs import JUMP_PRINCIPAL, fingerprint, parse_cert
from bastion.protocol.errors import AccessDenied, DeviceNotTrusted

NOW = 1_800_000_000.0
CA = ed25519.Ed25519PrivateKey.generate()
ROLES = {r.name: r for r in PRESET_ROLES}
NODE = Node("node-1", "10.0.0.5", 22, {"env": "prod"})
CRED = DeviceCredential("cred-1", b"der", "tpm_ekcert", "ekhash")
DEVICE = Device("dev-1", "SN1", "linux", "enrolled", "alice", CRED)


def certificate(*, serial=7, user="alice", device=None, key=None, ca=CA):
    key = key or ed25519.Ed25519PrivateKey.generate().public_key()
    exts = {"permit-port-forwarding": "", "dt-user@dt-bastion": user}
    if device is not None:
        exts |= {
            "device-id@dt-bastion": device.id,
            "device-asset-tag@dt-bastion": device.asset_tag,
            "device-credential-id@dt-bastion": device.credential.id,
        }
    builder = (
        ssh.SSHCertificateBuilder()
        .public_key(key)
        .type(ssh.SSHCertificateType.USER)
        .serial(serial)
        .key_id(f"{user}-{serial}".encode())
        .valid_principals([b"root", JUMP_PRINCIPAL.encode()])
        .valid_after(int(NOW) - 60)
        .valid_before(int(NOW) + 600)
    )
    for name in sorted(exts):
        builder = builder.add_extension(name.encode(), exts[name].encode())
    return parse_cert(builder.sign(ca).public_bytes()), key


def record_of(cert, key, device=None):
    return IssuedCert(
        cert.serial,
        cert.key_id,
        cert.user or "",
        "user",
        cert.principals,
        cert.valid_after,
        cert.valid_before,
        fingerprint(key),
        device_id=device.id if device else None,
    )


def facts(*, roles=("access",), mode="optional", issued=None, device=None, **kw):
    user = User("alice", tuple(roles), ("root",), password_hash="h1")
    return Facts(
        cluster_mode=mode,
        user_ca_fingerprint=fingerprint(CA.public_key()),
        user=user,
        roles=tuple(ROLES.get(name) for name in roles),
        issued=issued,
        device=device,
        **kw,
    )


def test_a_certificate_matching_its_record_is_admitted():
    cert, key = certificate()
    claims = decide.check_certificate(cert, facts(issued=record_of(cert, key)), NOW)
    assert claims.user == "alice" and claims.serial == 7


def test_a_certificate_reusing_an_issued_serial_with_another_key_is_refused():
    """Signed with the real CA key outside the CA: same serial and user, another key."""
    cert, key = certificate()
    forged, _ = certificate()
    with pytest.raises(AccessDenied, match="does not match the certificate issued"):
        decide.check_certificate(forged, facts(issued=record_of(cert, key)), NOW)


def test_a_reused_serial_cannot_add_another_users_device():
    cert, key = certificate()
    bobs = replace(DEVICE, id="dev-bob", asset_tag="BOB1", owner="bob")
    forged, _ = certificate(device=bobs, key=key)
    with pytest.raises(AccessDenied, match="does not match"):
        decide.check_certificate(forged, facts(issued=record_of(cert, key)), NOW)


def test_an_unknown_role_grants_nothing_and_requires_a_device():
    cert, key = certificate()
    f = facts(roles=("access", "ghost"), issued=record_of(cert, key))
    assert decide.trust_mode(f) == "required"
    with pytest.raises(AccessDenied, match="ghost"):
        decide.check_user(f, NOW, "alice")
    with pytest.raises(AccessDenied, match="ghost"):
        decide.check_certificate(cert, f, NOW)
    with pytest.raises(AccessDenied, match="ghost"):
        decide.node_principals(
            "root",
            cert,
            ca_fingerprints={fingerprint(CA.public_key())},
            require_device=False,
            facts=f,
            now=NOW,
        )


def test_a_rotated_ca_ends_a_connection():
    cert, key = certificate()
    claims = decide.claims_of(cert)
    f = replace(facts(issued=record_of(cert, key)), user_ca_fingerprint="SHA256:new")
    with pytest.raises(AccessDenied, match="rotated"):
        decide.check_cert_connection(claims, f, NOW)


def test_a_password_connection_ends_when_the_password_changes():
    decide.check_password_connection("alice", "h1", facts(), NOW)
    with pytest.raises(AccessDenied, match="changed or reset"):
        decide.check_password_connection("alice", "h0", facts(), NOW)
    locked = facts(user_lock=Lock("l1", "user", "alice", "laptop reported lost"))
    with pytest.raises(AccessDenied, match="laptop reported lost"):
        decide.check_password_connection("alice", "h1", locked, NOW)


def test_an_expired_lock_no_longer_counts():
    old = Lock("l1", "user", "alice", expires=NOW - 1)
    decide.check_user(facts(user_lock=old), NOW, "alice")


def test_node_helper_refuses_a_device_re_enrolled_since_issuance():
    """The copy in node_principals had no credential-id check; the core has one rule."""
    cert, key = certificate(device=DEVICE)
    re_enrolled = replace(DEVICE, credential=replace(CRED, id="cred-2"))
    f = facts(issued=record_of(cert, key, DEVICE), device=re_enrolled)
    with pytest.raises(DeviceNotTrusted, match="re-enrolled"):
        decide.node_principals(
            "root",
            cert,
            ca_fingerprints={fingerprint(CA.public_key())},
            require_device=True,
            facts=f,
            now=NOW,
        )
    with pytest.raises(DeviceNotTrusted, match="re-enrolled"):
        decide.check_node_access(
            decide.claims_of(cert), replace(f, cluster_mode="required"), NODE, NOW
        )


def test_device_login_needs_the_stored_credential():
    f = facts(device=DEVICE)
    assert decide.check_device_login(DEVICE, "alice", "cred-1", f, NOW) == DEVICE
    with pytest.raises(DeviceNotTrusted, match="re-enrolled"):
        decide.check_device_login(DEVICE, "alice", "cred-0", f, NOW)
    with pytest.raises(DeviceNotTrusted, match="another user"):
        decide.check_device_login(DEVICE, "bob", "cred-1", f, NOW)
    locked = facts(device=DEVICE, device_lock=Lock("l", "device", "SN1"))
    with pytest.raises(DeviceNotTrusted, match="locked"):
        decide.check_device_login(DEVICE, "alice", "cred-1", locked, NOW)


def test_a_certificate_naming_a_device_is_held_to_it_in_optional_mode_too():
    """Unenrolling a stolen laptop must end its certificates whatever the mode."""
    cert, key = certificate(device=DEVICE)
    claims = decide.claims_of(cert)
    issued = record_of(cert, key, DEVICE)
    decide.check_node_access(claims, facts(issued=issued, device=DEVICE), NODE, NOW)
    unenrolled = replace(DEVICE, enroll_status="not_enrolled", credential=None)
    with pytest.raises(DeviceNotTrusted, match="not enrolled"):
        decide.check_node_access(claims, facts(issued=issued, device=unenrolled), NODE, NOW)
    plain, plain_key = certificate()
    decide.check_node_access(  # a plain certificate in optional mode: no device needed
        decide.claims_of(plain), facts(issued=record_of(plain, plain_key)), NODE, NOW
    )
