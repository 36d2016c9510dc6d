"""Server side of device enrollment: a two-step state machine, no sockets, no TPM.

1. ``begin``: the user's right to enroll (a token bound to this device, or the
   self-enroll permission with ``current_device``), the EK (certificate chain to a
   trust root, or the EK registered for the device), the AK's attributes; then a
   credential-activation challenge for (EK, AK name) and a fresh nonce. Nothing is
   written yet.
2. ``finish``: within the deadline, the activation secret and a quote by the AK over
   the nonce, covering exactly the PCRs the challenge named (the posture policies'
   selection), with the boot event log where a policy reads it; the boot is measured
   and judged (``boot_posture``): a ``deny`` verdict refuses the enrollment. Then, in
   ONE transaction: spend the token, store the AK as the device credential, mark the
   device enrolled, record its posture (this measurement is its baseline) and audit.
   A crash anywhere before the commit leaves no half-enrolled device and no burnt
   token.

Every refusal raises a DTError subclass and leaves an audit event with its reason.
"""

from __future__ import annotations

import hmac
import secrets
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509

from bastion import audit
from bastion.authz import decide, posture, rbac
from bastion.authz.facts import Facts
from bastion.authz.records import Device, DeviceCredential, DevicePosture, Measurement, Token
from bastion.enroll import attest, boot_posture
from bastion.enroll.tokens import check_enroll_token
from bastion.protocol.errors import (
    AccessDenied,
    AttestationError,
    DTError,
    EKUntrusted,
    NonceExpired,
    PostureDenied,
    ProtocolError,
    TokenInvalid,
)
from bastion.protocol.wire import EnrollBegin, EnrollChallenge, EnrollFinish
from bastion.storage import StateStore

STEP_DEADLINE = 30.0  # real TPMs are slow: an RSA EK can take seconds
SUPPORTED_OS = ("linux", "macos", "windows")
# Inventory fields that auto-enrollment compares with what the device reports.
PROFILE_FIELDS = ("os_type", "system_serial", "board_serial", "machine_id")


@dataclass(frozen=True, slots=True)
class EnrollPolicy:
    trust_roots: tuple[x509.Certificate, ...] = ()
    # An EK must chain to a trust root or be registered by an admin (the product's
    # policy, load_policy); False only for tests of the ceremony's other steps.
    require_trusted_ek: bool = False


def load_policy(store: StateStore) -> EnrollPolicy:
    """The cluster's policy: the TPM vendors' roots shipped in the package plus the
    roots an admin added; an EK that rests on neither (nor on an admin's registration
    of it) is refused, so a stolen password cannot enroll the attacker's own TPM."""
    pems = [row["pem"].encode() for row in store.list_trust_roots()]
    roots = (*attest.vendor_roots(), *attest.load_trust_roots(pems))
    return EnrollPolicy(trust_roots=roots, require_trusted_ek=True)


def device_view(device: Device) -> dict[str, Any]:
    """What the client is told about its device after enrollment."""
    return {
        "id": device.id,
        "asset_tag": device.asset_tag,
        "os_type": device.os_type,
        "enroll_status": device.enroll_status,
        "owner": device.owner,
        "credential_id": device.credential.id if device.credential else None,
        "attestation_type": device.credential.attestation_type if device.credential else None,
    }


def enrolled_view(device: Device, verdict: posture.Verdict | None) -> dict[str, Any]:
    """:func:`device_view`, and what the posture policy made of the device's boot
    where one looked at it (``posture``, ``posture_reasons``)."""
    view = device_view(device)
    if verdict is not None and verdict.status != "unchecked":
        view["posture"] = verdict.status
        view["posture_reasons"] = list(verdict.reasons)
    return view


@dataclass
class _Pending:
    device: Device
    token: Token | None
    ek_hash: str
    attestation_type: str
    ak_public: bytes
    ak_public_der: bytes
    secret: bytes
    nonce: bytes
    deadline: float
    collected: dict[str, Any] = field(default_factory=dict)
    self_enroll: bool = False  # --current-device: the role's right is decided again at commit
    asked: boot_posture.Asked = field(default_factory=boot_posture.Asked)


class EnrollmentCeremony:
    """One enrollment attempt by one authenticated user on one dt-api connection."""

    def __init__(
        self,
        store: StateStore,
        user: str,
        *,
        remote_addr: str | None = None,
        policy: EnrollPolicy | None = None,
        step_deadline: float = STEP_DEADLINE,
    ) -> None:
        self.store = store
        self.user = user
        self.remote_addr = remote_addr
        self.policy = policy if policy is not None else load_policy(store)
        self.step_deadline = step_deadline
        self._pending: _Pending | None = None
        self.verdict: posture.Verdict | None = None  # the posture verdict at finish

    # -- 1. begin -------------------------------------------------------------------------

    def begin(self, msg: EnrollBegin, now: float | None = None) -> EnrollChallenge:
        now = time.time() if now is None else now
        tag: str | None = None
        try:
            tag = _asset_tag(msg.device_data)
            if self._pending is not None:
                raise ProtocolError("an enrollment is already in progress on this connection")
            device, token = self._authorize(msg, tag, now)
            ek_hash = self._ek_identity(msg)
            self._check_ek_identity(device, ek_hash)
            attestation_type = attest.verify_ek(
                msg.ek_public,
                msg.ek_cert_der,
                list(self.policy.trust_roots),
                registered_ek_hash=_admin_registered_ek(device) or device.ek_pub_hash,
                registered_by_admin=_admin_registered_ek(device) is not None,
                require_trusted=self.policy.require_trusted_ek,
            )
            ak = attest.check_ak(msg.ak_public)
            secret = secrets.token_bytes(32)
            blob, encrypted = attest.make_activation_challenge(msg.ek_public, msg.ak_public, secret)
            asked = boot_posture.asked(self.store.facts(user=self.user, now=now))
        except DTError as exc:
            self._deny(exc, tag, now)
            raise
        self._pending = _Pending(
            device=device,
            token=token,
            ek_hash=ek_hash,
            attestation_type=attestation_type,
            ak_public=msg.ak_public,
            ak_public_der=ak.public_der,
            secret=secret,
            nonce=secrets.token_bytes(32),
            deadline=now + self.step_deadline,
            collected=dict(msg.device_data),
            self_enroll=bool(msg.current_device) and token is None,
            asked=asked,
        )
        return EnrollChallenge(
            credential_blob=blob,
            encrypted_secret=encrypted,
            nonce=self._pending.nonce,
            pcr_select=asked.wire_pcr_select,
            event_log=asked.event_log,
        )

    @staticmethod
    def _ek_identity(msg: EnrollBegin) -> str:
        """The device's identity, derived from the EK the activation challenge is bound
        to. ``ek_public_der`` is the client's own claim about it: compared, never used."""
        der = attest.ek_public_der(msg.ek_public)
        if not hmac.compare_digest(der, msg.ek_public_der):
            raise EKUntrusted(
                "the endorsement key the client names (ek_public_der) is not the one it "
                "sent for the challenge (ek_public)"
            )
        return attest.ek_pub_hash(der)

    def _authorize(self, msg: EnrollBegin, tag: str, now: float) -> tuple[Device, Token | None]:
        os_type = str(msg.device_data.get("os_type", "linux"))
        decide.check_may_enroll(self.store.facts(user=self.user, now=now))
        if msg.token:
            token = check_enroll_token(self.store, msg.token, self.user, now)
            if token.subject != tag:
                raise TokenInvalid(f'enrollment token is for device "{token.subject}", not "{tag}"')
            device = self.store.get_device(tag)
            decide.check_enrollment_by(device, self.user, by_token=True)
            return device, token
        if not msg.current_device:
            return self._auto_enroll(msg, tag), None
        if not decide.may_self_enroll(self.store.facts(user=self.user, now=now)):
            raise AccessDenied(
                "enrolling your own device needs the editor or device-admin role; "
                "ask an admin for an enrollment token"
            )
        found = self.store.find_device(tag)
        if found is None:
            found = Device(id="", asset_tag=tag, os_type=os_type, owner=self.user)
        self._check_not_owned_by_other(found)
        return found, None

    def _auto_enroll(self, msg: EnrollBegin, tag: str) -> Device:
        """No token: allowed only with auto-enroll on and data matching the inventory profile."""
        if not self.store.get_setting("auto_enroll", False):
            raise TokenInvalid(
                "enrollment needs a token (--token) or --current-device "
                "(auto-enrollment is off on this cluster)"
            )
        device = self.store.find_device(tag)
        if device is None or not device.profile:
            raise AccessDenied(f'auto-enrollment: device "{tag}" is not in the imported inventory')
        self._check_not_owned_by_other(device)
        owner = device.profile.get("owner") or device.owner
        if owner and owner != self.user:
            raise AccessDenied(f'auto-enrollment: device "{tag}" is assigned to another user')
        for name in PROFILE_FIELDS:
            expected = device.profile.get(name)
            if expected and msg.device_data.get(name) != expected:
                raise AccessDenied(
                    f"auto-enrollment: {name} reported by the device does not match the inventory"
                )
        return device

    def _check_not_owned_by_other(self, device: Device) -> None:
        decide.check_enrollment_by(device, self.user, by_token=False)

    def _check_ek_identity(self, device: Device, ek_hash: str) -> None:
        known = device.ek_pub_hash or (device.credential.ek_pub_hash if device.credential else None)
        if known and known != ek_hash:
            raise EKUntrusted(
                f'device "{device.asset_tag}" is registered with a different TPM '
                "(endorsement key mismatch)"
            )

    # -- 2. finish ------------------------------------------------------------------------

    def finish(self, msg: EnrollFinish, now: float | None = None) -> Device:
        now = time.time() if now is None else now
        pending = self._pending
        self._pending = None  # one answer per challenge, right or wrong
        tag = pending.device.asset_tag if pending else None
        try:
            if pending is None:
                raise ProtocolError("enroll_finish without enroll_begin")
            if now > pending.deadline:
                raise NonceExpired("enrollment challenge expired; start again")
            attest.verify_activation(pending.secret, msg.secret)
            attest.verify_quote(
                pending.ak_public,
                msg.attest,
                msg.signature,
                pending.nonce,
                list(msg.pcr_values),
                list(msg.pcr_select),
            )
            boot_posture.check_selection(pending.asked, list(msg.pcr_select))
            measurement, verdict = self._judge(pending, msg, now)
            device = self._commit(pending, now, measurement, verdict)
        except DTError as exc:
            self._deny(exc, tag, now)
            raise
        self.verdict = verdict
        return device

    def _judge(
        self, pending: _Pending, msg: EnrollFinish, now: float
    ) -> tuple[Measurement, posture.Verdict]:
        """The boot the quote shows, judged with no baseline (this one becomes it); a
        ``deny`` verdict ends the enrollment here, audited with its reasons."""
        measurement = boot_posture.measure_answer(
            list(msg.pcr_select),
            list(msg.pcr_values),
            msg.event_log,
            msg.event_log_error,
            pending.asked,
            now,
        )
        facts = self.store.facts(user=self.user, asset_tag=pending.device.asset_tag, now=now)
        verdict = posture.evaluate(facts, measurement, _kept_baseline(facts, pending.device))
        if verdict.status == "deny":
            tag = pending.device.asset_tag
            boot_posture.audit_verdict(
                self.store,
                measurement,
                verdict,
                user=self.user,
                tag=tag,
                remote_addr=self.remote_addr,
                at="enrollment",
                now=now,
            )
            raise PostureDenied(boot_posture.denied_message(tag, verdict, enrolling=True))
        return measurement, verdict

    def _commit(
        self, pending: _Pending, now: float, measurement: Measurement, verdict: posture.Verdict
    ) -> Device:
        credential = DeviceCredential(
            id=str(uuid.uuid4()),
            public_key_der=pending.ak_public_der,
            attestation_type=pending.attestation_type,
            ek_pub_hash=pending.ek_hash,
            ak_public=pending.ak_public,
        )
        with self.store.transaction():
            if pending.token is not None and not self.store.consume_token(
                pending.token.token_hash, "enroll", now=now, consumer=self.user
            ):
                raise TokenInvalid("enrollment token was already used or has expired")
            current = self.store.find_device(pending.device.asset_tag)
            # Decided again under the write lock: an owner assigned, an enrollment by
            # someone else or a role removed during the TPM round trip counts.
            if current is not None:
                decide.check_enrollment_by(current, self.user, by_token=pending.token is not None)
                self._check_ek_identity(current, pending.ek_hash)
            if pending.token is None and pending.self_enroll:
                if not decide.may_self_enroll(self.store.facts(user=self.user, now=now)):
                    raise AccessDenied("your role no longer allows enrolling your own device")
            base = current or pending.device
            device = replace(
                base,
                enroll_status="enrolled",
                owner=self.user,
                credential=credential,
                ek_pub_hash=pending.ek_hash,
                collected_data=(*base.collected_data[-9:], {**pending.collected, "time": now}),
            )
            device = self.store.update_device(device) if current else self.store.add_device(device)
            old = self.store.find_device_posture(device.id) if current else None
            kept = old if old is not None and old.baseline is not None else None
            record = DevicePosture(
                device_id=device.id,
                baseline=kept.baseline if kept else measurement,
                baseline_time=kept.baseline_time if kept else now,
                baseline_by=kept.baseline_by if kept else "enrollment",
                measured=measurement,
                verdict=verdict.status,
                reasons=verdict.reasons,
            )
            boot_posture.record_verdict(
                self.store,
                record,
                verdict,
                user=self.user,
                tag=device.asset_tag,
                remote_addr=self.remote_addr,
                at="enrollment",
                now=now,
            )
            audit.record(
                self.store,
                "device.enroll",
                message=f'Device "{device.asset_tag}"/{device.os_type} enrolled',
                user=self.user,
                device=device.asset_tag,
                remote_addr=self.remote_addr,
                credential_id=credential.id,
                attestation_type=credential.attestation_type,
                token_used=pending.token is not None,
                now=now,
            )
        return device

    def _deny(self, exc: DTError, tag: str | None, now: float) -> None:
        try:
            audit.record(
                self.store,
                "device.enroll",
                success=False,
                message=exc.message,
                user=self.user,
                device=tag,
                remote_addr=self.remote_addr,
                reason=exc.code,
                now=now,
            )
        except DTError:
            pass  # the refusal stands even if it cannot be audited


def _kept_baseline(facts: Facts, device: Device) -> Measurement | None:
    """The baseline a device enrolled before keeps when it enrolls again: a new one
    is an admin's to approve (dtadmin device posture approve), not its owner's to
    reset by enrolling the tampered boot."""
    old = facts.device_posture
    if not device.id or old is None or old.device_id != device.id:
        return None
    return old.baseline


def _admin_registered_ek(device: Device) -> str | None:
    """The EK hash an admin registered for the device (``dtadmin device add
    --ek-pub-hash``), kept in its inventory profile: unlike the EK pinned at a first
    enrollment, it vouches for the TPM."""
    value = device.profile.get("ek_pub_hash")
    return value if isinstance(value, str) and value else None


def _asset_tag(device_data: dict[str, Any]) -> str:
    tag = device_data.get("asset_tag")
    if not isinstance(tag, str) or not rbac.NAME_RE.fullmatch(tag):
        raise ProtocolError("device_data.asset_tag is missing or not a valid asset tag")
    os_type = device_data.get("os_type", "linux")
    if os_type not in SUPPORTED_OS:
        raise ProtocolError(f"device_data.os_type {os_type!r} is not supported")
    return tag


__all__ = [
    "AttestationError",
    "EnrollmentCeremony",
    "EnrollPolicy",
    "device_view",
    "enrolled_view",
    "load_policy",
]
