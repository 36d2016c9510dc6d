"""Secrets for logins and tokens: generation, storage form, constant-time checks.

* Tokens (signup, enrollment) are 256-bit random strings. Only their SHA-256 is
  stored: with that much entropy a fast hash is as safe as a slow one, and it lets the
  bastion look a token up by its hash in one indexed query.
* Passwords are stored only as argon2id hashes (memory-hard; OWASP's first choice).
* TOTP (RFC 6238, 30 s steps, 6 digits) through pyotp; a code's time step is
  remembered so the same code can never be used twice.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import argon2
import pyotp

from bastion.protocol.errors import AuthenticationFailed, UsageError
from bastion.protocol.tokens import TOKEN_RE, check_token_format  # noqa: F401  (re-exported)

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
TOTP_WINDOW = 1  # accept the previous and next 30 s step for clock skew

# 64 MiB, 2 passes, 2 lanes: about 60-100 ms per verify on two cores. Fast enough
# for a login, slow enough that a stolen hash is expensive to guess.
_HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=64 * 1024, parallelism=2)


# -- tokens ---------------------------------------------------------------------------------


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    return hmac.compare_digest(token_hash(token), stored_hash)


# -- passwords ---------------------------------------------------------------------------------


def check_password_policy(password: str, min_length: int = MIN_PASSWORD_LENGTH) -> str:
    if len(password) < min_length:
        raise UsageError(f"password is too short: use at least {min_length} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UsageError(f"password is too long (at most {MAX_PASSWORD_LENGTH} characters)")
    if password.strip() != password:
        raise UsageError("password must not start or end with white space")
    return password


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True only for the right password; a missing or corrupt hash is simply False."""
    if not stored_hash or len(password) > MAX_PASSWORD_LENGTH:
        # Spend the same time as a real check so user existence does not leak.
        _dummy_verify(password)
        return False
    try:
        return _HASHER.verify(stored_hash, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


_DUMMY = _HASHER.hash("dt-bastion timing equaliser")


def _dummy_verify(password: str) -> None:
    try:
        _HASHER.verify(_DUMMY, password[:MAX_PASSWORD_LENGTH])
    except argon2.exceptions.VerificationError:
        pass


def needs_rehash(stored_hash: str) -> bool:
    try:
        return _HASHER.check_needs_rehash(stored_hash)
    except argon2.exceptions.InvalidHashError:
        return True


# -- TOTP -----------------------------------------------------------------------------------------


def new_totp_secret() -> str:
    return pyotp.random_base32(32)


def totp_uri(secret: str, user: str, issuer: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=user, issuer_name=issuer)


def totp_now(secret: str, now: float | None = None) -> str:
    """The current code (for tests and the demo, which play the authenticator app)."""
    return pyotp.TOTP(secret).at(time.time() if now is None else now)


def verify_totp(
    secret: str, code: str, *, now: float | None = None, last_used_step: int | None = None
) -> int:
    """Return the time step the code matched; refuse wrong, malformed and replayed codes."""
    now = time.time() if now is None else now
    code = code.strip()
    if not (len(code) == 6 and code.isascii() and code.isdigit()):
        raise AuthenticationFailed("the one-time code must be 6 digits")
    totp = pyotp.TOTP(secret)
    step_now = int(now // totp.interval)
    for step in range(step_now - TOTP_WINDOW, step_now + TOTP_WINDOW + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            if last_used_step is not None and step <= last_used_step:
                raise AuthenticationFailed("that one-time code was already used; wait for the next")
            return step
    raise AuthenticationFailed("wrong one-time code")
