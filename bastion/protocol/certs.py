"""OpenSSH certificates and public keys as both programs read them.

Part of the shared contract: the extension names, the alphabet their values must
keep to, and the strict parser (pyca/cryptography's ``load_ssh_public_identity``).
The CA's signing policy lives in ``bastion.ca.certs``; nothing here signs.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import ssh

from bastion.protocol.errors import CertificateError

EXT_USER = "dt-user@dt-bastion"
EXT_DEVICE_ID = "device-id@dt-bastion"
EXT_ASSET_TAG = "device-asset-tag@dt-bastion"
EXT_CREDENTIAL_ID = "device-credential-id@dt-bastion"
DEVICE_EXTENSIONS = (EXT_DEVICE_ID, EXT_ASSET_TAG, EXT_CREDENTIAL_ID)
# The posture verdict on the device's measured boot when the certificate was issued
# ("pass", "warn", or "unchecked" where no posture policy looks at the boot): only on
# certificates with the device extensions, so a node-side check can require it too.
EXT_POSTURE = "device-posture@dt-bastion"
POSTURE_VALUES = ("pass", "warn", "unchecked")
# On a bot user's certificate, its value the bot's name (the key id starts "bot-" too).
EXT_BOT = "dt-bot@dt-bastion"
# A principal no Unix account can have: the bastion trusts the user CA only for it,
# so the SSH user name a client presents to the bastion does not matter.
JUMP_PRINCIPAL = "-dt-jump"

EXT_VALUE_RE = re.compile(r"[A-Za-z0-9._@-]{1,128}")
MAX_CERT_BYTES = 16 * 1024

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def fingerprint(key: ssh.SSHPublicKeyTypes) -> str:
    """``SHA256:...`` as ssh-keygen -l prints it."""
    digest = ssh.ssh_key_fingerprint(key, hashes.SHA256())
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def public_line(key: ssh.SSHPublicKeyTypes, comment: str = "") -> str:
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line.decode() + (f" {comment}" if comment else "")


def valid_extension_value(value: object) -> bool:
    """Whole-string match: ``$`` would let a trailing newline through."""
    return isinstance(value, str) and EXT_VALUE_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class ParsedCert:
    """A certificate as we read it back, custom extensions decoded."""

    cert_type: str  # "user" | "host"
    key_id: str
    serial: int
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    extensions: dict[str, str]
    critical_options: dict[str, str]
    ca_fingerprint: str
    key_fingerprint: str
    public_key: PublicKey
    certificate: ssh.SSHCertificate

    @property
    def user(self) -> str | None:
        return self.extensions.get(EXT_USER)

    @property
    def is_bot(self) -> bool:
        """Says it is a bot user's: the bot extension, naming the same user."""
        return EXT_BOT in self.extensions and self.extensions[EXT_BOT] == self.user

    @property
    def device_extensions(self) -> dict[str, str] | None:
        """All three device extensions, or None if any is missing."""
        if all(name in self.extensions for name in DEVICE_EXTENSIONS):
            return {name: self.extensions[name] for name in DEVICE_EXTENSIONS}
        return None

    @property
    def posture(self) -> str | None:
        """The posture verdict of a certificate with device extensions; None without
        them, or when it names no verdict this version knows."""
        value = self.extensions.get(EXT_POSTURE)
        if self.device_extensions is None or value not in POSTURE_VALUES:
            return None
        return value

    def valid_at(self, now: float) -> bool:
        return self.valid_after <= now < self.valid_before


def load_public_key(data: bytes) -> PublicKey:
    """A plain (non-certificate) OpenSSH public key line, with a clear error."""
    if len(data) > MAX_CERT_BYTES:
        raise CertificateError("public key is too large")
    try:
        key = ssh.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, ssh.UnsupportedAlgorithm) as exc:
        raise CertificateError(f"not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CertificateError("unsupported public key type (use Ed25519, ECDSA or RSA)")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise CertificateError(f"RSA key of {key.key_size} bits is too weak (need 2048+)")
    return key


def _decode_values(raw: dict[bytes, bytes], what: str) -> dict[str, str]:
    out = {}
    for name, value in raw.items():
        try:
            out[name.decode("ascii")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise CertificateError(f"certificate {what} {name!r} is not text") from None
    return out


def parse_cert(data: bytes) -> ParsedCert:
    """Read an OpenSSH certificate (one-line form), refusing anything odd clearly.

    The CA signature is verified here; whether that CA is *ours* is the caller's check
    (compare ``ca_fingerprint``).
    """
    if len(data) > MAX_CERT_BYTES:
        raise CertificateError("certificate is too large")
    try:
        cert = ssh.load_ssh_public_identity(data.strip())
    except (ValueError, TypeError, ssh.UnsupportedAlgorithm) as exc:
        raise CertificateError(f"malformed certificate: {exc}") from None
    if not isinstance(cert, ssh.SSHCertificate):
        raise CertificateError("this is a plain public key, not a certificate")
    try:
        cert.verify_cert_signature()
    except Exception:  # cryptography raises InvalidSignature or ValueError
        raise CertificateError("certificate signature does not verify") from None
    try:
        principals = tuple(p.decode("utf-8") for p in cert.valid_principals)
        key_id = cert.key_id.decode("utf-8")
    except UnicodeDecodeError:
        raise CertificateError("certificate principals or key id are not text") from None
    return ParsedCert(
        cert_type="user" if cert.type == ssh.SSHCertificateType.USER else "host",
        key_id=key_id,
        serial=cert.serial,
        principals=principals,
        valid_after=cert.valid_after,
        valid_before=cert.valid_before,
        extensions=_decode_values(cert.extensions, "extension"),
        critical_options=_decode_values(cert.critical_options, "critical option"),
        ca_fingerprint=fingerprint(cert.signature_key()),
        key_fingerprint=fingerprint(cert.public_key()),
        public_key=cert.public_key(),
        certificate=cert,
    )
