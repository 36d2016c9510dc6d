"""TPM 2.0 attestation checks for the bastion: pure Python over marshalled bytes.

The bastion never opens a TPM (only ``client/`` does). It uses tpm2-pytss's pure
types to unmarshal structures and ``make_credential`` to build challenges, and
pyca/cryptography to verify signatures and certificate chains. What each check
proves, in ceremony order:

1. ``verify_ek``: the EK certificate's key is the EK the client sent, and (where
   roots are configured) the certificate chains to a trusted TPM vendor root.
2. ``check_ak``: the AK is a restricted signing key that cannot leave its TPM
   (fixedTPM, fixedParent) — so it only signs TPM-generated data.
3. ``make_activation_challenge`` / ``verify_activation``: only a TPM holding both
   the EK and an object with the AK's *name* can recover the secret, which binds
   the AK to the EK.
4. ``verify_quote``: the AK signed a TPM quote whose extraData is our fresh nonce,
   over the PCR values the client reports.

Every malformed input raises MalformedTPMData (never a parser's own exception).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import importlib.resources
import ssl
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE
from tpm2_pytss.utils import make_credential

from bastion.protocol.errors import (
    AKInvalid,
    CredentialMismatch,
    EKUntrusted,
    MalformedTPMData,
    NonceMismatch,
    QuoteSignatureInvalid,
    UsageError,
)
from bastion.protocol.quote import login_quote_data

MAX_BLOB = 8192
REQUIRED_AK = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
)
# The AK's name (nameAlg || H(public area)) is all that MakeCredential binds the
# challenge to; with a weak hash a second public could share the name of a TPM key.
AK_NAME_ALGS = (TPM2_ALG.SHA256, TPM2_ALG.SHA384, TPM2_ALG.SHA512)


@dataclass(frozen=True, slots=True)
class AKInfo:
    name: bytes
    public_der: bytes
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class QuoteInfo:
    pcr_digest: bytes
    clock: int
    reset_count: int
    restart_count: int
    firmware_version: int


# -- parsing helpers ------------------------------------------------------------------------


def _unmarshal(cls: Any, data: bytes, what: str) -> Any:  # tpm2_pytss has no types
    if not isinstance(data, bytes) or not data or len(data) > MAX_BLOB:
        raise MalformedTPMData(f"{what} is empty or too large")
    try:
        obj, used = cls.unmarshal(data)
    except Exception:  # the TSS raises its own errors on short or bad input
        raise MalformedTPMData(f"{what} is not a valid TPM structure") from None
    if used != len(data):
        raise MalformedTPMData(f"{what} has {len(data) - used} trailing bytes")
    return obj


def _public_key(pub: TPM2B_PUBLIC, what: str) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(pub.to_pem())
    except Exception:
        raise MalformedTPMData(f"{what} does not hold a usable public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise MalformedTPMData(f"{what} is neither RSA nor ECC")
    return key


def _der(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ek_pub_hash(public_der: bytes) -> str:
    return hashlib.sha256(public_der).hexdigest()


# -- 1. the endorsement key -----------------------------------------------------------------


def _der_sorted_sets(der: bytes) -> bytes:
    """Re-order the members of every SET OF into DER order, leaving lengths unchanged.

    Some vendor roots (Nuvoton's 2110 among them) encode a multi-valued name RDN in
    BER order, which cryptography's strict DER parser refuses. A trust anchor is
    used only for its name and key, never to check its own signature, so sorting the
    members (which keeps every length) is safe and lets such roots load.
    """

    def walk(buf: bytes) -> bytes:
        out, i = bytearray(), 0
        while i < len(buf):
            tag = buf[i]
            first = buf[i + 1]
            if first & 0x80:
                n = first & 0x7F
                length = int.from_bytes(buf[i + 2 : i + 2 + n], "big")
                head = 2 + n
            else:
                length, head = first, 2
            body = buf[i + head : i + head + length]
            if tag & 0x20:  # constructed: normalise inside
                body = walk(body)
                if tag == 0x31:
                    body = b"".join(sorted(_elements(body)))
            out += buf[i : i + head] + body
            i += head + length
        return bytes(out)

    return walk(der)


def _elements(buf: bytes) -> list[bytes]:
    items, i = [], 0
    while i < len(buf):
        first = buf[i + 1]
        if first & 0x80:
            n = first & 0x7F
            length, head = int.from_bytes(buf[i + 2 : i + 2 + n], "big"), 2 + n
        else:
            length, head = first, 2
        items.append(buf[i : i + head + length])
        i += head + length
    return items


def parse_trust_root(pem: bytes) -> x509.Certificate:
    """Load a trust root (PEM or DER), tolerating BER-ordered name sets."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        pass
    try:
        return x509.load_der_x509_certificate(pem)
    except ValueError:
        pass
    try:
        text = pem.decode("ascii").strip()
        der = ssl.PEM_cert_to_DER_cert(text) if text.startswith("-----BEGIN") else pem
        return x509.load_der_x509_certificate(_der_sorted_sets(der))
    except (ValueError, IndexError, UnicodeDecodeError):
        raise UsageError("not a PEM or DER X.509 certificate") from None


def load_trust_roots(pems: list[bytes]) -> list[x509.Certificate]:
    return [parse_trust_root(p) for p in pems]


def vendor_roots() -> list[x509.Certificate]:
    """The TPM vendors' EK roots shipped in the package: the default trust store."""
    folder = importlib.resources.files("bastion.enroll") / "ek_roots"
    return load_trust_roots(
        [f.read_bytes() for f in sorted(folder.iterdir(), key=str) if f.name.endswith(".pem")]
    )


def ek_public_der(ek_public: bytes) -> bytes:
    return _der(_public_key(_unmarshal(TPM2B_PUBLIC, ek_public, "EK public"), "EK public"))


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Signature check by hand: real EK certs carry odd extensions that path builders refuse."""
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, x509.UnsupportedGeneralNameType):
        return False
    except Exception:
        return False
    return True


def _valid_now(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _chains(cert: x509.Certificate, pool: list[x509.Certificate], now: datetime.datetime) -> bool:
    """Walk issuer links through ``pool`` (roots and intermediates the admin trusts)."""
    current, seen = cert, 0
    while seen < 8:
        issuers = [c for c in pool if _issued_by(current, c)]
        if not issuers:
            return False
        issuer = issuers[0]
        if not _valid_now(issuer, now):
            raise EKUntrusted(
                f"EK certificate chain has an expired or not yet valid CA: {issuer.subject.rfc4514_string()}"
            )
        if issuer.issuer == issuer.subject or _issued_by(issuer, issuer):
            return True
        if any(issuer == c for c in pool) and not any(_issued_by(issuer, c) for c in pool):
            return True  # an intermediate the admin configured as a trust anchor
        current, seen = issuer, seen + 1
    return False


def verify_ek(
    ek_public: bytes,
    ek_cert_der: bytes | None,
    trust_roots: list[x509.Certificate],
    *,
    registered_ek_hash: str | None = None,
    registered_by_admin: bool = False,
    require_trusted: bool = False,
    now: datetime.datetime | None = None,
) -> str:
    """Return the attestation type the EK earns: tpm_ekpub, tpm_ekcert or tpm_ekcert_trusted.

    ``registered_ek_hash`` is the EK the device is known by (an admin's registration,
    or the one pinned at its first enrollment): any other TPM is refused. With
    ``require_trusted`` the EK must rest on something an attacker cannot make: a
    certificate chaining to a trust root, or an admin's registration of this very EK
    (``registered_by_admin``). A software TPM passes only where an admin trusted its CA.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    ek_key = _public_key(_unmarshal(TPM2B_PUBLIC, ek_public, "EK public"), "EK public")
    der = _der(ek_key)
    ek_hash = ek_pub_hash(der)
    if registered_ek_hash and not hmac.compare_digest(ek_hash, registered_ek_hash):
        raise EKUntrusted("this TPM's endorsement key is not the one registered for the device")
    trusted_by_admin = bool(registered_ek_hash) and registered_by_admin
    if ek_cert_der is None:
        if require_trusted and not trusted_by_admin:
            raise EKUntrusted(_untrusted("sent no EK certificate", ek_hash))
        return "tpm_ekpub"
    try:
        cert = x509.load_der_x509_certificate(ek_cert_der)
        cert_key_der = _der(cert.public_key())  # type: ignore[arg-type]
    except Exception:
        raise MalformedTPMData("EK certificate is not a valid X.509 certificate") from None
    if not hmac.compare_digest(cert_key_der, der):
        raise EKUntrusted("EK certificate does not match the TPM's endorsement key")
    if trust_roots and _chains(cert, trust_roots, now):
        if not _valid_now(cert, now):
            raise EKUntrusted("EK certificate has expired or is not yet valid")
        return "tpm_ekcert_trusted"
    if require_trusted and not trusted_by_admin:
        raise EKUntrusted(
            _untrusted("has an EK certificate that does not chain to a trust root", ek_hash)
        )
    return "tpm_ekcert"


def _untrusted(what: str, ek_hash: str) -> str:
    """Why a TPM is not trusted, and the two ways an admin can vouch for it."""
    return (
        f"this TPM {what}: a password alone does not make a trusted device. An admin can "
        "trust its vendor's EK CA (dtadmin trust-root add CA.pem) or register this "
        f"device's EK (dtadmin device add --ek-pub-hash {ek_hash}, after checking it "
        "on the device)"
    )


# -- 2. the attestation key -------------------------------------------------------------------


def check_ak(ak_public: bytes) -> AKInfo:
    pub = _unmarshal(TPM2B_PUBLIC, ak_public, "AK public")
    attrs = pub.publicArea.objectAttributes
    missing = [
        name
        for name, flag in (
            ("restricted", TPMA_OBJECT.RESTRICTED),
            ("sign", TPMA_OBJECT.SIGN_ENCRYPT),
            ("fixedTPM", TPMA_OBJECT.FIXEDTPM),
            ("fixedParent", TPMA_OBJECT.FIXEDPARENT),
        )
        if not attrs & flag
    ]
    if missing:
        raise AKInvalid(f"attestation key is not {', '.join(missing)}: it could live outside a TPM")
    if attrs & TPMA_OBJECT.DECRYPT:
        raise AKInvalid("attestation key must not be a decryption key")
    if pub.publicArea.nameAlg not in AK_NAME_ALGS:
        raise AKInvalid(
            "attestation key's name must use SHA-256 or stronger: "
            "the credential challenge is bound to that name"
        )
    key = _public_key(pub, "AK public")
    try:
        name = bytes(pub.get_name().marshal())[2:]
    except Exception:
        raise MalformedTPMData("cannot compute the AK name") from None
    return AKInfo(name=name, public_der=_der(key), public_key=key)


# -- 3. credential activation -----------------------------------------------------------------


def make_activation_challenge(
    ek_public: bytes, ak_public: bytes, secret: bytes
) -> tuple[bytes, bytes]:
    ek = _unmarshal(TPM2B_PUBLIC, ek_public, "EK public")
    ak = _unmarshal(TPM2B_PUBLIC, ak_public, "AK public")
    try:
        blob, encrypted = make_credential(ek, secret, ak.get_name())
    except Exception:
        raise MalformedTPMData("cannot build a credential challenge for this EK") from None
    return bytes(blob.marshal()), bytes(encrypted.marshal())


def verify_activation(expected: bytes, answer: bytes) -> None:
    if not isinstance(answer, bytes) or not hmac.compare_digest(expected, answer):
        raise CredentialMismatch("the TPM did not recover the challenge secret")


# -- 4. quotes --------------------------------------------------------------------------------


def _verify_signature(key: object, data: bytes, signature: bytes) -> None:
    sig = _unmarshal(TPMT_SIGNATURE, signature, "quote signature")
    try:
        if sig.sigAlg == TPM2_ALG.ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
            if sig.signature.ecdsa.hash != TPM2_ALG.SHA256:
                raise QuoteSignatureInvalid("quote signature must use SHA-256")
            r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
            s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
        elif sig.sigAlg == TPM2_ALG.RSASSA and isinstance(key, rsa.RSAPublicKey):
            if sig.signature.rsassa.hash != TPM2_ALG.SHA256:
                raise QuoteSignatureInvalid("quote signature must use SHA-256")
            raw = bytes(sig.signature.rsassa.sig)
            key.verify(raw, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise QuoteSignatureInvalid("quote signature algorithm does not match the AK")
    except InvalidSignature:
        raise QuoteSignatureInvalid("quote is not signed by the device's attestation key") from None


def verify_quote(
    ak_public: bytes,
    attest: bytes,
    signature: bytes,
    expected_extra_data: bytes,
    pcr_values: list[bytes],
    pcr_select: list[int],
) -> QuoteInfo:
    ak = check_ak(ak_public)
    att = _unmarshal(TPMS_ATTEST, attest, "quote")
    if att.magic != TPM2_GENERATED.VALUE:
        raise MalformedTPMData("quote was not generated by a TPM (bad magic)")
    if att.type != TPM2_ST.ATTEST_QUOTE:
        raise MalformedTPMData("attestation is not a quote")
    _verify_signature(ak.public_key, attest, signature)
    if not hmac.compare_digest(bytes(att.extraData), expected_extra_data):
        raise NonceMismatch("quote is not over this challenge's nonce (stale or replayed)")
    quote = att.attested.quote
    selected = _selected_pcrs(quote.pcrSelect)
    if selected != sorted(pcr_select) or len(pcr_values) != len(selected):
        raise MalformedTPMData("reported PCRs do not match the quote's selection")
    if any(not isinstance(v, bytes) or len(v) != 32 for v in pcr_values):
        raise MalformedTPMData("PCR values must be SHA-256 digests")
    digest = hashlib.sha256(b"".join(pcr_values)).digest()
    if not hmac.compare_digest(bytes(quote.pcrDigest), digest):
        raise MalformedTPMData("reported PCR values do not match the quoted digest")
    return QuoteInfo(
        pcr_digest=digest,
        clock=int(att.clockInfo.clock),
        reset_count=int(att.clockInfo.resetCount),
        restart_count=int(att.clockInfo.restartCount),
        firmware_version=int(att.firmwareVersion),
    )


def _selected_pcrs(selection: object) -> list[int]:
    out: list[int] = []
    for i in range(selection.count):  # type: ignore[attr-defined]
        sel = selection.pcrSelections[i]  # type: ignore[attr-defined]
        if sel.hash != TPM2_ALG.SHA256:
            raise MalformedTPMData("only the SHA-256 PCR bank is accepted")
        bits = bytes(sel.pcrSelect)[: sel.sizeofSelect]
        out += [byte * 8 + bit for byte, b in enumerate(bits) for bit in range(8) if b >> bit & 1]
    return sorted(out)


__all__ = ["login_quote_data"]
