"""OpenSSH certificates: what goes in them, built and read through pyca/cryptography.

Pure functions, no files or database. ``user_cert_spec`` is the signing policy: it
decides principals, validity and extensions from server-side records only (never from
client input), and checks every custom extension value against a strict alphabet,
because asyncssh 2.24 mis-skips unknown extension values and a crafted one could read
as another extension. No custom critical option is ever set: stock sshd refuses
certificates with critical options it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import ssh

from bastion.authz.rbac import Permissions
from bastion.authz.records import Device
from bastion.protocol.certs import (
    DEVICE_EXTENSIONS,
    EXT_ASSET_TAG,
    EXT_BOT,
    EXT_CREDENTIAL_ID,
    EXT_DEVICE_ID,
    EXT_POSTURE,
    EXT_USER,
    EXT_VALUE_RE,
    JUMP_PRINCIPAL,
    MAX_CERT_BYTES,
    POSTURE_VALUES,
    ParsedCert,
    PublicKey,
    fingerprint,
    load_public_key,
    parse_cert,
    valid_extension_value,
)
from bastion.protocol.errors import CertificateError

BACKDATE_SECONDS = 60


@dataclass(frozen=True, slots=True)
class UserCertSpec:
    key_id: str
    serial: int
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    extensions: dict[str, str] = field(default_factory=dict)


def check_extension_value(name: str, value: str) -> str:
    if not valid_extension_value(value):
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
    posture: str | None = None,
) -> UserCertSpec:
    """The signing policy for one user certificate (see module docstring)."""
    check_extension_value(EXT_USER, user)
    default = perms.default_ttl or perms.max_ttl
    lifetime = default if ttl is None else min(ttl, perms.max_ttl)
    if lifetime <= 0:
        raise CertificateError(f"certificate lifetime must be positive, not {lifetime}s")
    extensions = {EXT_USER: user}
    if perms.bot:
        if device is not None:
            raise CertificateError(f'bot "{user}" cannot have a device certificate')
        extensions[EXT_BOT] = user
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
        if posture is not None:
            if posture not in POSTURE_VALUES:
                raise CertificateError(f"refusing posture verdict {posture!r} in {EXT_POSTURE}")
            extensions[EXT_POSTURE] = posture
    elif posture is not None:
        raise CertificateError("a posture verdict goes only on a certificate with a device")
    return UserCertSpec(
        key_id=f"bot-{user}-{serial}" if perms.bot else f"{user}-{serial}",
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


__all__ = [
    "BACKDATE_SECONDS",
    "DEVICE_EXTENSIONS",
    "EXT_ASSET_TAG",
    "EXT_BOT",
    "EXT_CREDENTIAL_ID",
    "EXT_DEVICE_ID",
    "EXT_POSTURE",
    "EXT_USER",
    "EXT_VALUE_RE",
    "JUMP_PRINCIPAL",
    "MAX_CERT_BYTES",
    "ParsedCert",
    "PublicKey",
    "UserCertSpec",
    "check_extension_value",
    "fingerprint",
    "load_public_key",
    "parse_cert",
    "sign_host_cert",
    "sign_user_cert",
    "user_cert_spec",
]
