"""Enrollment and device authentication with real software TPMs, and real attacks on them.

The bastion side runs in-process (the ceremony objects over a real SQLite store);
messages go through the wire encoder and strict decoder in both directions, as they
would over dt-api.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPMT_SIGNATURE

from bastion.authz.records import Device, User
from bastion.enroll import attest
from bastion.enroll.authn import DeviceAuthentication
from bastion.enroll.ceremony import EnrollmentCeremony, EnrollPolicy, device_view
from bastion.enroll.tokens import issue_enroll_token
from bastion.protocol import wire
from bastion.protocol.errors import (
    AccessDenied,
    AKInvalid,
    CredentialMismatch,
    DeviceNotTrusted,
    EKUntrusted,
    MalformedTPMData,
    NonceMismatch,
    ProtocolError,
    QuoteSignatureInvalid,
    TokenInvalid,
)
from bastion.storage import Store
from client import ceremony as client_ceremony
from client.profile import DeviceState
from client.tpm import AK_ATTRIBUTES, TPM

pytestmark = pytest.mark.integration


def through_wire(msg):
    return wire.decode(wire.encode(msg))


class LocalSession:
    """The client's view of dt-api, answered in-process by a server-side ceremony."""

    def __init__(self, server: EnrollmentCeremony) -> None:
        self.server = server
        self.sent: list = []

    async def call(self, msg, expect):
        msg = through_wire(msg)
        self.sent.append(msg)
        if isinstance(msg, wire.EnrollBegin):
            answer = self.server.begin(msg)
        else:
            answer = wire.Enrolled(device=device_view(self.server.finish(msg)))
        answer = through_wire(answer)
        assert isinstance(answer, expect)
        return answer


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "state", create=True)
    s.set_setting("cluster_name", "t")
    from bastion.authz.rbac import PRESET_ROLES

    for role in PRESET_ROLES:
        s.put_role(role)
    s.add_user(User("alice", ("access", "editor"), ("root",)))
    s.add_user(User("bob", ("access",), ("root",)))
    yield s
    s.close()


def enroll(
    store, tpm_tcti, ak_dir, *, user="alice", token=None, current=False, tag="SN1", policy=None
):
    server = EnrollmentCeremony(store, user, policy=policy or EnrollPolicy())
    session = LocalSession(server)
    with TPM.open(tpm_tcti) as tpm:
        device = asyncio.run(
            client_ceremony.enroll(
                session, tpm, ak_dir, token=token, current_device=current, tag_override=tag
            )
        )
    return device, session


def denials(store):
    return [e for e in store.list_audit(type="device.enroll") if not e.success]


# -- the ceremony works ----------------------------------------------------------------------


def test_enroll_with_token(store, swtpm, tmp_path):
    store.add_device(Device("", "SN1", "linux"))
    token = issue_enroll_token(store, "SN1", actor="admin")
    device, _ = enroll(store, swtpm.tcti, tmp_path / "ak", token=token)
    assert device["enroll_status"] == "enrolled" and device["owner"] == "alice"
    record = store.get_device("SN1")
    assert record.enrolled and record.credential.attestation_type == "tpm_ekcert"
    assert record.credential.ak_public == (tmp_path / "ak" / "ak.pub").read_bytes()
    assert store.list_tokens("enroll")[0].consumed is not None
    assert store.list_audit(type="device.enroll")[-1].success


def test_enroll_current_device_needs_the_right_role(store, swtpm, tmp_path):
    device, _ = enroll(store, swtpm.tcti, tmp_path / "ak", current=True, tag="LAPTOP-7")
    assert device["asset_tag"] == "LAPTOP-7"
    with pytest.raises(AccessDenied, match="editor or device-admin"):
        enroll(store, swtpm.tcti, tmp_path / "ak2", user="bob", current=True, tag="LAPTOP-8")
    assert "editor or device-admin" in denials(store)[-1].message


def test_trusted_ek_with_configured_roots(store, swtpm, tmp_path):
    roots = attest.load_trust_roots(
        [swtpm.provisioned.root_pem.read_bytes(), swtpm.provisioned.issuer_pem.read_bytes()]
    )
    policy = EnrollPolicy(tuple(roots), require_trusted_ek=True)
    enroll(store, swtpm.tcti, tmp_path / "ak", current=True, policy=policy)
    assert store.get_device("SN1").credential.attestation_type == "tpm_ekcert_trusted"


def test_tss_logs_stay_off_the_terminal(swtpm, tmp_path, capfd):
    with TPM.open(swtpm.tcti) as tpm:
        tpm.endorsement()
        tpm.load_or_create_ak(tmp_path / "ak")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_ak_blob_is_reused(swtpm, tmp_path):
    with TPM.open(swtpm.tcti) as tpm:
        first = tpm.load_or_create_ak(tmp_path / "ak")
    with TPM.open(swtpm.tcti) as tpm:
        assert tpm.load_or_create_ak(tmp_path / "ak") == first
    assert oct((tmp_path / "ak" / "ak.priv").stat().st_mode & 0o777) == "0o600"


# -- token refusals ----------------------------------------------------------------------------


def test_reused_expired_unknown_and_foreign_tokens(store, swtpm, tmp_path):
    store.add_device(Device("", "SN1", "linux"))
    store.add_device(Device("", "SN2", "linux"))
    token = issue_enroll_token(store, "SN1")
    enroll(store, swtpm.tcti, tmp_path / "ak", token=token)
    with pytest.raises(TokenInvalid, match="already used"):
        enroll(store, swtpm.tcti, tmp_path / "ak", token=token)
    other = issue_enroll_token(store, "SN2")
    with pytest.raises(TokenInvalid, match='is for device "SN2"'):
        enroll(store, swtpm.tcti, tmp_path / "ak", token=other, tag="SN1")
    expired = issue_enroll_token(store, "SN2", ttl=1, now=0)
    with pytest.raises(TokenInvalid, match="expired"):
        enroll(store, swtpm.tcti, tmp_path / "ak", token=expired, tag="SN2")
    with pytest.raises(TokenInvalid, match="not valid"):
        enroll(store, swtpm.tcti, tmp_path / "ak", token="A" * 43, tag="SN2")
    with pytest.raises(TokenInvalid, match="cut off"):
        enroll(store, swtpm.tcti, tmp_path / "ak", token=other[:20], tag="SN2")
    assert len(denials(store)) >= 5


def test_two_enrollments_racing_on_one_token(store, swtpm, attacker_swtpm, tmp_path):
    """Both pass step 1; exactly one can spend the token in step 2."""
    store.add_device(Device("", "SN1", "linux"))
    token = issue_enroll_token(store, "SN1")
    state_dir = store.path.parent
    results: list = []
    barrier = threading.Barrier(2)

    def racer(tcti, ak_dir):
        own = Store.open(state_dir)
        server = EnrollmentCeremony(own, "alice", policy=EnrollPolicy())
        with TPM.open(tcti) as tpm:
            ek = tpm.endorsement()
            ak = tpm.load_or_create_ak(ak_dir)
            begin = wire.EnrollBegin(
                device_data={"asset_tag": "SN1", "os_type": "linux"},
                ek_public=ek.public,
                ek_public_der=ek.public_der,
                ek_cert_der=ek.cert_der,
                ak_public=ak,
                token=token,
            )
            challenge = server.begin(begin)
            secret = tpm.activate_credential(
                ak_dir, challenge.credential_blob, challenge.encrypted_secret
            )
            quote = tpm.quote(ak_dir, challenge.nonce)
        barrier.wait()
        try:
            server.finish(
                wire.EnrollFinish(
                    secret=secret,
                    attest=quote.attest,
                    signature=quote.signature,
                    pcr_select=list(quote.pcr_select),
                    pcr_values=list(quote.pcr_values),
                )
            )
            results.append("won")
        except TokenInvalid:
            results.append("lost")
        finally:
            own.close()

    threads = [
        threading.Thread(target=racer, args=(swtpm.tcti, tmp_path / "a")),
        threading.Thread(target=racer, args=(attacker_swtpm.tcti, tmp_path / "b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["lost", "won"]


# -- TPM identity attacks ---------------------------------------------------------------------------


def test_second_tpm_cannot_claim_an_enrolled_asset_tag(store, swtpm, attacker_swtpm, tmp_path):
    enroll(store, swtpm.tcti, tmp_path / "ak", current=True, tag="SN1")
    with pytest.raises(EKUntrusted, match="different TPM"):
        enroll(store, attacker_swtpm.tcti, tmp_path / "evil", current=True, tag="SN1")
    assert store.get_device("SN1").credential.ak_public == (tmp_path / "ak" / "ak.pub").read_bytes()


def test_device_enrolled_by_another_user(store, swtpm, tmp_path):
    store.update_user(replace(store.get_user("bob"), roles=("access", "editor")))
    enroll(store, swtpm.tcti, tmp_path / "ak", current=True, tag="SN1")
    with pytest.raises(AccessDenied, match="another user"):
        enroll(store, swtpm.tcti, tmp_path / "ak", user="bob", current=True, tag="SN1")


def test_ek_cert_not_chaining_to_a_trust_root(store, swtpm, attacker_swtpm, tmp_path):
    roots = attest.load_trust_roots(
        [swtpm.provisioned.root_pem.read_bytes(), swtpm.provisioned.issuer_pem.read_bytes()]
    )
    policy = EnrollPolicy(tuple(roots), require_trusted_ek=True)
    with pytest.raises(EKUntrusted, match="does not chain"):
        enroll(store, attacker_swtpm.tcti, tmp_path / "evil", current=True, policy=policy)


def test_ek_certificate_of_another_tpm(store, swtpm, attacker_swtpm, tmp_path):
    with TPM.open(attacker_swtpm.tcti) as tpm:
        foreign_cert = tpm.endorsement().cert_der
    with TPM.open(swtpm.tcti) as tpm:
        ek = tpm.endorsement()
        ak = tpm.load_or_create_ak(tmp_path / "ak")
    server = EnrollmentCeremony(store, "alice", policy=EnrollPolicy())
    begin = wire.EnrollBegin(
        device_data={"asset_tag": "SN1"},
        ek_public=ek.public,
        ek_public_der=ek.public_der,
        ek_cert_der=foreign_cert,
        ak_public=ak,
        current_device=True,
    )
    with pytest.raises(EKUntrusted, match="does not match"):
        server.begin(begin)
    assert "does not match" in denials(store)[-1].message


@pytest.mark.parametrize(
    "missing",
    # A TPM refuses fixedParent without fixedTPM under the EK: a key that can leave
    # its TPM drops both (a duplicable key).
    [TPMA_OBJECT.RESTRICTED, TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT],
    ids=["not-restricted", "not-fixedtpm"],
)
def test_ak_without_restricted_or_fixedtpm(store, swtpm, tmp_path, missing):
    with TPM.open(swtpm.tcti) as tpm:
        ek = tpm.endorsement()
        weak = tpm.load_or_create_ak(tmp_path / "weak", attributes=AK_ATTRIBUTES & ~missing)
    server = EnrollmentCeremony(store, "alice", policy=EnrollPolicy())
    with pytest.raises(AKInvalid):
        server.begin(
            wire.EnrollBegin(
                device_data={"asset_tag": "SN1"},
                ek_public=ek.public,
                ek_public_der=ek.public_der,
                ek_cert_der=ek.cert_der,
                ak_public=weak,
                current_device=True,
            )
        )


class Tamper:
    """A client that runs the real TPM steps, then lets a test change its answer."""

    def __init__(self, store, tcti, ak_dir):
        self.server = EnrollmentCeremony(store, "alice", policy=EnrollPolicy())
        self.tcti, self.ak_dir = tcti, ak_dir

    def begin(self):
        with TPM.open(self.tcti) as tpm:
            ek = tpm.endorsement()
            self.ak = tpm.load_or_create_ak(self.ak_dir)
            self.challenge = self.server.begin(
                wire.EnrollBegin(
                    device_data={"asset_tag": "SN1"},
                    ek_public=ek.public,
                    ek_public_der=ek.public_der,
                    ek_cert_der=ek.cert_der,
                    ak_public=self.ak,
                    current_device=True,
                )
            )
            self.secret = tpm.activate_credential(
                self.ak_dir, self.challenge.credential_blob, self.challenge.encrypted_secret
            )
            self.quote = tpm.quote(self.ak_dir, self.challenge.nonce)
        return self

    def finish(self, **changes):
        q = self.quote
        msg = wire.EnrollFinish(
            secret=self.secret,
            attest=q.attest,
            signature=q.signature,
            pcr_select=list(q.pcr_select),
            pcr_values=list(q.pcr_values),
        )
        return self.server.finish(through_wire(replace(msg, **changes)))


def test_wrong_credential_secret(store, swtpm, tmp_path):
    t = Tamper(store, swtpm.tcti, tmp_path / "ak").begin()
    with pytest.raises(CredentialMismatch):
        t.finish(secret=bytes(32))
    assert not store.get_device("SN1") if store.find_device("SN1") else True


def test_answer_for_another_session_and_replayed_quote(store, swtpm, tmp_path):
    first = Tamper(store, swtpm.tcti, tmp_path / "ak").begin()
    second = Tamper(store, swtpm.tcti, tmp_path / "ak").begin()
    # the first session's secret does not open the second challenge
    with pytest.raises(CredentialMismatch):
        second.finish(secret=first.secret)
    third = Tamper(store, swtpm.tcti, tmp_path / "ak").begin()
    # right secret, but a quote captured from an earlier ceremony
    with pytest.raises(NonceMismatch, match="stale or replayed"):
        third.finish(attest=first.quote.attest, signature=first.quote.signature)
    # and a finished ceremony accepts no second answer
    with pytest.raises(ProtocolError):
        third.finish()
    assert store.find_device("SN1") is None


def test_quote_signed_by_a_software_key(store, swtpm, tmp_path):
    t = Tamper(store, swtpm.tcti, tmp_path / "ak").begin()
    fake = ec.generate_private_key(ec.SECP256R1())
    r, s = decode_dss_signature(fake.sign(t.quote.attest, ec.ECDSA(hashes.SHA256())))
    sig, _ = TPMT_SIGNATURE.unmarshal(t.quote.signature)
    assert sig.sigAlg == TPM2_ALG.ECDSA
    sig.signature.ecdsa.signatureR = r.to_bytes(32, "big")
    sig.signature.ecdsa.signatureS = s.to_bytes(32, "big")
    with pytest.raises(QuoteSignatureInvalid):
        t.finish(signature=bytes(sig.marshal()))


def test_malformed_tpm_structures(store, swtpm, tmp_path):
    t = Tamper(store, swtpm.tcti, tmp_path / "ak").begin()
    attest_blob = t.quote.attest
    for cut in range(0, len(attest_blob)):
        with pytest.raises(MalformedTPMData):
            attest.verify_quote(
                t.ak,
                attest_blob[:cut],
                t.quote.signature,
                t.challenge.nonce,
                list(t.quote.pcr_values),
                list(t.quote.pcr_select),
            )
    with pytest.raises(MalformedTPMData, match="trailing"):
        attest.check_ak(t.ak + b"\x00")
    for cut in range(0, len(t.ak), 9):
        with pytest.raises(MalformedTPMData):
            attest.check_ak(t.ak[:cut])
    with pytest.raises(MalformedTPMData, match="PCR"):
        t.finish(pcr_values=[b"\x01" * 32] * 8)  # a fresh swtpm's PCRs are all zeros


def test_stalled_client_times_out_and_leaves_nothing(store, swtpm, tmp_path):
    t = Tamper(store, swtpm.tcti, tmp_path / "ak")
    t.server.step_deadline = 0.0
    t.begin()
    from bastion.protocol.errors import NonceExpired

    with pytest.raises(NonceExpired):
        t.finish()
    assert store.find_device("SN1") is None


# -- device authentication at login -------------------------------------------------------------


def test_device_authentication(store, swtpm, attacker_swtpm, tmp_path):
    device, _ = enroll(store, swtpm.tcti, tmp_path / "ak", current=True, tag="SN1")
    state = DeviceState("SN1", device["credential_id"], "t")
    user_key_line = (
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGtDtVx+aNHhk8dBeqSm5ZKYRyYxkjRRHqRa+cNCHVyr"
    )
    auth = DeviceAuthentication(store, "alice")
    with TPM.open(swtpm.tcti) as tpm:
        nonce = auth.challenge()
        response = client_ceremony.device_response(
            tpm, tmp_path / "ak", nonce, user_key_line, state
        )
        blob = __import__("base64").b64decode(user_key_line.split()[1])
        assert auth.verify(through_wire(response), blob).asset_tag == "SN1"
        # replay of the same response: the nonce is gone
        with pytest.raises(ProtocolError):
            auth.verify(response, blob)
        # a quote bound to another public key
        nonce = auth.challenge()
        response = client_ceremony.device_response(
            tpm, tmp_path / "ak", nonce, user_key_line, state
        )
        with pytest.raises(NonceMismatch):
            auth.verify(response, blob[:-1] + b"\x00")
    # the attacker's TPM, with its own AK, claiming alice's device
    with TPM.open(attacker_swtpm.tcti) as evil:
        evil.load_or_create_ak(tmp_path / "evil")
        nonce = auth.challenge()
        forged = client_ceremony.device_response(
            evil, tmp_path / "evil", nonce, user_key_line, state
        )
    with pytest.raises(QuoteSignatureInvalid):
        auth.verify(forged, blob)
    # after unenrollment the device no longer authenticates
    store.update_device(
        replace(store.get_device("SN1"), enroll_status="not_enrolled", credential=None)
    )
    with TPM.open(swtpm.tcti) as tpm:
        nonce = auth.challenge()
        response = client_ceremony.device_response(
            tpm, tmp_path / "ak", nonce, user_key_line, state
        )
    with pytest.raises(DeviceNotTrusted, match="not enrolled"):
        auth.verify(response, blob)
    kinds = [(e.success, e.type) for e in store.list_audit(type="device.authenticate")]
    assert (True, "device.authenticate") in kinds and (False, "device.authenticate") in kinds


def test_real_vendor_roots_load(tmp_path):
    shared = Path(__file__).resolve().parents[2] / "shared" / "tpm-ek-roots"
    pems = sorted(shared.glob("*.pem"))
    if not pems:
        pytest.skip("../shared/tpm-ek-roots is not present")
    roots = attest.load_trust_roots([p.read_bytes() for p in pems])
    assert len(roots) == len(pems) >= 4


@pytest.mark.parametrize(
    "garbage",
    [b"", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b"\x30\x82\xff"],
)
def test_garbage_trust_root_is_a_clear_error(garbage):
    from bastion.protocol.errors import UsageError

    with pytest.raises(UsageError, match="not a PEM or DER"):
        attest.parse_trust_root(garbage)


# -- the client's claims are compared, never trusted (issue 11) ------------------------------


class ClaimingSession(LocalSession):
    """A client that names another EK in ``ek_public_der`` than the one it sends."""

    def __init__(self, server: EnrollmentCeremony, claimed_der: bytes) -> None:
        super().__init__(server)
        self.claimed_der = claimed_der

    async def call(self, msg, expect):
        if isinstance(msg, wire.EnrollBegin):
            msg = replace(msg, ek_public_der=self.claimed_der)
        return await super().call(msg, expect)


def test_the_ek_identity_comes_from_the_ek_the_challenge_is_bound_to(
    store, swtpm, attacker_swtpm, tmp_path
):
    """The stored and pinned EK identity used to be the hash of a field the client sent
    and nothing compared with the EK the activation challenge was made for."""
    with TPM.open(swtpm.tcti) as tpm:
        victim_der = tpm.endorsement().public_der
    server = EnrollmentCeremony(store, "alice", policy=EnrollPolicy())
    session = ClaimingSession(server, victim_der)
    with TPM.open(attacker_swtpm.tcti) as tpm, pytest.raises(EKUntrusted, match="ek_public_der"):
        asyncio.run(
            client_ceremony.enroll(
                session, tpm, tmp_path / "evil", token=None, current_device=True, tag_override="SN9"
            )
        )
    assert store.find_device("SN9") is None
    assert "ek_public_der" in denials(store)[-1].message


def test_a_token_for_a_device_with_an_owner_serves_only_that_owner(store, swtpm, tmp_path):
    store.add_device(Device("", "SN1", "linux", owner="bob"))
    token = issue_enroll_token(store, "SN1", actor="admin")
    with pytest.raises(AccessDenied, match="registered to another user"):
        enroll(store, swtpm.tcti, tmp_path / "ak", token=token)
    record = store.get_device("SN1")
    assert not record.enrolled and record.owner == "bob"
    assert store.list_tokens("enroll")[0].consumed is None  # not burnt by the refusal
    assert "registered to another user" in denials(store)[-1].message
    device, _ = enroll(store, swtpm.tcti, tmp_path / "ak", user="bob", token=token)
    assert device["owner"] == "bob" and device["enroll_status"] == "enrolled"


class MeddlingSession(LocalSession):
    """Runs ``meanwhile`` between the challenge and the answer: the TPM round trip."""

    def __init__(self, server: EnrollmentCeremony, meanwhile) -> None:
        super().__init__(server)
        self.meanwhile = meanwhile

    async def call(self, msg, expect):
        if isinstance(msg, wire.EnrollFinish):
            self.meanwhile()
        return await super().call(msg, expect)


def test_an_owner_assigned_during_the_tpm_round_trip_is_seen_at_commit(store, swtpm, tmp_path):
    store.add_device(Device("", "SN1", "linux"))
    token = issue_enroll_token(store, "SN1", actor="admin")

    def assign_bob():
        store.update_device(replace(store.get_device("SN1"), owner="bob"))

    session = MeddlingSession(EnrollmentCeremony(store, "alice", policy=EnrollPolicy()), assign_bob)
    with TPM.open(swtpm.tcti) as tpm, pytest.raises(AccessDenied, match="registered to another"):
        asyncio.run(
            client_ceremony.enroll(
                session, tpm, tmp_path / "ak", token=token, current_device=False, tag_override="SN1"
            )
        )
    assert not store.get_device("SN1").enrolled
    assert store.list_tokens("enroll")[0].consumed is None
