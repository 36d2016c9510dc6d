"""Records as the YAML documents `dtadmin get` prints and `dtadmin edit` reads back.

Pure conversions, tested directly. Reading back is strict: a document whose kind or
name changed, with unknown fields, wrong types, an unknown role or a bad trust mode
is refused with a message that names the problem, and nothing is applied.
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import replace
from typing import Any

import yaml

from bastion.authz import posture, rbac
from bastion.authz.records import ENROLL_STATUSES, Device, Node, PosturePolicy, Role, Rule, User
from bastion.protocol.durations import format_duration, parse_duration
from bastion.protocol.errors import UsageError


def dump(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def load(text: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(doc, dict):
        raise UsageError("invalid document: expected a YAML mapping with kind, metadata, spec")
    return doc


def _iso(ts: float) -> str | None:
    if not ts:
        return None
    # The JSON contract's form (bastion.protocol.console.rfc3339): RFC 3339, UTC, "Z".
    stamp = datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")
    return stamp.replace("+00:00", "Z")


def _keys(where: str, value: Any, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a mapping")
    unknown = set(value) - allowed
    if unknown:
        raise UsageError(f"unknown field {where}.{sorted(unknown)[0]}")
    return value


def _str_list(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where} must be a list of strings")
    return tuple(value)


def _header(doc: dict[str, Any], kind: str, name: str | None) -> dict[str, Any]:
    doc = _keys("document", doc, {"kind", "version", "metadata", "spec"})
    if doc.get("kind") != kind:
        raise UsageError(f"kind must stay {kind!r} (found {doc.get('kind')!r})")
    meta = _keys("metadata", doc.get("metadata"), {"name", "id", "created", "updated"})
    if name is not None and meta.get("name") != name:
        raise UsageError(f"the name cannot be changed (was {name!r}, found {meta.get('name')!r})")
    return _keys("spec", doc.get("spec") or {}, _SPEC_FIELDS[kind])


_SPEC_FIELDS = {
    "user": {"roles", "traits", "status", "created_by"},
    "role": {"options", "allow", "description"},
    "device": {
        "asset_tag",
        "os_type",
        "enroll_status",
        "owner",
        "credential",
        "collected_data",
        "profile",
        "ek_pub_hash",
        "id",
        "created",
        "updated",
    },
}


# -- users ---------------------------------------------------------------------------------


def user_doc(user: User, locked: bool = False) -> dict[str, Any]:
    return {
        "kind": "user",
        "version": "v2",
        "metadata": {"name": user.name, "created": _iso(user.created)},
        "spec": {
            "roles": list(user.roles),
            "traits": {"logins": list(user.logins)},
            "status": {"locked": locked, "signed_up": user.signed_up, "bot": user.bot},
            "created_by": user.created_by or None,
        },
    }


def user_from_doc(doc: dict[str, Any], current: User, known_roles: set[str]) -> User:
    spec = _header(doc, "user", current.name)
    roles = _str_list("spec.roles", spec.get("roles"))
    for role in roles:
        if role not in known_roles:
            raise UsageError(f'unknown role "{role}" (see: dtadmin roles ls)')
    traits = _keys("spec.traits", spec.get("traits"), {"logins"})
    logins = rbac.check_logins(_str_list("spec.traits.logins", traits.get("logins")))
    return replace(current, roles=tuple(dict.fromkeys(roles)), logins=logins)


# -- roles -----------------------------------------------------------------------------------

_OPTIONS = {
    "max_session_ttl",
    "device_trust_mode",
    "permit_port_forwarding",
    "permit_pty",
    "permit_agent_forwarding",
    "permit_x11_forwarding",
    "permit_user_rc",
    "disconnect_expired_cert",
    "device_attestation",
    "posture",
}
# Options a role may leave unsaid (None): written out only when set.
_UNSAID = {
    "max_session_ttl",
    "device_trust_mode",
    "disconnect_expired_cert",
    "device_attestation",
    "posture",
}


def role_doc(role: Role) -> dict[str, Any]:
    options: dict[str, Any] = {"max_session_ttl": format_duration(role.max_session_ttl)}
    if role.device_trust_mode is not None:
        options["device_trust_mode"] = role.device_trust_mode
    if role.disconnect_expired_cert is not None:
        options["disconnect_expired_cert"] = role.disconnect_expired_cert
    if role.device_attestation is not None:
        options["device_attestation"] = role.device_attestation
    if role.posture is not None:
        options["posture"] = posture.policy_doc(role.posture)
    for name in sorted(_OPTIONS - _UNSAID):
        options[name] = getattr(role, name)
    return {
        "kind": "role",
        "version": "v1",
        "metadata": {"name": role.name},
        "spec": {
            "description": role.description,
            "options": options,
            "allow": {
                "logins": list(role.logins),
                "node_labels": {k: list(v) for k, v in role.node_labels.items()},
                "rules": [
                    {"resources": list(r.resources), "verbs": list(r.verbs)} for r in role.rules
                ],
            },
        },
    }


def role_from_doc(doc: dict[str, Any], name: str | None = None) -> Role:
    spec = _header(doc, "role", name)
    role_name = rbac.check_name("role", (doc.get("metadata") or {}).get("name"))
    options = _keys("spec.options", spec.get("options"), _OPTIONS)
    allow = _keys("spec.allow", spec.get("allow"), {"logins", "node_labels", "rules"})
    ttl = options.get("max_session_ttl", "12h")
    if not isinstance(ttl, str):
        raise UsageError("spec.options.max_session_ttl must be a duration such as 8h")
    mode = options.get("device_trust_mode")
    attestation = options.get("device_attestation")
    policy = options.get("posture")
    flags = {}
    for flag in _OPTIONS - {
        "max_session_ttl",
        "device_trust_mode",
        "device_attestation",
        "posture",
    }:
        if flag in options:
            if not isinstance(options[flag], bool):
                raise UsageError(f"spec.options.{flag} must be true or false")
            flags[flag] = options[flag]
    return Role(
        name=role_name,
        logins=rbac.check_logins(_str_list("spec.allow.logins", allow.get("logins"))),
        node_labels=_labels(allow.get("node_labels")),
        rules=_rules(allow.get("rules")),
        max_session_ttl=parse_duration(ttl),
        device_trust_mode=None if mode is None else rbac.check_trust_mode(mode),
        device_attestation=None if attestation is None else rbac.check_attestation(attestation),
        description=str(spec.get("description") or ""),
        posture=None if policy is None else posture.policy_from_doc(policy, "spec.options.posture"),
        **flags,
    )


def _labels(value: Any) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError("spec.allow.node_labels must be a mapping of label to value(s)")
    out = {}
    for key, vals in value.items():
        vals = [vals] if isinstance(vals, str) else vals
        out[str(key)] = _str_list(f"spec.allow.node_labels.{key}", vals)
    return out


def _rules(value: Any) -> tuple[Rule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise UsageError("spec.allow.rules must be a list")
    rules = []
    for i, item in enumerate(value):
        item = _keys(f"spec.allow.rules[{i}]", item, {"resources", "verbs"})
        rules.append(
            Rule(
                _str_list(f"spec.allow.rules[{i}].resources", item.get("resources")),
                _str_list(f"spec.allow.rules[{i}].verbs", item.get("verbs")),
            )
        )
    return tuple(rules)


# -- devices ---------------------------------------------------------------------------------


def _collected(entry: dict[str, Any]) -> dict[str, Any]:
    """One collected_data entry for output: its epoch ``time`` as RFC 3339."""
    when = entry.get("time")
    if isinstance(when, int | float) and not isinstance(when, bool):
        return {**entry, "time": _iso(float(when))}
    return dict(entry)


def device_doc(device: Device) -> dict[str, Any]:
    cred = device.credential
    return {
        "kind": "device",
        "version": "v1",
        "metadata": {"name": device.asset_tag},
        "spec": {
            "asset_tag": device.asset_tag,
            "os_type": device.os_type,
            "enroll_status": device.enroll_status,
            "owner": device.owner,
            "credential": None
            if cred is None
            else {
                "id": cred.id,
                "public_key_der": base64.b64encode(cred.public_key_der).decode(),
                "attestation_type": cred.attestation_type,
                "ek_pub_hash": cred.ek_pub_hash,
            },
            "collected_data": [_collected(c) for c in device.collected_data],
            "profile": dict(device.profile),
            "ek_pub_hash": device.ek_pub_hash,
            "id": device.id,
            "created": _iso(device.created),
            "updated": _iso(device.updated),
        },
    }


def device_from_doc(doc: dict[str, Any], current: Device, known_users: set[str]) -> Device:
    """Only owner, enroll_status (to unenroll) and profile are editable."""
    spec = _header(doc, "device", current.asset_tag)
    if spec.get("id", current.id) != current.id:
        raise UsageError("the device id cannot be changed")
    if spec.get("asset_tag", current.asset_tag) != current.asset_tag:
        raise UsageError("the asset tag cannot be changed")
    if spec.get("os_type", current.os_type) != current.os_type:
        raise UsageError("os_type cannot be changed")
    status = spec.get("enroll_status", current.enroll_status)
    if status not in ENROLL_STATUSES:
        raise UsageError(f"enroll_status must be one of {', '.join(ENROLL_STATUSES)}")
    if status == "enrolled" and not current.enrolled:
        raise UsageError("a device becomes enrolled only through the enrollment ceremony")
    owner = spec.get("owner") or ""
    if owner and owner not in known_users:
        raise UsageError(f'unknown owner "{owner}"')
    profile = spec.get("profile") or {}
    if not isinstance(profile, dict):
        raise UsageError("spec.profile must be a mapping")
    if status == "not_enrolled":
        return replace(current, enroll_status=status, credential=None, owner=owner, profile=profile)
    return replace(current, owner=owner, profile=profile)


def node_doc(node: Node) -> dict[str, Any]:
    return {
        "kind": "node",
        "version": "v1",
        "metadata": {"name": node.name},
        "spec": {"addr": node.addr, "labels": dict(node.labels)},
    }


# -- the cluster's posture policy ----------------------------------------------------------------


def posture_doc(policy: PosturePolicy | None) -> dict[str, Any]:
    """The cluster's posture policy as `dtadmin posture show` prints it (``spec`` None:
    no policy is set)."""
    return {
        "kind": "posture",
        "version": "v1",
        "spec": None if policy is None else posture.policy_doc(policy),
    }


def posture_from_doc(doc: dict[str, Any]) -> PosturePolicy:
    """A ``kind: posture`` document (`dtadmin posture set -f`): its spec is the policy,
    checked field by field (bastion.authz.posture.policy_from_doc)."""
    doc = _keys("document", doc, {"kind", "version", "metadata", "spec"})
    if doc.get("kind") != "posture":
        raise UsageError(f"kind must be 'posture' (found {doc.get('kind')!r})")
    if doc.get("version", "v1") != "v1":
        raise UsageError(f"unknown posture document version {doc.get('version')!r} (use v1)")
    if doc.get("spec") is None:
        raise UsageError(
            "the document has no spec: give the policy's checks under spec "
            "(to remove the policy: dtadmin posture clear)"
        )
    return posture.policy_from_doc(doc["spec"], "spec")
