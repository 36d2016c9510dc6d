"""Device authentication at login: proof that the enrolled TPM is present *now*, and
that it booted what the posture policies allow.

1. ``challenge``: a fresh 32-byte nonce, single use, valid for 60 s; the PCRs to quote
   and whether to send the boot event log, from the posture policies that apply to the
   user (``boot_posture.asked``; none: the challenge older clients always read).
2. ``verify``: the client's quote must be signed by the device's stored AK over
   ``sha256(nonce || user public key blob)``, binding this TPM answer to the exact key
   the certificate will be issued for, and cover exactly the PCRs asked; the device
   must be enrolled, owned by this user, unlocked, and the credential id must be the
   stored one. Then the boot is measured and judged against the device's baseline, and
   the posture record (and, under continuous attestation, until when it stands) is
   written with ``device.posture`` and ``device.authenticate`` in one transaction.
   ``deny`` raises PostureDenied (no certificate), ``withhold`` DeviceNotTrusted (a
   certificate without device extensions), ``warn`` passes with ``warning`` set.

The nonce is forgotten as soon as an answer arrives, right or wrong, so a captured
quote can never be replayed, not even on the same connection.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace

from bastion import audit
from bastion.authz import decide, posture
from bastion.authz.facts import Facts
from bastion.authz.records import Device, DevicePosture, Measurement
from bastion.enroll import attest, boot_posture
from bastion.protocol import wire
from bastion.protocol.errors import (
    DeviceNotTrusted,
    DTError,
    NonceExpired,
    PostureDenied,
    ProtocolError,
)
from bastion.protocol.wire import DeviceResponse
from bastion.storage import StateStore

NONCE_TTL = 60.0


@dataclass
class _Challenge:
    nonce: bytes
    expires: float
    asked: boot_posture.Asked = field(default_factory=boot_posture.Asked)


class DeviceAuthentication:
    """One device-authentication ceremony per certificate request.

    After a successful ``verify``: ``verdict`` (the posture verdict), ``warning`` (a
    ``warn`` verdict's text for the user) and ``attest_interval`` (seconds between the
    agent's quotes where a policy asks for continuous attestation)."""

    def __init__(self, store: StateStore, user: str, *, remote_addr: str | None = None) -> None:
        self.store = store
        self.user = user
        self.remote_addr = remote_addr
        self._challenge: _Challenge | None = None
        self.verdict: posture.Verdict | None = None
        self.warning: str | None = None
        self.attest_interval: int | None = None

    def challenge(self, now: float | None = None, *, facts: Facts | None = None) -> bytes:
        """A fresh nonce, and what to ask of the boot from ``facts`` (the user's, just
        read by the caller) or, without them, from a read of the store."""
        now = time.time() if now is None else now
        if facts is None:
            facts = self.store.facts(user=self.user, now=now)
        asked = boot_posture.asked(facts)
        self._challenge = _Challenge(secrets.token_bytes(32), now + NONCE_TTL, asked)
        return self._challenge.nonce

    def challenge_message(
        self, now: float | None = None, *, facts: Facts | None = None
    ) -> wire.DeviceChallenge:
        """:meth:`challenge` as the dt-api message (without ``facts`` it reads the
        store: then run it on a worker)."""
        nonce = self.challenge(now, facts=facts)
        assert self._challenge is not None
        asked = self._challenge.asked
        return wire.DeviceChallenge(
            nonce=nonce, pcr_select=asked.wire_pcr_select, event_log=asked.event_log
        )

    def verify(
        self, msg: DeviceResponse, public_key_blob: bytes, now: float | None = None
    ) -> Device:
        now = time.time() if now is None else now
        challenge, self._challenge = self._challenge, None
        self.verdict, self.warning, self.attest_interval = None, None, None
        try:
            if challenge is None:
                raise ProtocolError("device_response without a device challenge")
            if now > challenge.expires:
                raise NonceExpired("device challenge expired (60 s); log in again")
            device, facts = self._device(msg, now)
            if device.credential is None:  # check_device_login refused it already
                raise DeviceNotTrusted(f'device "{device.asset_tag}" is not enrolled')
            attest.verify_quote(
                device.credential.ak_public,
                msg.attest,
                msg.signature,
                attest.login_quote_data(challenge.nonce, public_key_blob),
                list(msg.pcr_values),
                list(msg.pcr_select),
            )
            boot_posture.check_selection(challenge.asked, list(msg.pcr_select))
        except DTError as exc:
            self._record(False, exc.message, getattr(msg, "asset_tag", None), now, exc.code)
            raise
        measurement = boot_posture.measure_answer(
            list(msg.pcr_select),
            list(msg.pcr_values),
            msg.event_log,
            msg.event_log_error,
            challenge.asked,
            now,
        )
        return self._judge(device, facts, measurement, now)

    def _device(self, msg: DeviceResponse, now: float) -> tuple[Device, Facts]:
        facts = self.store.facts(user=self.user, asset_tag=msg.asset_tag, now=now)
        if facts.device is None:
            raise DeviceNotTrusted(f'device "{msg.asset_tag}" is not enrolled')
        device = decide.check_device_login(facts.device, self.user, msg.credential_id, facts, now)
        return device, facts

    def _judge(self, device: Device, facts: Facts, measurement: Measurement, now: float) -> Device:
        """Judge the boot against the stored baseline, write the posture with both audit
        events in one transaction, then say what the verdict costs."""
        old = facts.device_posture
        if old is not None and old.device_id != device.id:
            old = None  # a record of a device since removed and added again
        baseline = old.baseline if old is not None else None
        verdict = posture.evaluate(facts, measurement, baseline)
        asked = posture.continuous(facts)
        record = self._record_of(device, old, measurement, verdict, asked, now)
        tag = device.asset_tag
        refusal: DTError | None = None
        if verdict.status == "deny":
            refusal = PostureDenied(boot_posture.denied_message(tag, verdict))
        elif verdict.failed:
            refusal = DeviceNotTrusted(boot_posture.withheld_message(tag, verdict))
        # Where no policy applies and none did last time, the record stays as it is:
        # a cluster without posture writes (and bumps) nothing more per login than before.
        unchanged = old is not None and old.verdict == "unchecked" and not posture.applicable(facts)
        with self.store.transaction(bump=boot_posture.changes_trust(old, record)):
            if not unchanged:
                boot_posture.record_verdict(
                    self.store,
                    record,
                    verdict,
                    user=self.user,
                    tag=tag,
                    remote_addr=self.remote_addr,
                    at="login",
                    now=now,
                )
            self._record(
                refusal is None,
                refusal.message if refusal else "device authenticated",
                tag,
                now,
                refusal.code if refusal else None,
            )
        self.verdict = verdict
        if refusal is not None:
            raise refusal
        if verdict.status == "warn":
            self.warning = boot_posture.warning_message(tag, verdict)
        self.attest_interval = asked[0] if asked is not None else None
        return device

    @staticmethod
    def _record_of(
        device: Device,
        old: DevicePosture | None,
        measurement: Measurement,
        verdict: posture.Verdict,
        asked: tuple[int, int] | None,
        now: float,
    ) -> DevicePosture:
        """The posture record after this login: the baseline kept (or, for a device
        enrolled before posture was measured, this boot, when it passes), the
        measurement and verdict, and under continuous attestation a deadline this good
        quote sets (a failed one ends it)."""
        record = old or DevicePosture(device_id=device.id)
        if record.baseline is None and not verdict.failed:
            record = replace(
                record, baseline=measurement, baseline_time=now, baseline_by="first login"
            )
        record = replace(
            record, measured=measurement, verdict=verdict.status, reasons=verdict.reasons
        )
        if asked is not None:
            interval, grace = asked
            if verdict.failed:
                record = replace(record, attested_until=0.0, attest_failure=verdict.message)
            else:
                record = replace(
                    record,
                    attested_until=posture.attested_until(now, interval, grace),
                    attest_failure="",
                )
        return record

    def _record(
        self, ok: bool, message: str, tag: str | None, now: float, reason: str | None
    ) -> None:
        try:
            audit.record(
                self.store,
                "device.authenticate",
                success=ok,
                message=message,
                user=self.user,
                device=tag,
                remote_addr=self.remote_addr,
                reason=reason,
                now=now,
            )
        except DTError:
            if ok:
                raise  # never grant what we cannot audit
