"""Each device's measured-boot posture: its baseline, its last measurement and verdict,
and (continuous attestation) until when its live sessions stand.

One row per device, keyed by the device's id (not its asset tag, which an admin may
change). The measurements are JSON (``codec.measurement_to_json``). A row that does
not read raises :class:`StateError`; :meth:`PostureStore._device_and_posture`, which
``facts`` uses, turns it into a failed posture instead, so the decision fails closed.

Portable SQL only: the same module serves the PostgreSQL store.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bastion.authz.records import Device, DevicePosture, Measurement
from bastion.protocol.errors import StateError
from bastion.storage.base import StoreBase
from bastion.storage.codec import dumps as _j
from bastion.storage.codec import measurement_from_json, measurement_to_json
from bastion.storage.devices import DeviceStore

COLUMNS = (
    "device_id",
    "baseline",
    "baseline_time",
    "baseline_by",
    "measured",
    "verdict",
    "reasons",
    "attested_until",
    "attest_failure",
)
VERDICTS = ("pass", "warn", "withhold", "deny", "unchecked")
CORRUPT = "the device's posture record cannot be read (see: dtadmin device posture {tag})"


def _measurement(text: str | None) -> Measurement | None:
    return None if text is None else measurement_from_json(json.loads(text))


def posture_from_row(row: dict[str, Any]) -> DevicePosture:
    """The record of one row (column names as in the table); StateError if it is
    corrupt."""
    try:
        reasons = json.loads(row["reasons"] or "[]")
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            raise ValueError("reasons must be a list of strings")
        verdict = row["verdict"]
        if verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r}")
        return DevicePosture(
            device_id=row["device_id"],
            baseline=_measurement(row["baseline"]),
            baseline_time=float(row["baseline_time"] or 0.0),
            baseline_by=row["baseline_by"] or "",
            measured=_measurement(row["measured"]),
            verdict=verdict,
            reasons=tuple(reasons),
            attested_until=float(row["attested_until"] or 0.0),
            attest_failure=row["attest_failure"] or "",
        )
    except (ValueError, TypeError) as exc:
        raise StateError(
            f"the posture record of device {row['device_id']} is corrupt in the database: {exc}"
        ) from None


class PostureStore(StoreBase):
    """The device_posture table."""

    def find_device_posture(self, device_id: str) -> DevicePosture | None:
        row = self._one(
            f"SELECT {', '.join(COLUMNS)} FROM device_posture WHERE device_id = ?",  # nosec B608
            (device_id,),
        )
        return posture_from_row(row) if row else None

    def put_device_posture(self, posture: DevicePosture) -> None:
        """Write the whole record (insert or replace), in the caller's transaction,
        which decides the bump: a verdict that moved must make every bastion re-decide
        the device's live sessions, but a login measuring as before changes nothing they
        decided (``boot_posture.changes_trust``), and bumping for it would make every
        login re-check every session on every bastion."""
        if posture.verdict not in VERDICTS:
            raise ValueError(f"unknown posture verdict {posture.verdict!r}")
        params = (
            posture.device_id,
            None if posture.baseline is None else _j(measurement_to_json(posture.baseline)),
            posture.baseline_time,
            posture.baseline_by,
            None if posture.measured is None else _j(measurement_to_json(posture.measured)),
            posture.verdict,
            _j(list(posture.reasons)),
            posture.attested_until,
            posture.attest_failure,
            time.time(),
        )
        updates = ", ".join(f"{c} = excluded.{c}" for c in (*COLUMNS[1:], "updated"))
        self._exec(
            f"INSERT INTO device_posture ({', '.join(COLUMNS)}, updated) "  # nosec B608
            f"VALUES ({','.join('?' * (len(COLUMNS) + 1))}) "
            f"ON CONFLICT(device_id) DO UPDATE SET {updates}",
            params,
            bump=False,
        )

    def set_attestation(self, device_id: str, until: float, failure: str = "") -> None:
        """Only the continuous-attestation fields (the row is made if there is none).

        A good quote (no ``failure``) does not bump the revision: every device's agent
        answers every few seconds, and nothing any bastion decided changes. A failure
        does, so every bastion re-checks that device's sessions and cuts them (the
        caller records its audit event in the same transaction)."""
        self._exec(
            "INSERT INTO device_posture (device_id, attested_until, attest_failure, updated) "
            "VALUES (?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET "
            "attested_until = excluded.attested_until, "
            "attest_failure = excluded.attest_failure, updated = excluded.updated",
            (device_id, until, failure, time.time()),
            bump=bool(failure),
        )

    def _device_and_posture(self, asset_tag: str) -> tuple[Device | None, DevicePosture | None]:
        """The device named and its posture, in one statement (``facts`` sends no more
        round trips for it than before). A posture record that does not read comes
        back as a denying one, so the device is trusted with nothing."""
        columns = ", ".join(f"p.{c} AS p_{c}" for c in COLUMNS)
        row = self._one(
            f"SELECT d.*, {columns} FROM devices d "  # nosec B608
            "LEFT JOIN device_posture p ON p.device_id = d.id WHERE d.asset_tag = ?",
            (asset_tag,),
        )
        if row is None:
            return None, None
        device = DeviceStore._device(row)
        if row["p_device_id"] is None:
            return device, None
        try:
            return device, posture_from_row({c: row[f"p_{c}"] for c in COLUMNS})
        except StateError:
            return device, DevicePosture(
                device.id, verdict="deny", reasons=(CORRUPT.format(tag=asset_tag),)
            )
