"""What the holder of a refused certificate is told, and that nobody else is told
anything (bastion/authz/refusals.py): plain values, ``now`` passed in."""

from __future__ import annotations

import subprocess
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz import refusals
from bastion.authz.records import Lock
from tests.test_authz import NOW, certificate, facts, record_of


def test_a_good_certificate_has_nothing_to_explain():
    cert, key = certificate()
    assert refusals.reason_for_holder(cert, facts(issued=record_of(cert, key)), NOW) is None


def test_only_the_certificate_on_record_is_explained():
    """A certificate with a copied serial and user but another key, device or CA
    signature that matches no record: nothing is said about the user."""
    cert, key = certificate()
    locked = Lock("l1", "user", "alice", "laptop reported lost")
    other, _ = certificate()  # same serial and user, another key
    for issued in (None, record_of(other, ed25519.Ed25519PrivateKey.generate().public_key())):
        assert refusals.reason_for_holder(cert, facts(issued=issued, user_lock=locked), NOW) is None
    host = replace(record_of(cert, key), cert_type="host")
    assert not refusals.is_ours(cert, facts(issued=host))


def test_the_user_state_comes_first():
    cert, key = certificate()
    issued = replace(record_of(cert, key), revoked=NOW - 5)
    locked = Lock("l1", "user", "alice", "laptop reported lost")
    told = refusals.reason_for_holder(cert, facts(issued=issued, user_lock=locked), NOW)
    assert told == refusals.Refusal('user "alice" is locked: laptop reported lost')
    gone = replace(facts(issued=issued), user=None)
    told = refusals.reason_for_holder(cert, gone, NOW)
    assert told is not None and 'user "alice" does not exist' in told.message


def test_revoked_rotated_expired_and_early_say_when_and_what_to_do():
    cert, key = certificate()
    issued = record_of(cert, key)
    revoked = refusals.reason_for_holder(
        cert, facts(issued=replace(issued, revoked=1_799_999_000.0)), NOW
    )
    assert revoked is not None
    assert revoked.message == (
        "certificate serial 7 was revoked at 2027-01-15 07:43:20 UTC (run: dtclient login)"
    )
    rotated = refusals.reason_for_holder(
        cert, replace(facts(issued=issued), user_ca_fingerprint="SHA256:new"), NOW
    )
    assert rotated is not None and "user CA was rotated" in rotated.message
    expired = refusals.reason_for_holder(cert, facts(issued=issued), cert.valid_before + 1)
    assert expired is not None
    assert expired.message == "certificate expired at 2027-01-15 08:10:00 UTC (run: dtclient login)"
    early = refusals.reason_for_holder(cert, facts(issued=issued), cert.valid_after - 1)
    assert early is not None and "not valid before 2027-01-15 07:59:00 UTC" in early.message


def test_only_a_signature_by_the_certificates_key_over_this_session_proves_it(tmp_path):
    """The banner waits for this proof (BastionServer._proves_key)."""
    from types import SimpleNamespace

    import asyncssh
    from asyncssh.packet import String

    from bastion.proxy.server import BastionServer
    from tests.sshd import keygen

    ca, key, other = (keygen(tmp_path / n) for n in ("ca", "id", "other"))
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ca), "-I", "x", "-n", "-dt-jump", str(key) + ".pub"],
        check=True,
    )
    blob = asyncssh.read_certificate(f"{key}-cert.pub").public_data
    server = BastionServer.__new__(BastionServer)
    server.conn = SimpleNamespace(_session_id=b"this session")
    msg = b"userauth request"

    def signed(path, session=b"this session"):
        return asyncssh.read_private_key(path).sign(String(session) + msg, b"ssh-ed25519")

    assert server._proves_key(blob, msg, signed(key))
    assert not server._proves_key(blob, msg, signed(other))
    assert not server._proves_key(blob, msg, signed(key, b"another session"))
    assert not server._proves_key(blob, msg, b"garbage")
    assert not server._proves_key(b"garbage", msg, signed(key))
