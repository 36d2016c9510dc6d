"""Why a certificate was refused, said to the one who holds its key.

:func:`decide.check_certificate` refuses with a reason for the audit log. The person at
the terminal needs it too (stock OpenSSH prints an SSH auth banner), but only someone
who proved the certificate's private key may hear it, and only about a certificate this
cluster issued: otherwise a stranger holding a copied certificate (its public half)
could learn whether its user exists or is locked. So the bastion first answers a query
for such a certificate as it would a good one, lets the client sign, verifies that
signature, and only then says why (:func:`reason_for_holder`).

Once a certificate was proven and refused, the bastion stops offering
keyboard-interactive on that connection: a password login there opens only dt-api,
never a node, so to a person running ``ssh`` the prompt is a trap (a locked or removed
user cannot pass it at all; an expired certificate is renewed with ``dtclient login``,
which makes its own connection).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from bastion.authz import decide
from bastion.authz.facts import Facts
from bastion.protocol.certs import ParsedCert
from bastion.protocol.errors import AccessDenied

LOGIN_HINT = "run: dtclient login"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused certificate, as its holder is told: ``message``, one line."""

    message: str


def is_ours(cert: ParsedCert, facts: Facts) -> bool:
    """This cluster issued exactly this certificate (serial, user, key, device), under
    whatever CA signed it then: only about such a certificate is anything said."""
    issued = facts.issued
    if issued is None or cert.cert_type != "user" or not cert.user:
        return False
    claims = decide.claims_of(cert)
    return (
        issued.serial == claims.serial
        and issued.cert_type == "user"
        and issued.user == claims.user
        and bool(issued.public_key_fingerprint)
        and issued.public_key_fingerprint == claims.key_fingerprint
        and issued.device_id == claims.device_id
        and (not issued.key_id or issued.key_id == claims.key_id)
    )


def reason_for_holder(cert: ParsedCert, facts: Facts, now: float) -> Refusal | None:
    """Why this certificate of ours cannot log in, phrased for its holder; None when it
    is not ours (nothing is said) or when nothing refuses it."""
    if not is_ours(cert, facts):
        return None
    name = cert.user or ""
    user_ok = _user_refusal(facts, now, name)
    if user_ok is not None:
        return Refusal(user_ok)
    if facts.user_ca_fingerprint is not None and cert.ca_fingerprint != facts.user_ca_fingerprint:
        return Refusal(
            "the cluster's user CA was rotated: this certificate is no longer trusted "
            f"({LOGIN_HINT})"
        )
    if facts.issued is not None and facts.issued.revoked is not None:
        return Refusal(
            f"certificate serial {cert.serial} was revoked at {_utc(facts.issued.revoked)} "
            f"({LOGIN_HINT})"
        )
    if now >= cert.valid_before:
        return Refusal(f"certificate expired at {_utc(cert.valid_before)} ({LOGIN_HINT})")
    if now < cert.valid_after:
        return Refusal(
            f"certificate is not valid before {_utc(cert.valid_after)} "
            "(is this computer's clock right?)"
        )
    try:
        decide.check_certificate(cert, facts, now)
    except AccessDenied as exc:
        return Refusal(exc.message)
    return None


def _user_refusal(facts: Facts, now: float, name: str) -> str | None:
    """The user's own state (removed, locked, unreadable roles): no password fixes it."""
    try:
        decide.check_user(facts, now, name)
    except AccessDenied as exc:
        return exc.message
    return None


def device_warning(claims: decide.CertClaims, facts: Facts, now: float) -> str | None:
    """An accepted certificate that reaches no node for want of a trusted device: said
    at login, before the first node refuses it (the connection may still use dt-api,
    e.g. to enroll this device)."""
    try:
        decide.check_device(claims, facts, now)
    except AccessDenied as exc:
        return f"this certificate reaches no node: {exc.message}"
    return None


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
