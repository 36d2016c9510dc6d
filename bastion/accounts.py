"""Accounts: signup with a one-time token, and password + TOTP login with lockout.

Pure decisions over the Store, no sockets. The SSH layer asks ``check_password_login``
during keyboard-interactive auth and ``Signup`` serves the dt-api signup messages.

Lockout: ``max_failures`` failed logins within ``window`` lock the account for
``lock_for`` (a Lock record, so `dtadmin lock ls` shows it and `lock rm` lifts it).
Every failure and every lockout is audited.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from bastion import audit, credentials
from bastion.authz import rbac
from bastion.authz.records import Lock, Token, User
from bastion.protocol.errors import AccountLocked, AuthenticationFailed, TokenInvalid
from bastion.protocol.wire import Ok, SignupBegin, SignupFinish, SignupInfo
from bastion.storage import Store

SIGNUP_TTL = 3600


@dataclass(frozen=True, slots=True)
class LockoutPolicy:
    max_failures: int = 5
    window: float = 600.0
    lock_for: float = 1800.0


def issue_signup_token(
    store: Store, user: str, *, ttl: int = SIGNUP_TTL, actor: str = "", now: float | None = None
) -> str:
    now = time.time() if now is None else now
    secret = credentials.new_token()
    with store.transaction():
        store.add_token(
            Token(
                credentials.token_hash(secret), "signup", user, expires=now + ttl, created_by=actor
            )
        )
        audit.record(
            store, "user.token", message="signup token created", user=user, actor=actor, now=now
        )
    return secret


def signup_token_user(store: Store, token: str, now: float | None = None) -> str:
    """The user a live signup token belongs to (used to authenticate signup connections)."""
    now = time.time() if now is None else now
    credentials.check_token_format(token)
    record = store.find_token(credentials.token_hash(token), "signup")
    if record is None:
        raise TokenInvalid("signup token is not valid (unknown or mistyped)")
    if record.consumed is not None:
        raise TokenInvalid("signup token was already used; ask an admin for a new one")
    if record.expires <= now:
        raise TokenInvalid(
            "signup token has expired; ask an admin for a new one (dtadmin users reset)"
        )
    if store.find_user(record.subject) is None:
        raise TokenInvalid("signup token belongs to a user that no longer exists")
    return record.subject


class Signup:
    """Serves signup_begin / signup_finish on a connection authenticated by a token."""

    def __init__(self, store: Store, cluster_name: str, min_password_length: int = 12) -> None:
        self.store = store
        self.cluster_name = cluster_name
        self.min_password_length = min_password_length
        self._secrets: dict[str, str] = {}  # token hash -> TOTP secret offered

    def begin(self, msg: SignupBegin, remote_addr: str | None = None) -> SignupInfo:
        user = signup_token_user(self.store, msg.token)
        secret = credentials.new_totp_secret()
        self._secrets[credentials.token_hash(msg.token)] = secret
        return SignupInfo(
            user=user,
            totp_uri=credentials.totp_uri(secret, user, f"dt-bastion {self.cluster_name}"),
            min_password_length=self.min_password_length,
        )

    def finish(self, msg: SignupFinish, remote_addr: str | None = None) -> Ok:
        now = time.time()
        user_name = signup_token_user(self.store, msg.token, now)
        secret = self._secrets.get(credentials.token_hash(msg.token))
        if secret is None:
            raise TokenInvalid("signup_finish without signup_begin on this connection")
        try:
            credentials.check_password_policy(msg.password, self.min_password_length)
            step = credentials.verify_totp(secret, msg.totp_code, now=now)
        except Exception as exc:
            audit.record(
                self.store,
                "user.signup",
                success=False,
                message=str(exc),
                user=user_name,
                remote_addr=remote_addr,
            )
            raise
        password_hash = credentials.hash_password(msg.password)
        with self.store.transaction():
            if not self.store.consume_token(
                credentials.token_hash(msg.token), "signup", now=now, consumer=user_name
            ):
                raise TokenInvalid("signup token was already used")
            user = self.store.get_user(user_name)
            self.store.update_user(
                replace(user, password_hash=password_hash, totp_secret=secret, totp_last_step=step)
            )
            self.store.clear_login_failures(user_name)
            audit.record(
                self.store,
                "user.signup",
                message="password and one-time code set",
                user=user_name,
                remote_addr=remote_addr,
                now=now,
            )
        return Ok()


def check_password_login(
    store: Store,
    user_name: str,
    password: str,
    code: str,
    *,
    remote_addr: str | None = None,
    policy: LockoutPolicy | None = None,
    now: float | None = None,
) -> User:
    """Verify password and one-time code; lock the account after too many failures.

    The message a client sees does not say which factor was wrong, nor whether the
    user exists; the audit event does.
    """
    policy = policy or LockoutPolicy()
    now = time.time() if now is None else now
    user = store.find_user(user_name) if rbac.NAME_RE.fullmatch(user_name) else None
    lock = store.active_lock("user", user_name, now) if user else None
    if lock is not None:
        credentials.verify_password(None, password)  # same cost as a real attempt
        _fail(store, user_name, remote_addr, f"account locked: {lock.message}", now, count=False)
        raise AccountLocked(f'account "{user_name}" is locked; ask an admin (dtadmin lock rm)')
    if user is None or not user.signed_up:
        credentials.verify_password(None, password)
        reason = "unknown user" if user is None else "user has not signed up"
        _fail(store, user_name, remote_addr, reason, now, count=user is not None)
        raise AuthenticationFailed("wrong user name, password or one-time code")
    reason = None
    if not credentials.verify_password(user.password_hash, password):
        reason = "wrong password"
    else:
        try:
            step = credentials.verify_totp(
                user.totp_secret or "", code, now=now, last_used_step=user.totp_last_step
            )
        except AuthenticationFailed as exc:
            reason = exc.message
    if reason is not None:
        failures = _fail(store, user_name, remote_addr, reason, now, count=True)
        recent = store.count_login_failures(user_name, since=now - policy.window)
        if failures and recent >= policy.max_failures:
            _lock_out(store, user_name, remote_addr, policy, now)
            raise AccountLocked(
                f'too many failed logins: account "{user_name}" is locked for '
                f"{int(policy.lock_for // 60)} minutes"
            )
        raise AuthenticationFailed("wrong user name, password or one-time code")
    store.update_user(replace(user, totp_last_step=step))
    store.clear_login_failures(user_name)
    audit.record(
        store,
        "user.login",
        message="password and one-time code accepted",
        user=user_name,
        remote_addr=remote_addr,
        method="password+totp",
        now=now,
    )
    return user


def _fail(
    store: Store, user: str, remote_addr: str | None, reason: str, now: float, *, count: bool
) -> int:
    audit.record(
        store,
        "auth.failed",
        success=False,
        message=reason,
        user=user,
        remote_addr=remote_addr,
        method="password+totp",
        now=now,
    )
    return store.record_login_failure(user, now, remote_addr) if count else 0


def _lock_out(
    store: Store, user: str, remote_addr: str | None, policy: LockoutPolicy, now: float
) -> None:
    with store.transaction():
        store.add_lock(
            Lock(
                "",
                "user",
                user,
                message="too many failed logins",
                expires=now + policy.lock_for,
                created_by="dt-bastion",
            )
        )
        store.clear_login_failures(user)
        audit.record(
            store,
            "lock.create",
            success=False,
            message="too many failed logins",
            user=user,
            remote_addr=remote_addr,
            now=now,
            lock_for=policy.lock_for,
        )
