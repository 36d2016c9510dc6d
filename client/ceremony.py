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
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from bastion.protocol import wire
from bastion.protocol.quote import login_quote_data
from client.device import collect
from client.profile import DeviceState

PCRS = tuple(range(8))


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
    quote = tpm.quote(ak_dir, challenge.nonce, PCRS)
    # 4. Finish.
    done = await session.call(
        wire.EnrollFinish(
            secret=secret,
            attest=quote.attest,
            signature=quote.signature,
            pcr_select=list(quote.pcr_select),
            pcr_values=list(quote.pcr_values),
        ),
        wire.Enrolled,
    )
    return dict(done.device)


def device_response(
    tpm: Any, ak_dir: Path, nonce: bytes, public_key_line: str, state: DeviceState
) -> wire.DeviceResponse:
    blob = base64.b64decode(public_key_line.split()[1])
    quote = tpm.quote(ak_dir, login_quote_data(nonce, blob), PCRS)
    return wire.DeviceResponse(
        asset_tag=state.asset_tag,
        credential_id=state.credential_id,
        attest=quote.attest,
        signature=quote.signature,
        pcr_select=list(quote.pcr_select),
        pcr_values=list(quote.pcr_values),
    )
