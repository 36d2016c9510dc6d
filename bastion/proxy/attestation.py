"""Continuous attestation: the bastion's end of ``dtclient agent``.

A role's posture policy can ask a device to keep proving, during its sessions, that it
is the enrolled TPM and that its boot has not changed (``attest_interval``,
``attest_grace``). The client agent holds a dt-api connection with the certificate of
that device and sends ``attest_begin``; from then on, this module, one instance per
agent connection:

1. decides the agent may speak for the device: a certificate connection whose issued
   record names the device, the device enrolled to this user with this credential,
   and a policy that asks it (else ``attest_result not_required``);
2. every ``interval`` seconds sends ``attest_challenge`` (a fresh nonce, the PCRs to
   quote) and waits up to ``grace`` seconds for the answer (a real TPM quotes in
   200-600 ms; never less than :data:`MIN_ANSWER`);
3. checks the quote: signed by the device's stored AK over
   ``quote.attest_quote_data(nonce)``, the PCRs asked for, and their values those
   measured at login (``posture.drift``, "PCR 4 changed during the session: ...");
4. a good one moves the device's ``attested_until`` to now + interval + grace (and
   ``posture.ATTEST_MARGIN`` for the bastion's own work), with
   no revision bump and no audit row (the live sessions cache that deadline,
   :mod:`bastion.proxy.sessions`); a failure (bad quote, drift, no answer in time)
   sets it to 0 with the reason, bumping the revision so that every bastion's watcher
   cuts the device's sessions within a poll, audits ``device.attest``, tells the
   agent why and closes the connection.

The agent's connect and disconnect are audited once each; good quotes never are.
Quotes are checked on the event loop (one ECDSA verification, well under a
millisecond): a flood of password checks on the workers' call lane must not make a
device miss its deadline. Reads and writes go through :mod:`bastion.proxy.workers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bastion import audit
from bastion.authz import decide, posture
from bastion.authz.facts import Facts
from bastion.authz.records import Measurement
from bastion.enroll import attest
from bastion.protocol import wire
from bastion.protocol.errors import (
    AccessDenied,
    AttestationError,
    DeviceNotTrusted,
    DTError,
    ProtocolError,
    StorageUnavailable,
)
from bastion.protocol.quote import attest_quote_data
from bastion.storage import StateStore

if TYPE_CHECKING:
    from bastion.proxy.api import ApiSession

log = logging.getLogger("bastion.attestation")
EVENT = "device.attest"
# The least time an answer is given, whatever the grace: a real TPM's quote takes up
# to ~600 ms, and the round trip and the client's own start come on top.
MIN_ANSWER = 1.0
# When no policy asks the device: the agent asks again this much later.
NOT_REQUIRED_RETRY = 60
NOT_ASKED = "no posture policy of your roles asks this device for continuous attestation"


@dataclass(frozen=True, slots=True)
class Turn:
    """What one challenge needs, read afresh before each: the device and its AK, the
    PCRs to quote and their values at login, and the policy's timing."""

    device_id: str
    asset_tag: str
    ak_public: bytes
    measured: Measurement | None
    pcrs: tuple[int, ...]
    interval: int
    grace: int


# -- the decisions (pure) ---------------------------------------------------------------


def plan(facts: Facts, user: str, asset_tag: str, credential_id: str, now: float) -> Turn | None:
    """May this certificate connection attest for the device it names, and how? None:
    no policy asks the device. Raises AccessDenied / DeviceNotTrusted with the reason.

    ``facts`` are read for the connection's serial and the asset tag the agent gave: the
    certificate's issued record names a device id, which must be that asset tag's,
    enrolled to this user under this credential and not locked."""
    decide.check_user(facts, now, user)
    issued, device = facts.issued, facts.device
    if issued is None or issued.device_id is None:
        raise AccessDenied(
            "continuous attestation needs a certificate with device extensions: log in "
            "from the enrolled device (dtclient login)"
        )
    if device is None or device.id != issued.device_id or device.asset_tag != asset_tag:
        raise DeviceNotTrusted(f'this certificate was not issued for device "{asset_tag}"')
    device = decide.check_device_login(device, user, credential_id, facts, now)
    timing = posture.continuous(facts)
    if timing is None:
        return None
    assert device.credential is not None  # check_device_login refused it otherwise
    stored = facts.device_posture
    return Turn(
        device_id=device.id,
        asset_tag=device.asset_tag,
        ak_public=device.credential.ak_public,
        measured=stored.measured if stored is not None else None,
        pcrs=posture.pcr_selection(facts),
        interval=timing[0],
        grace=timing[1],
    )


def check_answer(turn: Turn, nonce: bytes, answer: wire.AttestResponse) -> None:
    """The answer to one challenge is a fresh quote by the device's AK over the PCRs
    asked for, whose values are those measured at login. Raises AttestationError or
    DeviceNotTrusted (drift) with the reason."""
    if sorted(answer.pcr_select) != list(turn.pcrs):
        raise AttestationError(
            f"the quote covers PCRs {sorted(answer.pcr_select)}, not the {list(turn.pcrs)} asked for"
        )
    attest.verify_quote(
        turn.ak_public,
        answer.attest,
        answer.signature,
        attest_quote_data(nonce),
        list(answer.pcr_values),
        list(answer.pcr_select),
    )
    if turn.measured is None:
        raise DeviceNotTrusted(
            "no measured boot of this device is on record to compare with (log in again: "
            "dtclient login)"
        )
    quoted = Measurement(pcrs=quoted_pcrs(answer))
    changed = posture.drift(turn.measured, quoted, turn.pcrs, since="during the session")
    if changed:
        raise DeviceNotTrusted("; ".join(changed))


def quoted_pcrs(answer: wire.AttestResponse) -> dict[int, str]:
    """The quote's PCR values as a Measurement holds them (index -> lowercase hex);
    only call once ``verify_quote`` has matched them to the signed digest."""
    return {i: v.hex() for i, v in zip(sorted(answer.pcr_select), answer.pcr_values, strict=True)}


def answer_time(grace: int) -> float:
    return max(float(grace), MIN_ANSWER)


# -- the writes ----------------------------------------------------------------------------


def record_good(store: StateStore, device_id: str, until: float) -> None:
    """A good quote: the device's sessions stand until ``until``. No bump (nothing any
    bastion must decide again) and no audit row (one every few seconds per device)."""
    with store.transaction(bump=False):
        store.set_attestation(device_id, until)


def record_failure(
    store: StateStore, device_id: str, reason: str, message: str, **fields: Any
) -> None:
    """A failure: the deadline goes to 0 with the reason (what a cut session is told,
    after 'device "TAG" is no longer attested: '), and the revision moves, so every
    bastion's watcher decides the device's sessions again at once; audited in the same
    commit."""
    with store.transaction():
        store.set_attestation(device_id, 0.0, reason)
        audit.record(store, EVENT, success=False, message=message, **fields)


# -- one agent connection --------------------------------------------------------------------


class AgentConnection:
    """The challenges of one agent connection, until it fails, ends or goes away."""

    def __init__(self, api: ApiSession, begin: wire.AttestBegin) -> None:
        self.api = api
        self.workers = api.workers
        self.begin = begin
        self.ended = False  # its end is on record (a failure, or no longer asked)

    def _fields(self) -> dict[str, Any]:
        return {
            "user": self.api.identity.user,
            "device": self.begin.asset_tag,
            "remote_addr": self.api.identity.remote_addr,
        }

    async def _plan(self) -> Turn | None:
        identity, begin = self.api.identity, self.begin
        if identity.auth != "certificate" or identity.serial is None:
            raise AccessDenied(
                "continuous attestation needs a certificate login with device extensions "
                "(dtclient agent, started by dtclient login)"
            )
        now = time.time()

        def read(store: StateStore) -> Turn | None:
            facts = store.facts(
                user=identity.user, serial=identity.serial, asset_tag=begin.asset_tag, now=now
            )
            return plan(facts, identity.user, begin.asset_tag, begin.credential_id, now)

        return await self.workers.read(read)

    async def run(self, reader: Any, writer: Any) -> Any:
        """The handler's answer: ``attest_result`` when the agent is not asked (or a
        failure when the connection could not be closed); raises EOFError when the agent
        went away, which ends the dt-api session quietly."""
        try:
            turn = await self._plan()
        except StorageUnavailable:
            raise
        except DTError as exc:  # the request's error, as for any other; on record
            self.workers.audit_soon(
                EVENT, success=False, message=f"attestation agent refused: {exc.message}",
                reason=exc.code, **self._fields(),
            )  # fmt: skip
            raise
        if turn is None:
            return not_required()
        self.workers.audit_soon(
            EVENT,
            message=f"attestation agent connected (a quote every {turn.interval} s, "
            f"grace {turn.grace} s)",
            **self._fields(),
        )
        try:
            return await self._challenges(turn, reader, writer)
        finally:
            if not self.ended:  # went away, or its connection was closed for another reason
                self.workers.audit_soon(
                    EVENT, message="attestation agent disconnected", **self._fields()
                )

    async def _challenges(self, turn: Turn, reader: Any, writer: Any) -> Any:
        while True:
            started = time.monotonic()
            failure = await self._one(turn, reader, writer)
            if failure is not None:
                return await self._fail(turn, failure, writer)
            await wire.write_message(writer, wire.AttestResult(status="ok", next_in=turn.interval))
            # The re-check and re-plan read during the interval, not after it: the
            # deadline just set counts from this answer, so time spent reading after the
            # sleep (a busy lane, a database round trip) would come out of the agent's
            # grace, and an agent answering within its budget would see its device's
            # sessions cut at the deadline meanwhile.
            if self.api.recheck is not None:
                await self.api.recheck()  # the credential still stands (else: closed)
            try:
                fresh = await self._plan()
            except StorageUnavailable:
                fresh = turn  # not the device's fault: challenge it on what was read last
            except AccessDenied as exc:
                return await self._fail(turn, exc.message, writer)
            if fresh is None:
                self.ended = True
                self.workers.audit_soon(
                    EVENT, message=f"attestation agent ended: {NOT_ASKED}", **self._fields()
                )
                return not_required()
            await asyncio.sleep(max(0.0, started + turn.interval - time.monotonic()))
            turn = fresh

    async def _one(self, turn: Turn, reader: Any, writer: Any) -> str | None:
        """One challenge and its answer: None if good (and recorded), else why not."""
        nonce = secrets.token_bytes(32)
        await wire.write_message(
            writer,
            wire.AttestChallenge(
                nonce=nonce, pcr_select=list(turn.pcrs), interval=turn.interval, grace=turn.grace
            ),
        )
        budget = answer_time(turn.grace)
        try:
            async with asyncio.timeout(budget):
                answer = await wire.read_message(reader, budget + 1)
        except TimeoutError:
            return f"its attestation agent did not answer within {budget:g} s"
        except ProtocolError as exc:
            return f"its attestation agent's answer is not a quote ({exc.message})"
        if isinstance(answer, wire.Error):
            return f"its TPM did not answer the attestation challenge: {answer.message[:200]}"
        if not isinstance(answer, wire.AttestResponse):
            return f"its attestation agent answered {wire.type_name(answer)!r}, not a quote"
        try:
            check_answer(turn, nonce, answer)
        except DTError as exc:
            return exc.message
        until = posture.attested_until(time.time(), turn.interval, turn.grace)
        try:
            await self.workers.write(record_good, turn.device_id, until)
        except StorageUnavailable:
            log.warning("could not record a good quote of %s; its sessions may end", turn.asset_tag)
        return None

    async def _fail(self, turn: Turn, reason: str, writer: Any) -> Any:
        why = f'continuous attestation of device "{turn.asset_tag}" failed: {reason}'
        log.warning("%s (user %s)", why, self.api.identity.user)
        self.ended = True
        await self.workers.persist(
            functools.partial(record_failure, **self._fields()), turn.device_id, reason, why
        )
        with contextlib.suppress(OSError, ConnectionError):
            await wire.write_message(writer, wire.AttestResult(status="failed", reason=why))
        if self.api.terminate is not None:
            await self.api.terminate(why)
            raise EOFError  # closed: nothing more to answer
        return wire.AttestResult(status="failed", reason=why)


def not_required() -> wire.AttestResult:
    return wire.AttestResult(status="not_required", reason=NOT_ASKED, next_in=NOT_REQUIRED_RETRY)


async def serve(api: ApiSession, msg: Any, reader: Any, writer: Any) -> Any:
    """The dt-api handler of ``attest_begin`` (see the module docstring)."""
    return await AgentConnection(api, msg).run(reader, writer)
