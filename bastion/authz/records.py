"""Typed records the storage layer returns.

Callers never see rows or dicts from SQLite: every read comes back as one of these
frozen dataclasses, so policy code can be tested with hand-built records and a
PostgreSQL backend only has to produce the same shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from bastion.protocol.quote import POSTURE_PCRS as POSTURE_PCRS
from bastion.protocol.quote import RESETTABLE_PCRS as RESETTABLE_PCRS

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


# Posture: what a failed check means, weakest first. ``warn``: the certificate keeps its
# device extensions and says so; ``withhold``: a certificate without device extensions;
# ``deny``: no certificate at all.
POSTURE_ACTIONS = ("warn", "withhold", "deny")
# The SHA-256 PCRs a device quotes by default (POSTURE_PCRS) and the ones software can
# reset (RESETTABLE_PCRS): defined in the contract, bastion.protocol.quote, which the
# client quotes from too.


@dataclass(frozen=True, slots=True)
class BootChain:
    """One allowed boot: SHA-256 digests (lowercase hex) of the shim, the boot loader
    and the kernel, as the firmware measured them into PCR 4 (EV_EFI_BOOT_SERVICES_
    APPLICATION). A field left None matches anything."""

    name: str = ""
    shim: str | None = None
    bootloader: str | None = None
    kernel: str | None = None


@dataclass(frozen=True, slots=True)
class PosturePolicy:
    """What a device's measured boot must show (the cluster's, or a role's). Every
    check left unset is not made; a policy with no check passes every device."""

    secure_boot: bool = False  # Secure Boot must have been on (PCR 7's SecureBoot variable)
    boot_chains: tuple[BootChain, ...] = ()  # empty: any
    kernel_cmdline: str | None = None  # a regular expression every kernel command line matches
    pcrs: dict[int, str] = field(default_factory=dict)  # exact SHA-256 values, hex
    baseline: bool = False  # the quoted PCRs must equal the baseline recorded at enrollment
    baseline_pcrs: tuple[int, ...] = POSTURE_PCRS  # which PCRs the baseline compares
    on_failure: str = "withhold"  # one of POSTURE_ACTIONS
    # Continuous attestation during the session: the client agent answers a fresh quote
    # every ``attest_interval`` seconds, or the device's sessions end ``attest_grace``
    # seconds after the last good one. 0: not asked.
    attest_interval: int = 0
    attest_grace: int = 0

    @property
    def checks(self) -> bool:
        """Does this policy look at the boot at all (a log or PCR values)?"""
        return bool(
            self.secure_boot or self.boot_chains or self.kernel_cmdline or self.pcrs or self.baseline
        )


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one quote (and the boot event log sent with it) showed about a boot.

    ``pcrs`` are the quoted values, which the AK's signature vouches for. The facts
    read from the log (``secure_boot``, ``boot_chain``, ``cmdlines``) are believed only
    when ``log`` is ``"replayed"``: the log replays to exactly the quoted PCRs."""

    pcrs: dict[int, str]  # PCR index -> SHA-256 value (lowercase hex), as quoted
    log: str = "absent"  # "replayed" | "absent" | "mismatch" | "malformed"
    log_note: str = ""  # why the log is absent, malformed or does not match
    secure_boot: bool | None = None  # None: the log does not say
    boot_chain: tuple[str, ...] = ()  # PCR 4 boot applications' SHA-256 digests, in order
    cmdlines: tuple[str, ...] = ()  # kernel command lines the boot loader measured
    # SHA-256 of kernel files grub measured into PCR 9 (its data names a vmlinuz): a
    # boot chain's kernel matches these or the third PCR 4 application.
    kernel_files: tuple[str, ...] = ()
    time: float = 0.0

    @property
    def trusted_log(self) -> bool:
        return self.log == "replayed"


@dataclass(frozen=True, slots=True)
class DevicePosture:
    """A device's posture as stored: the baseline it is compared with, what it last
    measured and what that meant, and (continuous attestation) until when its live
    sessions stand."""

    device_id: str
    baseline: Measurement | None = None
    baseline_time: float = 0.0
    baseline_by: str = ""  # "enrollment", or the admin who approved it
    measured: Measurement | None = None
    verdict: str = "unchecked"  # "pass" | "warn" | "withhold" | "deny" | "unchecked"
    reasons: tuple[str, ...] = ()
    # Continuous attestation: the device's sessions stand until this wall time (0:
    # not attesting); ``attest_failure`` says why it ended early.
    attested_until: float = 0.0
    attest_failure: str = ""

    @property
    def failed(self) -> bool:
        """The last measurement withholds trust from the device (until it measures
        well again, or an admin approves a new baseline)."""
        return self.verdict in ("withhold", "deny")


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
    # What this role asks of a device's boot (measured-boot posture); None: nothing
    # beyond the cluster's own posture policy.
    posture: PosturePolicy | None = None

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
