"""Client side of the device ceremonies, with the TPM injected.

The TPM object is anything with ``endorsement()``, ``load_or_create_ak(dir)``,
``activate_credential(dir, blob, secret)`` and ``quote(dir, nonce)`` (client.tpm.TPM
in real use), so tests can put a second, attacker-controlled TPM in its place.

Enrollment:
  1. EK (certificate or public key) and the AK (made once, kept as a TPM-wrapped blob).
  2. ``enroll_begin`` with the device data; the bastion answers with a credential
     challenge bound to (EK, AK name) and a nonce.
  3. ActivateCredential recovers the secret (only the TPM holding both keys can);
     the AK quotes PCRs over the nonce.
  4. ``enroll_finish``; the bastion stores the AK as the device credential.

Authentication at login: the AK quotes over sha256(nonce || user public key blob).

Both quotes cover exactly the SHA-256 PCRs the bastion's challenge names (its posture
policy's selection; POSTURE_PCRS when it names none), and when the challenge asks for
it the boot event log goes along, compressed, or the reason it could not be read (the
person is told on stderr how to fix that).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bastion.protocol import console, wire
from bastion.protocol.errors import ProtocolError
from bastion.protocol.eventlog import compress_log
from bastion.protocol.quote import NUM_PCRS, POSTURE_PCRS, RESETTABLE_PCRS, login_quote_data
from client.device import collect
from client.eventlog_source import EventLogRead, read_event_log
from client.profile import DeviceState

PCRS = POSTURE_PCRS


def pcr_selection(asked: Sequence[int] | None) -> tuple[int, ...]:
    """The PCRs to quote: exactly those the bastion asks for, refusing what no bastion
    of ours asks (a PCR software can reset, a PCR that does not exist)."""
    if asked is None:
        return PCRS
    wanted = tuple(sorted(set(asked)))
    if not wanted or len(wanted) != len(asked):
        raise ProtocolError("dt-api: the bastion asked for an empty or repeated PCR selection")
    odd = [p for p in wanted if not 0 <= p < NUM_PCRS or p in RESETTABLE_PCRS]
    if odd:
        raise ProtocolError(
            f"dt-api: the bastion asked to quote PCR {odd[0]}, which proves nothing"
        )
    return wanted


def event_log_fields(
    wanted: bool, read: Callable[[], EventLogRead] = read_event_log
) -> dict[str, Any]:
    """``event_log`` / ``event_log_error`` for the answer: nothing when not asked."""
    if not wanted:
        return {}
    found = read()
    if found.log is None:
        if found.advice:
            console.note(f"warning: {found.advice}")
        return {"event_log_error": found.reason or "the boot event log could not be read"}
    return {"event_log": compress_log(found.log)}


async def enroll(
    session: Any,
    tpm: Any,
    ak_dir: Path,
    *,
    token: str | None,
    current_device: bool,
    tag_override: str | None = None,
) -> dict[str, Any]:
    # 1. Endorsement key and attestation key.
    ek = tpm.endorsement()
    ak_public = tpm.load_or_create_ak(ak_dir)
    data = collect(ek.public_der, tag_override=tag_override)
    # 2. Begin: the bastion checks our right to enroll, the EK and the AK.
    challenge = await session.call(
        wire.EnrollBegin(
            token=token,
            current_device=current_device,
            device_data=data,
            ek_public=ek.public,
            ek_public_der=ek.public_der,
            ek_cert_der=ek.cert_der,
            ak_public=ak_public,
        ),
        wire.EnrollChallenge,
    )
    # 3. Prove the AK lives in this TPM, and quote over the nonce.
    secret = tpm.activate_credential(ak_dir, challenge.credential_blob, challenge.encrypted_secret)
    quote = tpm.quote(ak_dir, challenge.nonce, pcr_selection(challenge.pcr_select))
    # 4. Finish, with the boot event log where the bastion's posture policy reads it.
    done = await session.call(
        wire.EnrollFinish(
            secret=secret,
            attest=quote.attest,
            signature=quote.signature,
            pcr_select=list(quote.pcr_select),
            pcr_values=list(quote.pcr_values),
            **event_log_fields(challenge.event_log),
        ),
        wire.Enrolled,
    )
    view = dict(done.device)
    _say_posture(view)
    return view


def _say_posture(view: dict[str, Any]) -> None:
    """What the posture policy made of the boot at enrollment, when it did not pass."""
    reasons = "; ".join(str(r) for r in view.get("posture_reasons") or ())
    if view.get("posture") == "warn":
        console.note(f"warning: this device's boot passed with a posture warning: {reasons}")
    elif view.get("posture") == "withhold":
        console.note(
            f"warning: this device is enrolled, but its boot fails the posture policy "
            f"({reasons}): its certificates carry no device extensions until it boots as "
            "the policy allows or an admin accepts its boot (dtadmin device posture approve)"
        )


def device_response(
    tpm: Any,
    ak_dir: Path,
    nonce: bytes,
    public_key_line: str,
    state: DeviceState,
    *,
    pcr_select: Sequence[int] | None = None,
    event_log: bool = False,
) -> wire.DeviceResponse:
    """The answer to a device_challenge (its ``nonce``, ``pcr_select`` and ``event_log``)."""
    blob = base64.b64decode(public_key_line.split()[1])
    quote = tpm.quote(ak_dir, login_quote_data(nonce, blob), pcr_selection(pcr_select))
    return wire.DeviceResponse(
        asset_tag=state.asset_tag,
        credential_id=state.credential_id,
        attest=quote.attest,
        signature=quote.signature,
        pcr_select=list(quote.pcr_select),
        pcr_values=list(quote.pcr_values),
        **event_log_fields(event_log),
    )


def answer_challenge(
    tpm: Any, ak_dir: Path, challenge: wire.DeviceChallenge, public_key_line: str,
    state: DeviceState,
) -> wire.DeviceResponse:  # fmt: skip
    return device_response(
        tpm, ak_dir, challenge.nonce, public_key_line, state,
        pcr_select=challenge.pcr_select, event_log=challenge.event_log,
    )  # fmt: skip
