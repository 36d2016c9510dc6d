"""The state a cluster publishes for its nodes, and the :class:`Facts` a node reads from it.

A node that users can reach without the bastion runs ``dt-node-principals``, which
must decide device trust as the bastion does: the cluster's mode and every role's
(the strictest wins), the user's lock, and the device named by a certificate, enrolled
now to that user with that credential. The node has no database, so
``dtadmin nodes publish`` writes what those rules read into one JSON document
(:func:`build`), and the helper turns it back into the same :class:`Facts` the bastion
hands to :mod:`bastion.authz.decide` (:func:`parse`, :meth:`NodeState.facts`).

Measured-boot posture (:mod:`bastion.authz.posture`) reaches nodes the same way: the
cluster's policy (setting ``posture_policy``, in its document form), each role's
``posture`` and each device's verdict with its reasons and continuous-attestation
state. Never a baseline or a measurement: ``check_device_posture`` decides again only
where a measurement exists and otherwise goes by the stored verdict, so :func:`build`
publishes the verdict the device's stored boot earns under the policies of the moment
(the worse of the stored one and that). Continuous attestation's deadline is the one of
the moment published, so where a policy asks for it nodes admit that device's
certificates only while a recent copy says it attests (publish often, or let those
devices log in through the bastion). These fields are optional: a document without them
(published before posture existed) decides as before, and a helper from before them
ignores them.

The document is signed with the cluster's user CA key (Ed25519, over a payload
prefixed with the format name, so the signature can never pass for a certificate's or
anything else's): a node already trusts that key (``TrustedUserCAKeys``), so it can
take the file from any channel, and nobody between the bastion and the node can relax
a mode or drop a lock without the CA key.

It holds no secret: no password hash, TOTP secret, key or token, only names, modes,
device identifiers and locks. What it cannot hold is the record of every issued
certificate (one per login); revocation reaches nodes through the KRL
(``RevokedKeys``). A document past its ``expires`` is not believed: the helper then
decides as if the cluster required a trusted device (DESIGN.md: an unreadable mode is
``required``, never ``off``), its locks and devices still denying.

Pure: no file, clock or JSON parser of its own beyond :mod:`json`; times are passed in.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz import posture
from bastion.authz.facts import Facts
from bastion.authz.records import (
    POSTURE_ACTIONS,
    Device,
    DeviceCredential,
    DevicePosture,
    Lock,
    PosturePolicy,
    Role,
    User,
)
from bastion.protocol.errors import StateError, UsageError

FORMAT = "dt-node-state/1"
MAX_BYTES = 64 * 1024 * 1024
# What a cluster posture policy that cannot be read is published as: not a mapping, so
# the node reads it as the bastion reads an unreadable one (a policy denying every device).
UNREADABLE_POLICY = "unreadable"
VERDICTS = ("pass", "unchecked", *POSTURE_ACTIONS)
MAX_REASONS = 16


def _rfc3339(ts: float | None) -> str | None:
    # The JSON contract's time form (bastion.protocol.console.rfc3339, which would pull
    # Rich into the node helper).
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _epoch(value: object, what: str) -> float:
    if not isinstance(value, str):
        raise StateError(f"published state: {what} is not an RFC 3339 time")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise StateError(
            f"published state: {what} {value[:40]!r} is not an RFC 3339 time"
        ) from None
    if parsed.tzinfo is None:
        raise StateError(f"published state: {what} has no time zone")
    return parsed.timestamp()


def signing_payload(doc: Mapping[str, Any]) -> bytes:
    """The bytes signed: the format name, then the document without its signature in
    one canonical JSON form (sorted keys, no spaces, ASCII)."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{FORMAT} signed state\n".encode() + canonical.encode()


def sign(doc: dict[str, Any], key_fingerprint: str, sign_bytes: Callable[[bytes], bytes]) -> None:
    """Add the signature (``sign_bytes``: the CA key's Ed25519 signing)."""
    doc["signature"] = {
        "key": key_fingerprint,
        "ed25519": base64.b64encode(sign_bytes(signing_payload(doc))).decode(),
    }


def _check_signature(doc: dict[str, Any], keys: Mapping[str, object]) -> None:
    sig = doc.get("signature")
    if not isinstance(sig, dict) or not isinstance(sig.get("key"), str):
        raise StateError("published state is not signed (publish it with dtadmin nodes publish)")
    key = keys.get(sig["key"])
    if key is None:
        raise StateError(
            f"published state is signed by {sig['key'][:80]}, which is not a user CA this "
            "node trusts (--ca)"
        )
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise StateError("published state: its signing key is not Ed25519")
    try:
        key.verify(
            base64.b64decode(_str(sig.get("ed25519"), "signature"), validate=True),
            signing_payload(doc),
        )
    except (InvalidSignature, ValueError):
        raise StateError("published state: the signature does not verify (altered?)") from None


def build(
    *,
    cluster: str,
    user_ca_fingerprint: str,
    cluster_mode: object,
    users: Iterable[User],
    roles: Iterable[Role],
    devices: Iterable[Device],
    locks: Iterable[Lock],
    published: float,
    expires: float,
    cluster_posture: object = None,
    postures: Mapping[str, DevicePosture] | None = None,
) -> dict[str, Any]:
    """The document for nodes, from records read in one transaction.

    ``cluster_posture`` is the raw setting ``posture_policy`` (as ``Facts`` carries it;
    :data:`UNREADABLE_POLICY` where it could not be read); ``postures`` the devices'
    posture records by device id."""
    users, roles, devices = list(users), list(roles), list(devices)
    policy = _cluster_policy(cluster_posture)
    doc: dict[str, Any] = {
        "format": FORMAT,
        "cluster": cluster,
        "published": _rfc3339(published),
        "expires": _rfc3339(expires),
        "user_ca_fingerprint": user_ca_fingerprint,
        # The raw setting: anything unreadable is decided as "required" by the reader.
        "device_trust_mode": cluster_mode if isinstance(cluster_mode, str) else None,
        "roles": {
            r.name: {
                "device_trust_mode": r.device_trust_mode,
                "device_attestation": r.device_attestation,
                **({} if r.posture is None else {"posture": _policy_json(r.posture)}),
            }
            for r in roles
        },
        # "bot" only where true: under required-for-humans a bot needs no device.
        "users": {
            u.name: {"roles": list(u.roles), **({"bot": True} if u.bot else {})} for u in users
        },
        "devices": {
            d.asset_tag: {
                "id": d.id,
                "owner": d.owner,
                "enroll_status": d.enroll_status,
                "credential": None
                if d.credential is None
                else {"id": d.credential.id, "attestation_type": d.credential.attestation_type},
            }
            for d in devices
        },
        "locks": [
            {
                "target_kind": lock.target_kind,
                "target": lock.target,
                "message": lock.message,
                "expires": _rfc3339(lock.expires),
            }
            for lock in locks
            if lock.expires is None or lock.expires > published
        ],
    }
    if policy is not None:
        doc["posture_policy"] = policy
    by_name = {r.name: r for r in roles}
    owners = {u.name: u for u in users}
    for d in devices:
        record = (postures or {}).get(d.id)
        if record is not None:
            owner = owners.get(d.owner)
            facts = Facts(
                cluster_posture=cluster_posture,
                roles=tuple(by_name.get(n) for n in owner.roles) if owner else (),
            )
            doc["devices"][d.asset_tag]["posture"] = _posture_entry(record, facts)
    return doc


def _cluster_policy(raw: object) -> object:
    """The cluster policy as published: its document form, None when unset, and
    :data:`UNREADABLE_POLICY` for anything that does not parse."""
    if raw is None:
        return None
    if isinstance(raw, PosturePolicy):
        return _policy_json(raw)
    try:
        return _policy_json(posture.policy_from_doc(raw, "posture_policy"))
    except UsageError:
        return UNREADABLE_POLICY


def _policy_json(policy: PosturePolicy) -> dict[str, Any]:
    """``policy_doc`` as JSON reads it back: its PCR keys are numbers, which JSON makes
    strings, and the signature is over the document as the node parses it (sorted
    keys: 14 sorts before 4 as text, after it as a number)."""
    doc: dict[str, Any] = json.loads(json.dumps(posture.policy_doc(policy)))
    return doc


def _posture_entry(record: DevicePosture, facts: Facts) -> dict[str, Any]:
    """A device's verdict for nodes: the stored one, or, where its stored boot fails
    the policies of now (a policy made stricter since, a role gained), that verdict."""
    verdict, reasons = record.verdict, record.reasons
    if not record.failed and record.measured is not None:
        now = posture.evaluate(facts, record.measured, record.baseline)
        if now.failed:
            verdict, reasons = now.status, now.reasons
    entry: dict[str, Any] = {"verdict": verdict, "reasons": list(reasons[:MAX_REASONS])}
    if record.attested_until:
        entry["attested_until"] = _rfc3339(record.attested_until)
    if record.attest_failure:
        entry["attest_failure"] = record.attest_failure
    return entry


@dataclass(frozen=True, slots=True)
class NodeState:
    cluster: str
    published: float
    expires: float
    user_ca_fingerprint: str | None
    cluster_mode: object
    users: Mapping[str, User] = field(default_factory=dict)
    roles: Mapping[str, Role | None] = field(default_factory=dict)
    devices: Mapping[str, Device] = field(default_factory=dict)
    locks: Mapping[tuple[str, str], Lock] = field(default_factory=dict)
    cluster_posture: object = None  # the policy's document form (raw, as Facts has it)
    postures: Mapping[str, DevicePosture] = field(default_factory=dict)  # by asset tag

    def expired(self, now: float) -> bool:
        return now >= self.expires

    def facts(self, *, user: str | None, asset_tag: str | None, now: float) -> Facts:
        """What the bastion's own ``StateStore.facts`` would return, minus the issued
        record (nodes have none; see the module's docstring)."""
        record = self.users.get(user) if user else None
        roles = tuple(self.roles.get(name) for name in record.roles) if record else ()
        return Facts(
            cluster_mode=self.cluster_mode,
            user_ca_fingerprint=self.user_ca_fingerprint,
            user=record,
            roles=roles,
            user_lock=self._lock("user", user, now),
            device=self.devices.get(asset_tag) if asset_tag else None,
            device_lock=self._lock("device", asset_tag, now),
            cluster_posture=self.cluster_posture,
            device_posture=self.postures.get(asset_tag) if asset_tag else None,
        )

    def _lock(self, kind: str, target: str | None, now: float) -> Lock | None:
        lock = self.locks.get((kind, target)) if target else None
        return lock if lock is not None and lock.active(now) else None


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise StateError(f"published state: {what} is not a string")
    return value


def _role(name: str, raw: object) -> Role | None:
    """A role as the decision reads it; one it cannot read is None (grants nothing,
    requires a trusted device), as the bastion treats a corrupt role row."""
    if not isinstance(raw, dict):
        return None
    mode, attestation = raw.get("device_trust_mode"), raw.get("device_attestation")
    if not (mode is None or isinstance(mode, str)) or not (
        attestation is None or isinstance(attestation, str)
    ):
        return None
    policy = None
    if raw.get("posture") is not None:
        try:
            policy = posture.policy_from_doc(raw["posture"], f"role {name} posture")
        except UsageError:
            return None
    return Role(name=name, device_trust_mode=mode, device_attestation=attestation, posture=policy)


def _device_posture(tag: str, device_id: str, raw: object) -> DevicePosture:
    what = f"published state: device {tag[:64]!r} posture"
    if not isinstance(raw, dict):
        raise StateError(f"{what} is not an object")
    verdict, reasons = raw.get("verdict"), raw.get("reasons", [])
    if verdict not in VERDICTS:
        raise StateError(f"{what}: verdict is not one of {', '.join(VERDICTS)}")
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise StateError(f"{what}: reasons is not a list of strings")
    until = raw.get("attested_until")
    return DevicePosture(
        device_id=device_id,
        verdict=str(verdict),
        reasons=tuple(reasons[:MAX_REASONS]),
        attested_until=0.0 if until is None else _epoch(until, "attested_until"),
        attest_failure=_str(raw.get("attest_failure", ""), "attest failure"),
    )


def _device(tag: str, raw: object) -> Device:
    if not isinstance(raw, dict):
        raise StateError(f"published state: device {tag[:64]!r} is not an object")
    cred = raw.get("credential")
    credential = None
    if cred is not None:
        if not isinstance(cred, dict):
            raise StateError(f"published state: device {tag[:64]!r} has a malformed credential")
        credential = DeviceCredential(
            id=_str(cred.get("id"), "credential id"),
            public_key_der=b"",
            attestation_type=_str(cred.get("attestation_type"), "attestation type"),
            ek_pub_hash="",
        )
    return Device(
        id=_str(raw.get("id"), "device id"),
        asset_tag=tag,
        os_type="",
        enroll_status=_str(raw.get("enroll_status"), "enroll status"),
        owner=_str(raw.get("owner"), "device owner"),
        credential=credential,
    )


def parse(data: bytes, keys: Mapping[str, object]) -> NodeState:
    """Read a published document signed by one of ``keys`` (fingerprint -> public key,
    the node's trusted user CAs), refusing anything unsigned, altered or malformed
    (StateError)."""
    if len(data) > MAX_BYTES:
        raise StateError("published state is too large")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise StateError(f"published state is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"not a published node state (expected format {FORMAT!r})")
    _check_signature(doc, keys)
    sections: dict[str, dict[str, Any]] = {}
    for key in ("roles", "users", "devices"):
        value = doc.get(key)
        if not isinstance(value, dict):
            raise StateError(f"published state: {key} is malformed")
        sections[key] = value
    if not isinstance(doc.get("locks"), list):
        raise StateError("published state: locks is malformed")
    users: dict[str, User] = {}
    for name, raw in sections["users"].items():
        roles = raw.get("roles") if isinstance(raw, dict) else None
        bot = raw.get("bot", False) if isinstance(raw, dict) else None
        if (
            not isinstance(roles, list)
            or not all(isinstance(r, str) for r in roles)
            or not isinstance(bot, bool)
        ):
            raise StateError(f"published state: user {name[:64]!r} is malformed")
        users[name] = User(name=name, roles=tuple(roles), bot=bot)
    locks: dict[tuple[str, str], Lock] = {}
    for raw in doc["locks"]:
        if not isinstance(raw, dict):
            raise StateError("published state: a lock is malformed")
        kind, target = _str(raw.get("target_kind"), "lock kind"), _str(raw.get("target"), "lock")
        expires = raw.get("expires")
        lock = Lock(
            id="",
            target_kind=kind,
            target=target,
            message=_str(raw.get("message", ""), "lock message"),
            expires=None if expires is None else _epoch(expires, "lock expiry"),
        )
        # Two locks on one target: the one that lasts longer (None: for ever) counts.
        held = locks.get((kind, target))
        if held is None or (
            held.expires is not None and (lock.expires or float("inf")) > held.expires
        ):
            locks[(kind, target)] = lock
    ca = doc.get("user_ca_fingerprint")
    devices = {tag: _device(tag, raw) for tag, raw in sections["devices"].items()}
    postures = {
        tag: _device_posture(tag, devices[tag].id, raw["posture"])
        for tag, raw in sections["devices"].items()
        if raw.get("posture") is not None
    }
    return NodeState(
        cluster=_str(doc.get("cluster"), "cluster"),
        published=_epoch(doc.get("published"), "published"),
        expires=_epoch(doc.get("expires"), "expires"),
        user_ca_fingerprint=ca if isinstance(ca, str) else None,
        cluster_mode=doc.get("device_trust_mode"),
        users=users,
        roles={name: _role(name, raw) for name, raw in sections["roles"].items()},
        devices=devices,
        locks=locks,
        cluster_posture=doc.get("posture_policy"),
        postures=postures,
    )
