"""Device authentication at login: proof that the enrolled TPM is present *now*.

1. ``challenge``: a fresh 32-byte nonce, single use, valid for 60 s.
2. ``verify``: the client's quote must be signed by the device's stored AK over
   ``sha256(nonce || user public key blob)``, binding this TPM answer to the exact key
   the certificate will be issued for; the device must be enrolled, owned by this
   user, unlocked, and the credential id must be the stored one.

The nonce is forgotten as soon as an answer arrives, right or wrong, so a captured
quote can never be replayed, not even on the same connection.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from bastion import audit
from bastion.authz import decide
from bastion.authz.records import Device
from bastion.enroll import attest
from bastion.protocol.errors import DeviceNotTrusted, DTError, NonceExpired, ProtocolError
from bastion.protocol.wire import DeviceResponse
from bastion.storage import StateStore

NONCE_TTL = 60.0


@dataclass
class _Challenge:
    nonce: bytes
    expires: float


class DeviceAuthentication:
    """One device-authentication ceremony per certificate request."""

    def __init__(self, store: StateStore, user: str, *, remote_addr: str | None = None) -> None:
        self.store = store
        self.user = user
        self.remote_addr = remote_addr
        self._challenge: _Challenge | None = None

    def challenge(self, now: float | None = None) -> bytes:
        now = time.time() if now is None else now
        self._challenge = _Challenge(secrets.token_bytes(32), now + NONCE_TTL)
        return self._challenge.nonce

    def verify(
        self, msg: DeviceResponse, public_key_blob: bytes, now: float | None = None
    ) -> Device:
        now = time.time() if now is None else now
        challenge, self._challenge = self._challenge, None
        try:
            if challenge is None:
                raise ProtocolError("device_response without a device challenge")
            if now > challenge.expires:
                raise NonceExpired("device challenge expired (60 s); log in again")
            device = self._device(msg, now)
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
        except DTError as exc:
            self._record(False, exc.message, getattr(msg, "asset_tag", None), now, exc.code)
            raise
        self._record(True, "device authenticated", device.asset_tag, now, None)
        return device

    def _device(self, msg: DeviceResponse, now: float) -> Device:
        facts = self.store.facts(user=self.user, asset_tag=msg.asset_tag, now=now)
        if facts.device is None:
            raise DeviceNotTrusted(f'device "{msg.asset_tag}" is not enrolled')
        return decide.check_device_login(facts.device, self.user, msg.credential_id, facts, now)

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
