"""Enrollment tokens: random, stored only as a hash, single use, short-lived, bound to one device.

The secret is shown once to the admin who made it and never stored. Spending a token
happens in :mod:`bastion.enroll.ceremony`, inside the transaction that stores the
enrolled device, so a crash in between leaves the token unspent rather than burnt.
"""

from __future__ import annotations

import time

from bastion import audit
from bastion.authz.records import Token
from bastion.credentials import check_token_format, new_token, token_hash
from bastion.protocol.errors import RateLimited, TokenInvalid
from bastion.storage import StateStore

DEFAULT_TTL = 3600
MAX_TTL = 7 * 86400
# Failed token attempts one user may make per hour before being refused outright.
MAX_TOKEN_FAILURES = 10


def issue_enroll_token(
    store: StateStore,
    asset_tag: str,
    *,
    ttl: int = DEFAULT_TTL,
    actor: str = "",
    now: float | None = None,
) -> str:
    """Make a token for an inventory device; returns the secret (shown once)."""
    now = time.time() if now is None else now
    store.get_device(asset_tag)  # NotFound with a clear message
    if not 0 < ttl <= MAX_TTL:
        raise TokenInvalid(f"token lifetime must be between 1s and {MAX_TTL // 86400} days")
    secret = new_token()
    with store.transaction():
        store.add_token(
            Token(token_hash(secret), "enroll", asset_tag, expires=now + ttl, created_by=actor)
        )
        audit.record(
            store,
            "token.create",
            message="Device Enroll Token Created",
            device=asset_tag,
            kind="enroll",
            actor=actor,
            expires=now + ttl,
            now=now,
        )
    return secret


def check_enroll_token(store: StateStore, secret: str, user: str, now: float) -> Token:
    """Look a token up without spending it; every refusal says which check failed."""
    key = f"enroll-token:{user}"
    if store.count_login_failures(key, since=now - 3600) >= MAX_TOKEN_FAILURES:
        raise RateLimited("too many failed enrollment token attempts; try again in an hour")
    try:
        check_token_format(secret)
        token = store.find_token(token_hash(secret), "enroll")
        if token is None:
            raise TokenInvalid("enrollment token is not valid (unknown or mistyped)")
        if token.consumed is not None:
            raise TokenInvalid("enrollment token was already used")
        if token.expires <= now:
            raise TokenInvalid("enrollment token has expired; ask an admin for a new one")
    except TokenInvalid:
        store.record_login_failure(key, now, None)
        raise
    return token
