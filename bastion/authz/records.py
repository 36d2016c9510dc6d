"""Typed records the storage layer returns.

Callers never see rows or dicts from SQLite: every read comes back as one of these
frozen dataclasses, so policy code can be tested with hand-built records and a
PostgreSQL backend only has to produce the same shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# Names that end up in certificates, SSH user names, YAML and file names. The same
# alphabet as certificate extension values (DESIGN.md, Security rules).
NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,128}$")
# Unix login names a certificate may carry as principals.
LOGIN_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$|^\{\{internal\.logins\}\}$")

# Weakest first. ``required-for-humans``: as ``required`` for people, ``optional`` for
# bot users (automation has no TPM to prove; Teleport's mode of that name).
TRUST_MODES = ("off", "optional", "required-for-humans", "required")
ENROLL_STATUSES = ("not_enrolled", "enrolled")
ATTESTATION_TYPES = ("tpm_ekpub", "tpm_ekcert", "tpm_ekcert_trusted")


@dataclass(frozen=True, slots=True)
class User:
    name: str
    roles: tuple[str, ...]
    logins: tuple[str, ...] = ()
    password_hash: str | None = None
    totp_secret: str | None = None
    totp_last_step: int | None = None
    created: float = 0.0
    updated: float = 0.0
    created_by: str = ""
    # A bot (automation, CI): no password, no one-time code, no signup, no device; its
    # certificates come from `dtadmin auth sign` or a bot token and say it is a bot.
    bot: bool = False

    @property
    def signed_up(self) -> bool:
        return bool(self.password_hash and self.totp_secret)


@dataclass(frozen=True, slots=True)
class Rule:
    """Permission to use verbs on resources, as in the seed's role rules."""

    resources: tuple[str, ...]
    verbs: tuple[str, ...]

    def allows(self, resource: str, verb: str) -> bool:
        return (resource in self.resources or "*" in self.resources) and (
            verb in self.verbs or "*" in self.verbs
        )


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    logins: tuple[str, ...] = ()
    # label name -> allowed values; "*": ("*",) allows every node.
    node_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    max_session_ttl: int = 12 * 3600
    # None means "this role does not say"; only the cluster default then applies.
    device_trust_mode: str | None = None
    permit_port_forwarding: bool = True
    permit_pty: bool = True
    permit_agent_forwarding: bool = False
    permit_x11_forwarding: bool = False
    permit_user_rc: bool = False
    preset: bool = False
    description: str = ""
    # End live sessions when the certificate expires (Teleport's option of that name).
    # None: on where this role requires a trusted device, off elsewhere, so a long
    # transfer is not cut unless a role asks for it.
    disconnect_expired_cert: bool | None = None
    # The least a trusted device's TPM attestation must be for this role (one of
    # ATTESTATION_TYPES, weakest first); None: any enrolled device will do.
    device_attestation: str | None = None

    def allows(self, resource: str, verb: str) -> bool:
        return any(rule.allows(resource, verb) for rule in self.rules)


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    id: str
    public_key_der: bytes
    attestation_type: str
    ek_pub_hash: str
    # Marshalled TPM2B_PUBLIC of the AK: verifying quotes needs the TPM form, not only DER.
    ak_public: bytes = b""


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    asset_tag: str
    os_type: str
    enroll_status: str = "not_enrolled"
    owner: str = ""
    credential: DeviceCredential | None = None
    collected_data: tuple[dict[str, Any], ...] = ()
    profile: dict[str, Any] = field(default_factory=dict)
    # An EK registered ahead of enrollment (by hash) pins the device to one TPM.
    ek_pub_hash: str | None = None
    created: float = 0.0
    updated: float = 0.0

    @property
    def enrolled(self) -> bool:
        return self.enroll_status == "enrolled" and self.credential is not None


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    host: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0

    @property
    def addr(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Lock:
    id: str
    target_kind: str  # "user" | "device"
    target: str
    message: str = ""
    expires: float | None = None
    created: float = 0.0
    created_by: str = ""

    def active(self, now: float) -> bool:
        return self.expires is None or self.expires > now


@dataclass(frozen=True, slots=True)
class Token:
    """A single-use secret, stored only as its hash (enrollment or signup)."""

    token_hash: str
    kind: str  # "enroll" | "signup" | "bot"
    # asset tag for enroll tokens, user name for signup tokens, bot name for bot tokens
    subject: str
    expires: float
    created: float = 0.0
    created_by: str = ""
    consumed: float | None = None
    consumed_by: str | None = None


@dataclass(frozen=True, slots=True)
class IssuedCert:
    serial: int
    key_id: str
    user: str
    cert_type: str  # "user" | "host"
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    public_key_fingerprint: str
    device_id: str | None = None
    issued: float = 0.0
    revoked: float | None = None


@dataclass(frozen=True, slots=True)
class OpenSession:
    """A forwarded session some bastion process (``instance``) holds open right now."""

    instance: str
    session_id: int
    started: float
    user: str | None = None
    device: str | None = None
    node: str | None = None
    remote_addr: str | None = None
    serial: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    id: int
    time: float
    code: str
    type: str
    success: bool
    message: str = ""
    user: str | None = None
    device: str | None = None
    remote_addr: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    hash: str | None = None  # its link in the audit chain (hex SHA-256), once stored
