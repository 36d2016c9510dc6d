"""How values are written into SQLite columns: compact, sorted JSON, and role specs.

One encoding, so a value written by one bastion compares equal byte for byte when
read by another, and `dtadmin get roles/NAME` shows exactly what is stored.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from typing import Any

from bastion.authz import posture
from bastion.authz.records import Measurement, Role, Rule
from bastion.protocol.errors import UsageError

_HEX = re.compile(r"^[0-9a-f]*$")


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def role_to_spec(role: Role) -> dict[str, Any]:
    spec = asdict(role)
    spec["rules"] = [{"resources": list(r.resources), "verbs": list(r.verbs)} for r in role.rules]
    spec["logins"] = list(role.logins)
    spec["node_labels"] = {k: list(v) for k, v in role.node_labels.items()}
    # The policy in its document form (what `dtadmin posture` and the role YAML read).
    # Left out when unset, so a role without one is stored byte for byte as before
    # and a bastion of the previous release still reads it; one that has a policy is
    # unreadable there (no ``posture`` field), which that release treats as strictest.
    del spec["posture"]
    if role.posture is not None:
        spec["posture"] = posture.policy_doc(role.posture)
    return spec


def role_from_spec(spec: dict[str, Any]) -> Role:
    """A role from its stored spec; ValueError (or TypeError, KeyError) for one that
    does not read, which the store reports as a corrupt role."""
    spec = dict(spec)
    spec["logins"] = tuple(spec.get("logins", ()))
    spec["node_labels"] = {k: tuple(v) for k, v in spec.get("node_labels", {}).items()}
    spec["rules"] = tuple(
        Rule(tuple(r["resources"]), tuple(r["verbs"])) for r in spec.get("rules", ())
    )
    if spec.get("posture") is not None:
        spec["posture"] = _policy(spec["posture"], f"role {spec.get('name')!r} posture")
    return Role(**spec)


def _policy(doc: object, where: str) -> posture.PosturePolicy:
    try:
        return posture.policy_from_doc(doc, where)
    except UsageError as exc:
        raise ValueError(exc.message) from None


# -- measurements -----------------------------------------------------------------------------


def measurement_to_json(m: Measurement) -> dict[str, Any]:
    """A measurement as stored: PCR numbers as JSON object keys (strings), digests as
    lowercase hex."""
    return {
        "pcrs": {str(index): value for index, value in sorted(m.pcrs.items())},
        "log": m.log,
        "log_note": m.log_note,
        "secure_boot": m.secure_boot,
        "boot_chain": list(m.boot_chain),
        "cmdlines": list(m.cmdlines),
        "kernel_files": list(m.kernel_files),
        "time": m.time,
    }


def measurement_from_json(doc: Any) -> Measurement:
    """The inverse of :func:`measurement_to_json`; ValueError for anything that is not
    one (the store reports it as a corrupt posture record)."""
    if not isinstance(doc, dict):
        raise ValueError("a measurement must be a JSON object")
    pcrs = doc.get("pcrs", {})
    if not isinstance(pcrs, dict):
        raise ValueError("measurement pcrs must be an object")
    values: dict[int, str] = {}
    for key, value in pcrs.items():
        if not isinstance(key, str) or not key.isdigit() or not 0 <= int(key) <= 23:
            raise ValueError(f"measurement PCR {key!r} is not a PCR number")
        if not isinstance(value, str) or not _HEX.fullmatch(value):
            raise ValueError(f"measurement PCR {key} is not lowercase hex")
        values[int(key)] = value
    secure_boot = doc.get("secure_boot")
    if secure_boot is not None and not isinstance(secure_boot, bool):
        raise ValueError("measurement secure_boot must be true, false or null")
    when = doc.get("time", 0.0)
    if isinstance(when, bool) or not isinstance(when, int | float):
        raise ValueError("measurement time must be a number")
    return Measurement(
        pcrs=values,
        log=_text(doc, "log", "absent"),
        log_note=_text(doc, "log_note", ""),
        secure_boot=secure_boot,
        boot_chain=_texts(doc, "boot_chain"),
        cmdlines=_texts(doc, "cmdlines"),
        kernel_files=_texts(doc, "kernel_files"),
        time=float(when),
    )


def _text(doc: dict[str, Any], key: str, default: str) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"measurement {key} must be a string")
    return value


def _texts(doc: dict[str, Any], key: str) -> tuple[str, ...]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"measurement {key} must be a list of strings")
    return tuple(value)
