"""The measured-boot step both ceremonies share (enrollment and device login).

1. The challenge names the PCRs to quote and whether to send the boot event log, from
   the posture policies that apply to the user (``bastion.authz.posture``). Where none
   applies it names neither, and the line is the one older clients always read.
2. The answer's quote must cover exactly the PCRs named (checked after its signature);
   its PCR values and the log (decompressed, bounded) are measured
   (``bastion.enroll.measured``) and judged by the core; the shells write the verdict
   and audit it with the ceremony's own event, in one transaction.

The people-facing wording of a failed verdict lives here too, so enrollment and login
say it alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion import audit
from bastion.authz import posture
from bastion.authz.facts import Facts
from bastion.authz.records import DevicePosture, Measurement
from bastion.enroll import measured
from bastion.protocol.errors import EventLogMalformed, MalformedTPMData
from bastion.protocol.eventlog import decompress_log
from bastion.storage import StateStore


@dataclass(frozen=True, slots=True)
class Asked:
    """What a challenge asks of the device's boot: the PCRs (None: any the client
    quotes, for a user no posture policy applies to) and whether to send the log."""

    pcr_select: tuple[int, ...] | None = None
    event_log: bool = False

    @property
    def wire_pcr_select(self) -> list[int] | None:
        return list(self.pcr_select) if self.pcr_select is not None else None


def asked(facts: Facts) -> Asked:
    if not posture.applicable(facts):
        return Asked()
    return Asked(posture.pcr_selection(facts), posture.needs_log(facts))


def check_selection(wanted: Asked, quoted: list[int]) -> None:
    """The quote covers exactly the PCRs the challenge named: fewer would hide one a
    policy reads, more would be a client choosing what it proves."""
    if wanted.pcr_select is not None and sorted(quoted) != list(wanted.pcr_select):
        raise MalformedTPMData(
            f"the quote covers PCRs {_listed(sorted(quoted))}, not the "
            f"{_listed(wanted.pcr_select)} the bastion asked for (upgrade dtclient)"
        )


def _listed(pcrs: Any) -> str:
    return ",".join(str(p) for p in pcrs) or "none"


def measure_answer(
    pcr_select: list[int],
    pcr_values: list[bytes],
    event_log: bytes | None,
    event_log_error: str | None,
    wanted: Asked,
    now: float,
) -> Measurement:
    """The measurement of a verified quote (values in ascending PCR order, as the
    quote's digest already proved) and the log the client sent with it."""
    quoted = dict(zip(sorted(pcr_select), pcr_values, strict=True))
    log: bytes | None = None
    note = ""
    if event_log is not None:
        try:
            log = decompress_log(event_log)
        except EventLogMalformed as exc:
            note = exc.message
    elif event_log_error:
        note = f"the device could not read its boot event log: {event_log_error[:300]}"
    elif wanted.event_log:
        note = "the device sent no boot event log"
    return measured.measure(quoted, log, note, now)


def denied_message(tag: str, verdict: posture.Verdict, *, enrolling: bool = False) -> str:
    why = verdict.message or "it does not satisfy the posture policy"
    if enrolling:
        return f'device "{tag}" was not enrolled: its boot fails the posture policy: {why}'
    return (
        f'device "{tag}" failed its posture check: {why}; the posture policy refuses it a '
        f"certificate (after a legitimate change an admin reviews the new boot with "
        f"dtadmin device posture {tag} and approves it with the command that prints)"
    )


def withheld_message(tag: str, verdict: posture.Verdict) -> str:
    return (
        f'device "{tag}" failed its posture check: {verdict.message}; after a legitimate '
        f"change an admin reviews it with dtadmin device posture {tag} and approves it"
    )


def warning_message(tag: str, verdict: posture.Verdict) -> str:
    return f'device "{tag}" posture warning: {verdict.message}'


def record_verdict(
    store: StateStore,
    record: DevicePosture,
    verdict: posture.Verdict,
    *,
    user: str,
    tag: str,
    remote_addr: str | None,
    at: str,
    now: float,
) -> None:
    """Write the posture and its audit event (in the caller's transaction)."""
    store.put_device_posture(record)
    audit_verdict(
        store, record.measured, verdict, user=user, tag=tag, remote_addr=remote_addr, at=at, now=now
    )


def audit_verdict(
    store: StateStore,
    measurement: Measurement | None,
    verdict: posture.Verdict,
    *,
    user: str,
    tag: str,
    remote_addr: str | None,
    at: str,
    now: float,
) -> None:
    """``device.posture``: every measured verdict (``at`` enrollment or login), a
    failure when it withholds or denies trust. Where no policy looks at the boot
    (``unchecked``) there is no verdict to record."""
    if verdict.status == "unchecked":
        return
    audit.record(
        store,
        "device.posture",
        success=not verdict.failed,
        message=(
            f'device "{tag}" posture {verdict.status} at {at}'
            + (f": {verdict.message}" if verdict.reasons else "")
        ),
        user=user,
        device=tag,
        remote_addr=remote_addr,
        verdict=verdict.status,
        reasons=list(verdict.reasons) or None,
        log=measurement.log if measurement else None,
        log_note=(measurement.log_note or None) if measurement else None,
        pcrs=",".join(str(p) for p in measurement.pcrs) if measurement else None,
        at=at,
        now=now,
    )


def changes_trust(old: DevicePosture | None, new: DevicePosture) -> bool:
    """Whether running bastions must re-decide (bump): the verdict moved."""
    return old is None or old.verdict != new.verdict
