"""Security checklist #12, #13 and #20: attacks on the device ceremonies and on tokens.

Every attack runs against real software TPMs (``swtpm`` is the victim's machine,
``attacker_swtpm`` a second machine with its own EK) and a real SQLite store; the
bastion side is the in-process ceremony objects, fed through the strict wire codec as
dt-api would feed them. Time is passed as ``now`` everywhere, so nothing sleeps and
nothing is timed. Each test names the attack and the fail-closed outcome: refused
with a clear error, audited with its reason, nothing stored, nothing left usable.
"""

from __future__ import annotations

import ast
import base64
import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE,
    TPM2B_SENSITIVE_CREATE,
    TPMT_SYM_DEF_OBJECT,
)
from tpm2_pytss.utils import make_credential, wrap

from bastion.authz.rbac import PRESET_ROLES
from bastion.authz.records import Device, User
from bastion.cluster import init_cluster
from bastion.credentials import new_token, token_hash
from bastion.enroll import attest
from bastion.enroll.authn import DeviceAuthentication
from bastion.enroll.ceremony import EnrollmentCeremony, EnrollPolicy
from bastion.enroll.tokens import MAX_TOKEN_FAILURES, check_enroll_token, issue_enroll_token
from bastion.protocol import wire
from bastion.protocol.errors import (
    AKInvalid,
    CredentialMismatch,
    DeviceNotTrusted,
    NonceMismatch,
    ProtocolError,
    QuoteSignatureInvalid,
    RateLimited,
    TokenInvalid,
    TPMError,
)
from bastion.storage import DB_NAME, Store
from client import ceremony as client_ceremony
from client.profile import DeviceState
from client.tpm import AK_ATTRIBUTES, AK_PRIV, AK_PUB, TPM

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0  # a fixed clock; every ceremony step is given its `now`
HOUR = 3600.0


def through_wire(msg):
    return wire.decode(wire.encode(msg))


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "state", create=True)
    s.set_setting("cluster_name", "t")
    for role in PRESET_ROLES:
        s.put_role(role)
    s.add_user(User("alice", ("access", "editor"), ("root",)))
    s.add_user(User("bob", ("access",), ("root",)))
    s.add_user(User("mallory", ("access", "editor"), ("root",)))
    yield s
    s.close()


class Machine:
    """One device with a real TPM, running the client's TPM steps one at a time.

    The client's own ``ceremony.enroll`` runs all steps in one go; attacks need to
    stop between them, swap answers, or hand one machine's challenge to another.
    """

    def __init__(self, tcti: str, ak_dir: Path, tag: str) -> None:
        self.tcti, self.ak_dir, self.tag = tcti, ak_dir, tag
        self.record: Device | None = None  # what the bastion stored, once enrolled
        with TPM.open(tcti) as tpm:
            self.ek = tpm.endorsement()
            self.ak = tpm.load_or_create_ak(ak_dir)

    def begin(self, *, token: str | None = None, current: bool = False) -> wire.EnrollBegin:
        return through_wire(
            wire.EnrollBegin(
                device_data={"asset_tag": self.tag, "os_type": "linux"},
                ek_public=self.ek.public,
                ek_public_der=self.ek.public_der,
                ek_cert_der=self.ek.cert_der,
                ak_public=self.ak,
                token=token,
                current_device=current,
            )
        )

    def activate(self, challenge: wire.EnrollChallenge) -> bytes:
        with TPM.open(self.tcti) as tpm:
            return tpm.activate_credential(
                self.ak_dir, challenge.credential_blob, challenge.encrypted_secret
            )

    def finish(self, secret: bytes, nonce: bytes) -> wire.EnrollFinish:
        """The answer this machine's AK gives: ``secret`` and a quote over ``nonce``."""
        with TPM.open(self.tcti) as tpm:
            quote = tpm.quote(self.ak_dir, nonce, client_ceremony.PCRS)
        return through_wire(
            wire.EnrollFinish(
                secret=secret,
                attest=quote.attest,
                signature=quote.signature,
                pcr_select=list(quote.pcr_select),
                pcr_values=list(quote.pcr_values),
            )
        )

    def enroll(self, store: Store, user: str, *, now: float = T0, **how) -> Device:
        server = EnrollmentCeremony(store, user, policy=EnrollPolicy())
        challenge = server.begin(self.begin(**how), now=now)
        return server.finish(self.finish(self.activate(challenge), challenge.nonce), now=now)

    def login_answer(
        self, nonce: bytes, key_line: str, *, claim: Device | None = None
    ) -> wire.DeviceResponse:
        """A login quote over ``sha256(nonce || key)``, claiming ``claim`` (default: itself)."""
        claim = claim or self.record
        assert claim is not None and claim.credential is not None
        state = DeviceState(claim.asset_tag, claim.credential.id, "t")
        with TPM.open(self.tcti) as tpm:
            answer = client_ceremony.device_response(tpm, self.ak_dir, nonce, key_line, state)
        return through_wire(answer)


def user_key() -> tuple[str, bytes]:
    """A fresh OpenSSH public key line and its wire blob: the key a login certifies."""
    line = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return line, base64.b64decode(line.split()[1])


def denials(store: Store, event_type: str) -> list:
    """Refusals of one kind, oldest first."""
    events = store.list_audit(type=event_type)
    return sorted((e for e in events if not e.success), key=lambda e: e.id)


def assert_not_enrolled(store: Store, tag: str) -> None:
    device = store.find_device(tag)
    assert device is None or (not device.enrolled and device.credential is None)


# == #12: one nonce, two devices =================================================================


@pytest.fixture
def two_machines(swtpm, attacker_swtpm, tmp_path):
    victim = Machine(swtpm.tcti, tmp_path / "victim-ak", "SN-A")
    attacker = Machine(attacker_swtpm.tcti, tmp_path / "attacker-ak", "SN-B")
    return victim, attacker


def test_enroll_challenge_for_device_a_answered_by_device_b(store, two_machines):
    """Attack: device B answers device A's enrollment challenge with its own TPM: it
    cannot unwrap A's credential (bound to A's EK) and quotes A's nonce with its AK.

    Expected: B's TPM cannot even recover the secret; the bastion refuses the answer
    (credential mismatch), audits it, spends no token and stores nothing; A's
    challenge is burnt, so neither B nor A can finish it afterwards, while A can
    still enroll with the same token in a fresh ceremony.
    """
    a, b = two_machines
    store.add_device(Device("", "SN-A", "linux"))
    token = issue_enroll_token(store, "SN-A", now=T0)
    server = EnrollmentCeremony(store, "alice", policy=EnrollPolicy())
    challenge = server.begin(a.begin(token=token), now=T0)

    with pytest.raises(TPMError, match="activating the credential"):
        b.activate(challenge)  # A's challenge is sealed to A's EK
    with pytest.raises(CredentialMismatch, match="did not recover the challenge secret"):
        server.finish(b.finish(bytes(32), challenge.nonce), now=T0 + 1)

    # The challenge died with the wrong answer: A's genuine answer is refused too.
    genuine = a.finish(a.activate(challenge), challenge.nonce)
    with pytest.raises(ProtocolError, match="without enroll_begin"):
        server.finish(genuine, now=T0 + 2)

    assert_not_enrolled(store, "SN-A")
    assert store.find_device("SN-B") is None
    assert store.find_token(token_hash(token), "enroll").consumed is None
    reasons = [(e.fields.get("reason"), e.device) for e in denials(store, "device.enroll")]
    assert reasons == [("credential_mismatch", "SN-A"), ("protocol_error", None)]

    assert a.enroll(store, "alice", token=token, now=T0 + 3).enrolled


def test_enroll_nonce_for_device_a_quoted_by_device_b_with_leaked_secret(store, two_machines):
    """Attack: B gets A's activation secret (relayed from A's TPM) and quotes A's nonce
    with B's own AK, hoping the bastion checks only that the nonce is right.

    Expected: the quote must come from the AK named in A's challenge, so it is refused
    as not signed by the device's attestation key; audited; nothing stored; the
    challenge is burnt.
    """
    a, b = two_machines
    server = EnrollmentCeremony(store, "alice", policy=EnrollPolicy())
    challenge = server.begin(a.begin(current=True), now=T0)
    leaked = a.activate(challenge)

    forged = b.finish(leaked, challenge.nonce)  # a real TPM quote over A's very nonce
    with pytest.raises(QuoteSignatureInvalid, match="not signed by the device's attestation key"):
        server.finish(forged, now=T0 + 1)
    with pytest.raises(ProtocolError):
        server.finish(a.finish(leaked, challenge.nonce), now=T0 + 2)

    assert_not_enrolled(store, "SN-A")
    assert [e.fields.get("reason") for e in denials(store, "device.enroll")][0] == (
        "quote_signature_invalid"
    )


def test_enroll_device_b_reuses_device_as_nonce_in_its_own_ceremony(store, two_machines):
    """Attack: B runs its own enrollment but answers with a quote over the nonce it saw
    in A's ceremony (e.g. a quote it made in advance), not over its own nonce.

    Expected: every ceremony has its own fresh nonce, so the quote is refused as stale
    or replayed; audited; B is not stored.
    """
    a, b = two_machines
    server_a = EnrollmentCeremony(store, "alice", policy=EnrollPolicy())
    server_b = EnrollmentCeremony(store, "mallory", policy=EnrollPolicy())
    challenge_a = server_a.begin(a.begin(current=True), now=T0)
    challenge_b = server_b.begin(b.begin(current=True), now=T0)
    assert challenge_a.nonce != challenge_b.nonce

    answer = b.finish(b.activate(challenge_b), challenge_a.nonce)
    with pytest.raises(NonceMismatch, match="stale or replayed"):
        server_b.finish(answer, now=T0 + 1)

    assert store.find_device("SN-B") is None
    denied = denials(store, "device.enroll")
    assert [(e.user, e.fields.get("reason")) for e in denied] == [("mallory", "nonce_mismatch")]
    # A's own ceremony is untouched by B's failure and still completes.
    server_a.finish(a.finish(a.activate(challenge_a), challenge_a.nonce), now=T0 + 2)
    assert store.get_device("SN-A").enrolled


@pytest.fixture
def enrolled_pair(store, two_machines):
    """A enrolled by alice, B enrolled by mallory: two genuine devices of two users."""
    a, b = two_machines
    a.record = a.enroll(store, "alice", current=True)
    b.record = b.enroll(store, "mallory", current=True)
    return a, b


def test_login_nonce_for_alice_answered_by_mallorys_device(store, enrolled_pair):
    """Attack: the nonce issued to alice's login is answered by mallory's enrolled device
    B (a genuine quote by B's own AK over exactly that nonce and alice's key).

    Expected: refused (device enrolled by another user), audited with B's tag; the
    nonce is spent by the attempt, so A's answer to it is refused as well and alice
    must ask for a fresh one, which A then answers.
    """
    a, b = enrolled_pair
    line, blob = user_key()
    auth = DeviceAuthentication(store, "alice", remote_addr="127.0.0.1")
    nonce = auth.challenge(now=T0)
    with pytest.raises(DeviceNotTrusted, match="enrolled by another user"):
        auth.verify(b.login_answer(nonce, line), blob, now=T0 + 1)
    with pytest.raises(ProtocolError, match="without a device challenge"):
        auth.verify(a.login_answer(nonce, line), blob, now=T0 + 2)

    fresh = auth.challenge(now=T0 + 3)
    assert fresh != nonce
    assert auth.verify(a.login_answer(fresh, line), blob, now=T0 + 4).asset_tag == "SN-A"
    denied = denials(store, "device.authenticate")
    assert [(e.user, e.device, e.fields.get("reason")) for e in denied] == [
        ("alice", "SN-B", "device_not_trusted"),
        ("alice", "SN-A", "protocol_error"),
    ]


def test_login_nonce_quoted_by_device_b_claiming_device_a(store, enrolled_pair):
    """Attack: B quotes alice's nonce with its own AK but claims to be A (A's asset tag
    and credential id), so the device checks pass and only the quote can tell.

    Expected: the quote is verified with A's stored AK and refused as not signed by
    it; audited; the attempt spends the nonce, so nothing can complete it afterwards,
    not even A's genuine answer.
    """
    a, b = enrolled_pair
    line, blob = user_key()
    auth = DeviceAuthentication(store, "alice")
    nonce = auth.challenge(now=T0)
    with pytest.raises(QuoteSignatureInvalid):
        auth.verify(b.login_answer(nonce, line, claim=a.record), blob, now=T0 + 1)
    with pytest.raises(ProtocolError):
        auth.verify(a.login_answer(nonce, line), blob, now=T0 + 2)
    reasons = [e.fields.get("reason") for e in denials(store, "device.authenticate")]
    assert reasons == ["quote_signature_invalid", "protocol_error"]


def test_one_login_nonce_answered_by_two_devices_only_the_first_counts(store, enrolled_pair):
    """Attack: A and B both quote the same login nonce; B then presents its quote on
    its own (mallory's) session, where another nonce is pending.

    Expected: A's answer is accepted once; B's answer to the spent nonce is refused on
    alice's session (no challenge) and on mallory's session (stale or replayed); both
    refusals are audited and mallory's nonce stays unusable after it.
    """
    a, b = enrolled_pair
    line, blob = user_key()
    alice = DeviceAuthentication(store, "alice")
    mallory = DeviceAuthentication(store, "mallory")
    nonce = alice.challenge(now=T0)
    theirs = mallory.challenge(now=T0)
    from_a, from_b = a.login_answer(nonce, line), b.login_answer(nonce, line)

    assert alice.verify(from_a, blob, now=T0 + 1).asset_tag == "SN-A"
    with pytest.raises(ProtocolError):
        alice.verify(from_b, blob, now=T0 + 2)
    with pytest.raises(NonceMismatch, match="stale or replayed"):
        mallory.verify(from_b, blob, now=T0 + 3)
    with pytest.raises(ProtocolError):
        mallory.verify(b.login_answer(theirs, line), blob, now=T0 + 4)
    denied = denials(store, "device.authenticate")
    assert [(e.user, e.fields.get("reason")) for e in denied] == [
        ("alice", "protocol_error"),
        ("mallory", "nonce_mismatch"),
        ("mallory", "protocol_error"),
    ]


# == #13: an AK name that does not match the AK public ============================================
#
# The client never sends an AK name: the bastion computes it from the AK public it
# receives (and later stores), and MakeCredential binds the challenge to that name.
# A TPM releases the secret only through an object whose name matches. These tests
# show the TPM refusing every object with another name, including a key that lives
# outside the TPM dressed up with the attributes of a real AK.


def ek_handle(tpm: TPM) -> ESYS_TR:
    """The attacker's own tooling: raw ESAPI on the open TPM, with the EK as parent.

    client.tpm deliberately offers no import or external load, so the attacks reach
    into its ESAPI handle; the TPM, not this code, decides what is refused.
    """
    return tpm._endorsement()[0]


def _ecdsa_template(public: TPM2B_PUBLIC) -> TPM2B_PUBLIC:
    detail = public.publicArea.parameters.eccDetail
    detail.scheme.scheme = TPM2_ALG.ECDSA
    detail.scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    return public


def plant_software_key(tpm: TPM, ak_dir: Path, pem: bytes) -> bytes:
    """Import a software private key into ``tpm`` as a restricted signing key under
    the EK, saved where the client looks for its AK; returns its honest public.

    The TPM accepts an imported key only with fixedTPM and fixedParent clear: it is
    a real TPM object that can quote, but its private key also exists outside.
    """
    attrs = TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.USERWITHAUTH
    public = _ecdsa_template(TPM2B_PUBLIC.from_pem(pem, objectAttributes=attrs))
    ek_public, _ = TPM2B_PUBLIC.unmarshal(tpm.endorsement().public)
    key, duplicate, seed = wrap(ek_public.publicArea, public, TPM2B_SENSITIVE.from_pem(pem))
    with tpm._ek_session() as session:
        private = tpm._esapi.import_(
            ek_handle(tpm),
            key,
            public,
            duplicate,
            seed,
            TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
            session1=session,
        )
    ak_dir.mkdir(parents=True, mode=0o700)
    (ak_dir / AK_PRIV).write_bytes(bytes(private.marshal()))
    (ak_dir / AK_PUB).write_bytes(bytes(public.marshal()))
    return bytes(public.marshal())


def activate_with_public_only_object(tpm: TPM, public: bytes, challenge) -> bytes:
    """Load just a public area (any name we like) into the TPM and activate with it."""
    pub, _ = TPM2B_PUBLIC.unmarshal(public)
    blob, _ = TPM2B_ID_OBJECT.unmarshal(challenge.credential_blob)
    seed, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(challenge.encrypted_secret)
    handle = tpm._esapi.load_external(pub, hierarchy=ESYS_TR.NULL)
    try:
        with tpm._ek_session() as session:
            return bytes(
                tpm._esapi.activate_credential(
                    handle,
                    ek_handle(tpm),
                    blob,
                    seed,
                    session1=ESYS_TR.PASSWORD,
                    session2=session,
                )
            )
    finally:
        tpm._esapi.flush_context(handle)


def test_challenge_is_bound_to_the_name_of_the_ak_public_sent(store, swtpm, tmp_path):
    """Attack: a device declares the public of one of its AKs (AK2) while the TPM
    answers the challenge through another key (AK1): the name of another key.

    Expected: the bastion bound the challenge to the name it computed from AK2's
    public, so the TPM refuses to activate it through AK1 (integrity check); only
    AK2 recovers the secret. A guessed answer is refused, audited, nothing stored.
    """
    first = Machine(swtpm.tcti, tmp_path / "ak1", "SN1")
    second = Machine(swtpm.tcti, tmp_path / "ak2", "SN1")
    assert attest.check_ak(first.ak).name != attest.check_ak(second.ak).name
    server = EnrollmentCeremony(store, "alice", policy=EnrollPolicy())
    challenge = server.begin(second.begin(current=True), now=T0)

    with pytest.raises(TPMError, match="integrity check failed"):
        first.activate(challenge)
    recovered = second.activate(challenge)  # control: the named key does recover it
    assert len(recovered) == 32

    with pytest.raises(CredentialMismatch):
        server.finish(first.finish(bytes(32), challenge.nonce), now=T0 + 1)
    assert_not_enrolled(store, "SN1")
    assert denials(store, "device.enroll")[-1].fields["reason"] == "credential_mismatch"


def test_software_key_dressed_as_an_ak_cannot_activate(store, attacker_swtpm, tmp_path):
    """Attack: the attacker imports a software key into its TPM (the TPM insists on
    fixedTPM/fixedParent clear) and sends the bastion the same key with the AK
    attributes set: a valid-looking AK public whose name matches no TPM object.

    Expected: the honest public is refused up front; the dressed-up one gets a
    challenge bound to its own name, which the TPM will not activate through the
    imported key (integrity check) nor through a public-only load (no authorization),
    even though the imported key's quote over the nonce would pass the quote check.
    The answer is refused, audited, nothing stored. A bastion that took the name
    from the client would have been fooled: the TPM activates a challenge bound to the
    imported key's real name.
    """
    soft = ec.generate_private_key(ec.SECP256R1())
    pem = soft.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ak_dir = tmp_path / "planted"
    with TPM.open(attacker_swtpm.tcti) as tpm:
        honest = plant_software_key(tpm, ak_dir, pem)
    dressed = bytes(
        _ecdsa_template(TPM2B_PUBLIC.from_pem(pem, objectAttributes=AK_ATTRIBUTES)).marshal()
    )
    machine = Machine(attacker_swtpm.tcti, ak_dir, "SN-EVIL")
    server = EnrollmentCeremony(store, "mallory", policy=EnrollPolicy())

    with pytest.raises(AKInvalid, match="fixedTPM, fixedParent"):
        server.begin(machine.begin(current=True), now=T0)
    machine.ak = dressed
    server = EnrollmentCeremony(store, "mallory", policy=EnrollPolicy())
    challenge = server.begin(machine.begin(current=True), now=T0)

    with pytest.raises(TPMError, match="integrity check failed"):
        machine.activate(challenge)
    with TPM.open(attacker_swtpm.tcti) as tpm:
        with pytest.raises(TSS2_Exception, match="not available"):
            activate_with_public_only_object(tpm, dressed, challenge)

    answer = machine.finish(bytes(32), challenge.nonce)  # quoted by the imported key
    attest.verify_quote(  # the quote alone would pass: the name is what stops it
        dressed,
        answer.attest,
        answer.signature,
        challenge.nonce,
        list(answer.pcr_values),
        list(answer.pcr_select),
    )
    with pytest.raises(CredentialMismatch):
        server.finish(answer, now=T0 + 1)
    assert store.find_device("SN-EVIL") is None
    reasons = [e.fields["reason"] for e in denials(store, "device.enroll")]
    assert reasons == ["ak_invalid", "credential_mismatch"]

    # Control: bound to the imported key's own name, the same TPM does release it.
    ek_public, _ = TPM2B_PUBLIC.unmarshal(machine.ek.public)
    honest_public, _ = TPM2B_PUBLIC.unmarshal(honest)
    blob, seed = make_credential(ek_public, b"s" * 32, honest_public.get_name())
    control = wire.EnrollChallenge(bytes(blob.marshal()), bytes(seed.marshal()), b"")
    assert machine.activate(control) == b"s" * 32


def test_ak_with_a_weak_name_algorithm_is_refused(store, swtpm, tmp_path):
    """Attack: a real TPM AK whose name is computed with SHA-1, so the name that binds
    the challenge is only as collision-resistant as SHA-1.

    Expected: refused before any challenge is made (AK name must use SHA-256 or
    stronger), audited, nothing pending or stored.
    """
    template = TPM2B_PUBLIC.parse(
        "ecc256:ecdsa-sha256:null", nameAlg="sha1", objectAttributes=AK_ATTRIBUTES
    )
    with TPM.open(swtpm.tcti) as tpm:
        with tpm._ek_session() as session:
            _, public, _, _, _ = tpm._esapi.create(
                ek_handle(tpm), TPM2B_SENSITIVE_CREATE(), template, session1=session
            )
    weak = bytes(public.marshal())
    # the TPM made it with a genuine AK's attributes; only the name algorithm is weak
    assert public.publicArea.objectAttributes == AK_ATTRIBUTES
    assert public.publicArea.nameAlg == TPM2_ALG.SHA1
    machine = Machine(swtpm.tcti, tmp_path / "ak", "SN1")
    machine.ak = weak
    server = EnrollmentCeremony(store, "alice", policy=EnrollPolicy())
    with pytest.raises(AKInvalid, match="SHA-256 or stronger"):
        server.begin(machine.begin(current=True), now=T0)
    with pytest.raises(ProtocolError):
        server.finish(machine.finish(bytes(32), bytes(32)), now=T0)
    assert store.find_device("SN1") is None
    assert denials(store, "device.enroll")[0].fields["reason"] == "ak_invalid"


# == #20: guessing enrollment tokens ============================================================


@pytest.fixture
def guessing(store, swtpm, tmp_path):
    """SN1 with a day-long token for alice and SN2 with one for bob; one real TPM."""
    store.add_device(Device("", "SN1", "linux"))
    store.add_device(Device("", "SN2", "linux"))
    return SimpleNamespace(
        machine=Machine(swtpm.tcti, tmp_path / "ak", "SN1"),
        token=issue_enroll_token(store, "SN1", ttl=86400, now=T0),
        bob_token=issue_enroll_token(store, "SN2", ttl=86400, now=T0),
    )


def guess(store: Store, machine: Machine, user: str, n: int, start: float) -> None:
    """``n`` wrong but well-formed tokens from ``user``, one a second from ``start``."""
    for i in range(n):
        server = EnrollmentCeremony(store, user, policy=EnrollPolicy())
        with pytest.raises(TokenInvalid, match="not valid"):
            server.begin(machine.begin(token=new_token()), now=start + i)


def test_guessing_locks_the_user_out_even_with_the_right_token(store, guessing):
    """Attack: a user guesses enrollment tokens, then holds (or guesses) the right one.

    Expected: after MAX_TOKEN_FAILURES wrong tokens in an hour, even the right token
    is refused with a clear rate-limit message and an audit event; the token is not
    spent, nothing is enrolled, and the failures do not count against alice's
    password logins.
    """
    m = guessing.machine
    guess(store, m, "alice", MAX_TOKEN_FAILURES - 1, T0)
    # one more failure of another kind (a mangled token) counts too
    server = EnrollmentCeremony(store, "alice", policy=EnrollPolicy())
    with pytest.raises(TokenInvalid, match="cut off"):
        server.begin(m.begin(token=guessing.token[:20]), now=T0 + 100)

    server = EnrollmentCeremony(store, "alice", policy=EnrollPolicy())
    with pytest.raises(RateLimited, match="too many failed enrollment token attempts"):
        server.begin(m.begin(token=guessing.token), now=T0 + 101)

    last = denials(store, "device.enroll")[-1]
    assert (last.user, last.device, last.fields["reason"]) == ("alice", "SN1", "rate_limited")
    assert "too many failed enrollment token attempts" in last.message
    assert store.find_token(token_hash(guessing.token), "enroll").consumed is None
    assert_not_enrolled(store, "SN1")
    assert store.count_login_failures("alice", since=0) == 0


def test_guessing_by_one_user_does_not_lock_out_another(store, guessing, tmp_path):
    """Attack: mallory guesses until locked out, hoping to block everyone's enrollment.

    Expected: only mallory is refused; bob, in the same minute, enrolls with his
    token, which is then spent.
    """
    guess(store, guessing.machine, "mallory", MAX_TOKEN_FAILURES, T0)
    with pytest.raises(RateLimited):
        check_enroll_token(store, guessing.bob_token, "mallory", T0 + 30)

    bob_machine = Machine(guessing.machine.tcti, tmp_path / "ak", "SN2")
    device = bob_machine.enroll(store, "bob", token=guessing.bob_token, now=T0 + 31)
    assert device.enrolled and device.owner == "bob"
    assert store.find_token(token_hash(guessing.bob_token), "enroll").consumed is not None


def test_guessing_lockout_lasts_an_hour_then_the_right_token_works(store, guessing):
    """Attack: guess up to the limit, then retry before the hour is over.

    Expected: refused until an hour after the oldest counted failure (at exactly one
    hour the failure still counts); just after that, the right token enrolls the
    device, spending the token. Refused attempts during the lockout do not extend it.
    """
    m = guessing.machine
    guess(store, m, "alice", MAX_TOKEN_FAILURES, T0)  # at T0 .. T0+9
    for at in (T0 + 10, T0 + HOUR / 2, T0 + HOUR):
        with pytest.raises(RateLimited):
            check_enroll_token(store, guessing.token, "alice", at)

    device = m.enroll(store, "alice", token=guessing.token, now=T0 + HOUR + 0.5)
    assert device.enrolled and device.owner == "alice"
    assert store.find_token(token_hash(guessing.token), "enroll").consumed is not None
    assert [e.fields["reason"] for e in denials(store, "device.enroll")] == ["token_invalid"] * (
        MAX_TOKEN_FAILURES
    )


def test_token_lookup_never_compares_the_secret(store, guessing):
    """Attack: time the token check to learn the stored token byte by byte.

    Expected (checked structurally, never by timing): the store holds only the
    token's SHA-256, the secret never reaches SQL, and the lookup is an indexed
    search by SHA-256 of the guess, so timing depends only on a hash the guesser
    cannot steer.
    """
    secret, guessed = guessing.token, new_token()
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)  # real SQL, parameters expanded
    try:
        with pytest.raises(TokenInvalid):
            check_enroll_token(store, guessed, "alice", T0)
        assert check_enroll_token(store, secret, "alice", T0 + 1).subject == "SN1"
    finally:
        store._conn.set_trace_callback(None)
    sql = "\n".join(statements)
    assert secret not in sql and guessed not in sql
    for s in (secret, guessed):
        assert f"token_hash = '{hashlib.sha256(s.encode()).hexdigest()}'" in sql

    plan = store._conn.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM tokens WHERE token_hash = ? AND kind = ?",
        (token_hash(secret), "enroll"),
    ).fetchall()
    assert [row[-1] for row in plan] == [
        "SEARCH tokens USING INDEX sqlite_autoindex_tokens_1 (token_hash=?)"
    ]

    state = store.path.parent
    on_disk = b"".join(p.read_bytes() for p in state.iterdir() if p.name.startswith(DB_NAME))
    assert token_hash(secret).encode() in on_disk  # the row is there, as its hash only
    assert secret.encode() not in on_disk


SECRET_WORDS = ("secret", "nonce", "answer", "token_hash", "stored_hash", "digest", "extradata")


def _secret_equality_comparisons(source: str, name: str) -> list[str]:
    """``==``/``!=`` whose operands name secret material (``len(...)`` is not secret)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
            continue
        for operand in (node.left, *node.comparators):
            if isinstance(operand, ast.Call) and ast.unparse(operand.func) == "len":
                continue
            if any(word in ast.unparse(operand).lower() for word in SECRET_WORDS):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
                break
    return found


def test_no_secret_is_compared_with_eq():
    """Attack: time a byte-by-byte ``==`` on a secret (token hash, activation secret,
    nonce, quote digest) to learn it a prefix at a time.

    Expected: every such comparison in bastion/enroll and bastion/credentials goes
    through hmac.compare_digest; the scan itself does catch a plain ``==``.
    """
    planted = (
        "def check(pending, answer):\n    return answer == pending.secret or len(answer) == 32\n"
    )
    assert _secret_equality_comparisons(planted, "planted.py") == [
        "planted.py:2: answer == pending.secret"
    ]
    root = Path(__file__).resolve().parents[1] / "bastion"
    found = []
    for path in [*sorted((root / "enroll").glob("*.py")), root / "credentials.py"]:
        found += _secret_equality_comparisons(path.read_text(), path.name)
    assert found == []


def test_guessing_through_dtclient_shows_a_clear_message(tmp_path, swtpm):
    """Attack: a logged-in user runs `dtclient device enroll --token` with guesses
    against a real `dt-bastion serve`, then with the right token.

    Expected: each guess ends with exit code 8 and "not valid"; once the limit is
    reached the right token ends with exit code 9 and the rate-limit message (never a
    traceback), audited as rate_limited at the bastion; the token is not spent.
    """
    from tests.sshd import LOGIN, bastion_server
    from tests.test_device_login import run
    from tests.test_login import PASSWORD, next_code, signup
    from tests.tokens import printed_token

    cluster = init_cluster(tmp_path / "state", "guess-test")
    try:
        with bastion_server(tmp_path / "state") as bastion:
            env = SimpleNamespace(
                tmp=tmp_path, cluster=cluster, proxy=f"127.0.0.1:{bastion.port}", tpm=swtpm
            )
            added = run(
                env, "dtadmin", "users", "add", "erin", "--roles", "access", "--logins", LOGIN
            )
            assert added.returncode == 0, added.stderr
            secret = signup(env, tmp_path / "home", printed_token(added.stdout))
            login = run(
                env,
                "dtclient",
                "login",
                "--proxy",
                env.proxy,
                "--user",
                "erin",
                input=f"{PASSWORD}\n{next_code(secret)}\n",
            )
            assert login.returncode == 0, login.stderr
            made = run(env, "dtadmin", "device", "add", "--asset-tag", "ERIN-PC", "--enroll")
            token = printed_token(made.stdout)

            enroll = ("dtclient", "device", "enroll", "--asset-tag", "ERIN-PC", "--token")
            for _ in range(MAX_TOKEN_FAILURES):
                wrong = run(env, *enroll, new_token())
                assert wrong.returncode == 8 and "not valid" in wrong.stderr, wrong.stderr
            right = run(env, *enroll, token)
        assert right.returncode == 9, right.stderr
        assert "too many failed enrollment token attempts" in right.stderr
        last = denials(cluster.store, "device.enroll")[-1]
        assert (last.user, last.fields["reason"]) == ("erin", "rate_limited")
        assert cluster.store.find_token(token_hash(token), "enroll").consumed is None
        assert not cluster.store.get_device("ERIN-PC").enrolled
    finally:
        cluster.close()
