"""The audit log: one function records every allow and every deny.

Events land in the ``audit`` table of the cluster database, each linked into a hash
chain with checkpoints signed by the audit key (``bastion.storage.audit_log``;
``dtadmin audit verify`` checks it). A write that fails raises
:class:`StorageUnavailable`; callers that grant something (a certificate, an
enrollment) record inside the same transaction, so nothing is granted unaudited.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from bastion.authz.records import AuditEvent
from bastion.storage import StateStore
from bastion.storage.migrations import RENAMED_EVENT_TYPES

log = logging.getLogger("bastion.audit")
# Told of each event once its row has committed (never of one rolled back): the running
# service's metrics count them here (bastion.service.metrics). Empty otherwise.
observers: list[Callable[[AuditEvent], None]] = []

# Every event type, with its stable code in the manner of the seed's audit events: a
# code names the event kind and whether it is a success (I) or a failure (W). One
# naming style: ``noun.verb``, one lowercase word each (``NAME_STYLE``); the noun is
# what was acted on, the verb what happened to it, a refusal or a cut by its outcome
# (``denied``, ``failed``, ``terminated``). docs/audit.md lists each one's fields;
# tests/test_audit_names.py keeps the list, the docs and the call sites in step.
NAME_STYLE = r"[a-z]+\.[a-z]+"
EVENT_CODES: dict[str, str] = {
    "cluster.init": "DT0001",
    "cluster.update": "DT0002",
    "bastion.reload": "DT0003",
    "bastion.drain": "DT0004",
    "state.stale": "DT0005",
    "state.confirmed": "DT0006",
    "bastion.restart": "DT0007",
    "user.create": "DT1001",
    "user.update": "DT1002",
    "user.delete": "DT1003",
    "user.signup": "DT1004",
    "user.login": "DT1006",
    "bot.create": "DT1201",
    "bot.delete": "DT1202",
    "role.create": "DT1101",
    "role.update": "DT1102",
    "role.delete": "DT1103",
    "cert.create": "DT2001",
    "cert.revoke": "DT2002",
    "ca.rotate": "DT2004",
    "auth.failed": "DT2101",
    "lock.create": "DT2201",
    "lock.delete": "DT2202",
    "node.create": "DT3001",
    "node.delete": "DT3002",
    "session.start": "DT3101",
    "session.end": "DT3102",
    "session.denied": "DT3103",
    "session.terminated": "DT3104",
    "connection.terminated": "DT3105",
    "device.create": "DT4001",
    "device.update": "DT4002",
    "device.delete": "DT4003",
    "device.enroll": "DT4004",
    "device.unenroll": "DT4005",
    "token.create": "DT4006",
    "device.authenticate": "DT4007",
    "trustroot.create": "DT4008",
    "trustroot.delete": "DT4009",
    "device.posture": "DT4010",
    "posture.approve": "DT4011",
    "device.attest": "DT4012",
    "posture.policy": "DT4013",
    "api.failed": "DT5001",
    "token.delete": "DT5101",
    "token.use": "DT5102",
}
# Codes of retired names, still found on rows written before the rename (DT1005 was
# user.token, DT2003 host_cert.create: both token.create / cert.create now).

# Old names and what they are called now: rows were renamed by migration 4, and
# ``dtadmin audit ls --type`` still accepts the old names.
LEGACY_NAMES: dict[str, tuple[str, ...]] = {
    **{old: (new,) for old, new in RENAMED_EVENT_TYPES.items()},
    "device.trust_root": ("trustroot.create", "trustroot.delete"),
}


def event_types() -> tuple[set[str], dict[str, tuple[str, ...]]]:
    """The event types there are, and the old names that mean them."""
    return set(EVENT_CODES), LEGACY_NAMES


# Human names for the seed's best-known events, shown by `dtadmin audit ls`.
EVENT_NAMES: dict[str, str] = {
    "device.enroll": "Device Enrolled",
    "device.authenticate": "Device Authenticated",
    "device.unenroll": "Device Unenrolled",
}


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_control(text: str) -> str:
    """``text`` on one line, with nothing a terminal or a log reader acts on: every
    character that is not printable (newlines, ESC, bidi overrides, lone surrogates,
    U+2028) written as its Python escape (``\\n``, ``\\x1b``, ``\\u202e``).

    Client-supplied text (disconnect reasons, user names, versions, dt-api fields)
    reaches audit messages and log lines; unescaped, a newline in it forges a line.
    Backslashes are left as they are, so escaping twice changes nothing (the audit
    message is escaped here and its log line again by the log formatter).
    """
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else _NAMED_ESCAPES.get(ch) or ascii(ch)[1:-1] for ch in text
    )


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return escape_control(value)
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    if isinstance(value, dict):
        return {k: _escaped(v) for k, v in value.items()}
    return value


def event_code(event_type: str, success: bool) -> str:
    return EVENT_CODES.get(event_type, "DT9999") + ("I" if success else "W")


def record(
    store: StateStore,
    event_type: str,
    *,
    success: bool = True,
    message: str = "",
    user: str | None = None,
    device: str | None = None,
    remote_addr: str | None = None,
    now: float | None = None,
    **fields: Any,
) -> int:
    """Append one event and return its id; raises StorageUnavailable if it cannot.

    Every string in it is escaped (:func:`escape_control`): many come from clients.
    """
    event = AuditEvent(
        id=0,
        time=time.time() if now is None else now,
        code=event_code(event_type, success),
        type=event_type,
        success=success,
        message=escape_control(message),
        user=_escaped(user),
        device=_escaped(device),
        remote_addr=_escaped(remote_addr),
        fields={k: _escaped(v) for k, v in fields.items() if v is not None},
    )
    event_id = store.append_audit(event)
    if log.isEnabledFor(logging.INFO):
        store.after_commit(functools.partial(_log_event, event))
    for observer in observers:
        store.after_commit(functools.partial(observer, event))
    return event_id


def _log_event(event: AuditEvent) -> None:
    """One line per event, naming only the fields it has (no ``user=None``); the same
    fields go to a JSON log line as its own keys (``--log-format json``)."""
    fields = {"user": event.user, "device": event.device, "addr": event.remote_addr}
    named = " ".join(f"{k}={v}" for k, v in fields.items() if v)
    result = "allow" if event.success else "deny"
    extra = {"event": event.type, "code": event.code, "result": result}
    extra.update({k: v for k, v in fields.items() if v})
    log.info(
        "%s",
        " ".join(p for p in (event.code, event.type, result, named, event.message) if p),
        extra={"audit": extra},
    )
