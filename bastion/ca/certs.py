"""OpenSSH certificates: what goes in them, built and read through pyca/cryptography.

Pure functions, no files or database. ``user_cert_spec`` is the signing policy: it
decides principals, validity and extensions from server-side records only (never from
client input), and checks every custom extension value against a strict alphabet,
because asyncssh 2.24 mis-skips unknown extension values and a crafted one could read
as another extension. No custom critical option is ever set: stock sshd refuses
certificates with critical options it does not know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import ssh

from bastion.ca.keys import fingerprint
from bastion.errors import CertificateError
from bastion.rbac import JUMP_PRINCIPAL, Permissions
from bastion.storage.records import Device

EXT_USER = "dt-user@dt-bastion"
EXT_DEVICE_ID = "device-id@dt-bastion"
EXT_ASSET_TAG = "device-asset-tag@dt-bastion"
EXT_CREDENTIAL_ID = "device-credential-id@dt-bastion"
DEVICE_EXTENSIONS = (EXT_DEVICE_ID, EXT_ASSET_TAG, EXT_CREDENTIAL_ID)

EXT_VALUE_RE = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")
BACKDATE_SECONDS = 60
MAX_CERT_BYTES = 16 * 1024

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class UserCertSpec:
    key_id: str
    serial: int
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    extensions: dict[str, str] = field(default_factory=dict)


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
    def device_extensions(self) -> dict[str, str] | None:
        """All three device extensions, or None if any is missing."""
        if all(name in self.extensions for name in DEVICE_EXTENSIONS):
            return {name: self.extensions[name] for name in DEVICE_EXTENSIONS}
        return None

    def valid_at(self, now: float) -> bool:
        return self.valid_after <= now < self.valid_before


def check_extension_value(name: str, value: str) -> str:
    if not isinstance(value, str) or not EXT_VALUE_RE.match(value):
        raise CertificateError(f"refusing to put {value!r} in certificate extension {name}")
    return value


def user_cert_spec(
    *,
    user: str,
    perms: Permissions,
    serial: int,
    now: int,
    ttl: int | None = None,
    device: Device | None = None,
) -> UserCertSpec:
    """The signing policy for one user certificate (see module docstring)."""
    check_extension_value(EXT_USER, user)
    lifetime = perms.max_ttl if ttl is None else min(ttl, perms.max_ttl)
    if lifetime <= 0:
        raise CertificateError(f"certificate lifetime must be positive, not {lifetime}s")
    extensions = {EXT_USER: user}
    for name, allowed in (
        ("permit-port-forwarding", perms.permit_port_forwarding),
        ("permit-pty", perms.permit_pty),
        ("permit-agent-forwarding", perms.permit_agent_forwarding),
        ("permit-X11-forwarding", perms.permit_x11_forwarding),
        ("permit-user-rc", perms.permit_user_rc),
    ):
        if allowed:
            extensions[name] = ""
    if device is not None:
        if not device.enrolled or device.credential is None:
            raise CertificateError(f'device "{device.asset_tag}" is not enrolled')
        extensions[EXT_DEVICE_ID] = check_extension_value(EXT_DEVICE_ID, device.id)
        extensions[EXT_ASSET_TAG] = check_extension_value(EXT_ASSET_TAG, device.asset_tag)
        extensions[EXT_CREDENTIAL_ID] = check_extension_value(
            EXT_CREDENTIAL_ID, device.credential.id
        )
    return UserCertSpec(
        key_id=f"{user}-{serial}",
        serial=serial,
        principals=(*perms.logins, JUMP_PRINCIPAL),
        valid_after=now - BACKDATE_SECONDS,
        valid_before=now + lifetime,
        extensions=extensions,
    )


def sign_user_cert(
    ca_key: ed25519.Ed25519PrivateKey, public_key: PublicKey, spec: UserCertSpec
) -> ssh.SSHCertificate:
    builder = (
        ssh.SSHCertificateBuilder()
        .public_key(public_key)
        .type(ssh.SSHCertificateType.USER)
        .serial(spec.serial)
        .key_id(spec.key_id.encode())
        .valid_principals([p.encode() for p in spec.principals])
        .valid_after(spec.valid_after)
        .valid_before(spec.valid_before)
    )
    for name in sorted(spec.extensions):
        builder = builder.add_extension(name.encode(), spec.extensions[name].encode())
    return builder.sign(ca_key)


def sign_host_cert(
    ca_key: ed25519.Ed25519PrivateKey,
    public_key: PublicKey,
    *,
    principals: tuple[str, ...],
    serial: int,
    key_id: str,
    valid_after: int,
    valid_before: int,
) -> ssh.SSHCertificate:
    if not principals:
        raise CertificateError("a host certificate needs at least one principal (host name)")
    return (
        ssh.SSHCertificateBuilder()
        .public_key(public_key)
        .type(ssh.SSHCertificateType.HOST)
        .serial(serial)
        .key_id(key_id.encode())
        .valid_principals([p.encode() for p in principals])
        .valid_after(valid_after)
        .valid_before(valid_before)
        .sign(ca_key)
    )


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
