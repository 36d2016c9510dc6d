"""Accounts: signup with a one-time token, and password + TOTP login with lockout.

Pure decisions over the store, no sockets. The SSH layer asks ``check_password_login``
during keyboard-interactive auth and ``Signup`` serves the dt-api signup messages.

Lockout: ``max_failures`` failed logins within ``window`` lock the account's password
for ``lock_for`` (a Lock record of kind "password", so `dtadmin lock ls` shows it and
`lock rm` lifts it); certificate sessions go on.
Every failure and every lockout is audited.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NoReturn

from bastion import audit, credentials
from bastion.authz import decide, rbac
from bastion.authz.records import Lock, Token, User
from bastion.protocol.errors import (
    AccessDenied,
    AccountLocked,
    AuthenticationFailed,
    TokenInvalid,
    UsageError,
)
from bastion.protocol.wire import Ok, SignupBegin, SignupFinish, SignupInfo
from bastion.storage import StateStore

SIGNUP_TTL = 3600
# The lock kind a lockout writes: it blocks password logins only.
PASSWORD_LOCK = "password"  # nosec B105  # a lock kind's name, not a password


@dataclass(frozen=True, slots=True)
class LockoutPolicy:
    max_failures: int = 5
    window: float = 600.0
    lock_for: float = 1800.0


def issue_signup_token(
    store: StateStore,
    user: str,
    *,
    ttl: int = SIGNUP_TTL,
    actor: str = "",
    now: float | None = None,
) -> str:
    now = time.time() if now is None else now
    secret = credentials.new_token()
    with store.transaction():
        try:
            decide.check_not_bot(store.find_user(user), "sign up")
        except AccessDenied:
            raise UsageError(
                f'"{user}" is a bot user: bots never sign up (no password, no one-time code); '
                f"give its job a bot token instead (dtadmin bots token {user})"
            ) from None
        store.add_token(
            Token(
                credentials.token_hash(secret), "signup", user, expires=now + ttl, created_by=actor
            )
        )
        audit.record(
            store,
            "token.create",
            message="signup token created",
            user=user,
            kind="signup",
            actor=actor,
            now=now,
        )
    return secret


def signup_token_user(store: StateStore, token: str, now: float | None = None) -> str:
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
    found = store.find_user(record.subject)
    if found is None:
        raise TokenInvalid("signup token belongs to a user that no longer exists")
    try:
        decide.check_not_bot(found, "sign up")
    except AccessDenied as exc:
        raise TokenInvalid(f"signup token refused: {exc.message}") from None
    return record.subject


class Signup:
    """Serves signup_begin / signup_finish on a connection authenticated by a token."""

    def __init__(self, store: StateStore, cluster_name: str, min_password_length: int = 12) -> None:
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
            self.store.set_user_secrets(user_name, password_hash, secret, step)
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
    store: StateStore,
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

    Nothing read before argon2 is written back after it: the attempt is reserved
    first (so concurrent guesses count while they are checked), and a success only
    spends the code's time step, compare-and-set on the password it was checked
    against. An admin's reset, role change or lock landing meanwhile stands. Returns
    the user as of that compare-and-set.
    """
    policy = policy or LockoutPolicy()
    now = time.time() if now is None else now
    user = store.find_user(user_name) if rbac.NAME_RE.fullmatch(user_name) else None
    if user is None:
        credentials.verify_password(None, password)  # same cost as a real attempt
        _fail(store, user_name, remote_addr, "unknown user", now, count=False)
        raise AuthenticationFailed("wrong user name, password or one-time code")
    try:
        decide.check_not_bot(user, "log in with a password")
    except AccessDenied as exc:
        credentials.verify_password(None, password)  # same cost as a real attempt
        _fail(store, user_name, remote_addr, exc.message, now, count=False)
        raise AuthenticationFailed("wrong user name, password or one-time code") from None
    attempt, lock = _reserve_attempt(store, user, remote_addr, policy, now)
    if attempt is None and lock is not None and lock.target_kind != PASSWORD_LOCK:
        _refuse_locked(store, user, lock, password, code, remote_addr, policy, now)
    if attempt is None:
        credentials.verify_password(None, password)
        if lock is not None:
            reason = f"account locked: {lock.message}"
        elif not user.signed_up:
            _fail(store, user_name, remote_addr, "user has not signed up", now, count=True)
            raise AuthenticationFailed("wrong user name, password or one-time code")
        else:
            reason = "too many failed or pending logins; not checked"
        _fail(store, user_name, remote_addr, reason, now, count=False)
        raise AccountLocked(f'account "{user_name}" is locked; ask an admin (dtadmin lock rm)')
    failure, step = _check_factors(user, password, code, now)
    if failure is None:
        admitted, failure = _spend_step(store, user, step, attempt, remote_addr, now)
        if admitted is not None:
            return admitted
    raise _failed_attempt(store, user_name, attempt, failure, remote_addr, policy, now)


def _refuse_locked(
    store: StateStore,
    user: User,
    lock: Lock,
    password: str,
    code: str,
    remote_addr: str | None,
    policy: LockoutPolicy,
    now: float,
) -> NoReturn:
    """An admin's lock on the user. Whoever proves password and code is told the lock's
    message and end (it is their account); anyone else hears the generic refusal, so a
    lock reveals neither that the account exists nor that it is locked.

    That answer is an oracle for the password, so wrong guesses count as on an unlocked
    account (reserved, then locked out at ``max_failures`` for ``lock_for``). The
    code's step is spent: a code seen once (over a shoulder) must not log in after
    the lock is lifted, and a replay of it reads nothing."""
    # Reserved before argon2, as on an unlocked account: of N concurrent guesses at
    # most max_failures are checked (a count read first lets them all through), and a
    # lockout (which the admin's lock hides from password_lock) stops checking.
    attempt = None
    if store.active_lock(PASSWORD_LOCK, user.name, now) is None:
        attempt = store.begin_login_attempt(
            user.name,
            now=now,
            since=now - policy.window,
            limit=policy.max_failures,
            remote_addr=remote_addr,
        )
    if attempt is None:
        credentials.verify_password(None, password)  # same cost, nothing learned
        _fail(store, user.name, remote_addr, f"account locked: {lock.message}", now, count=False)
        raise AuthenticationFailed("wrong user name, password or one-time code")
    failure, step = _check_factors(user, password, code, now)
    if failure is None and not store.consume_totp_step(user.name, step, user.password_hash or ""):
        failure = "that one-time code was already used (or the password changed)"
    if failure is not None:  # counted, and at the limit the password locked out
        _failed_attempt(
            store, user.name, attempt, f"account locked; {failure}", remote_addr, policy, now
        )
        raise AuthenticationFailed("wrong user name, password or one-time code")
    with store.transaction(bump=False):
        _fail(store, user.name, remote_addr, f"account locked: {lock.message}", now, count=False)
        store.login_succeeded(user.name, attempt)
    until = (
        "until " + datetime.fromtimestamp(lock.expires, UTC).strftime("%Y-%m-%d %H:%M UTC")
        if lock.expires is not None
        else "with no end set"
    )
    said = f": {lock.message}" if lock.message else ""
    raise AccountLocked(
        f'your account "{user.name}" is locked by an admin{said} ({until}); ask an admin',
        disclose=True,
    )


def password_lock(store: StateStore, user: str, now: float) -> Lock | None:
    """What stops a password login: an admin's lock on the user, or a lockout.

    A lockout is a lock on the user's *password* (``target_kind`` "password"): anyone
    can cause one by guessing, so it must not cut or refuse the user's certificate
    sessions, which never use the password (issue 12). An admin's ``dtadmin lock
    --user`` still stops everything."""
    return store.active_lock("user", user, now) or store.active_lock(PASSWORD_LOCK, user, now)


def _reserve_attempt(
    store: StateStore, user: User, remote_addr: str | None, policy: LockoutPolicy, now: float
) -> tuple[int | None, Lock | None]:
    """The lock check, the failure count and the reservation, in one write transaction:
    a lockout committing meanwhile is seen, and at most ``max_failures`` are checked."""
    with store.transaction(bump=False):
        lock = password_lock(store, user.name, now)
        if lock is not None or not user.signed_up:
            return None, lock
        attempt = store.begin_login_attempt(
            user.name,
            now=now,
            since=now - policy.window,
            limit=policy.max_failures,
            remote_addr=remote_addr,
        )
        return attempt, None


def _check_factors(user: User, password: str, code: str, now: float) -> tuple[str | None, int]:
    """The slow part (argon2), over the record read before it; nothing is written."""
    if not credentials.verify_password(user.password_hash, password):
        return "wrong password", 0
    try:
        step = credentials.verify_totp(
            user.totp_secret or "", code, now=now, last_used_step=user.totp_last_step
        )
    except AuthenticationFailed as exc:
        return exc.message, 0
    return None, step


def _spend_step(
    store: StateStore, user: User, step: int, attempt: int, remote_addr: str | None, now: float
) -> tuple[User | None, str]:
    """Admit the login if, right now, the user is unlocked, the password is still the
    one checked and the code's step unused; else say which changed."""
    with store.transaction(bump=False):
        lock = password_lock(store, user.name, now)
        checked = user.password_hash or ""  # never empty here: the password matched it
        if lock is None and store.consume_totp_step(user.name, step, checked):
            store.login_succeeded(user.name, attempt)
            admitted = store.get_user(user.name)
            audit.record(
                store,
                "user.login",
                message="password and one-time code accepted",
                user=user.name,
                remote_addr=remote_addr,
                method="password+totp",
                now=now,
            )
            return admitted, ""
        current = store.find_user(user.name)
    if lock is not None:
        return None, f"account locked during login: {lock.message}"
    if current is None:
        return None, "user removed during login"
    if current.password_hash != user.password_hash:
        return None, "password changed during login"
    return None, "that one-time code was already used"


def _failed_attempt(
    store: StateStore,
    user: str,
    attempt: int,
    reason: str,
    remote_addr: str | None,
    policy: LockoutPolicy,
    now: float,
) -> AuthenticationFailed:
    """Audit the failure, count it and lock the account at the limit: one transaction,
    so of several failures landing at once exactly one locks. Returns what to raise."""
    with store.transaction(bump=False):
        _fail(store, user, remote_addr, reason, now, count=False)
        store.settle_login_attempt(attempt)
        locked = password_lock(store, user, now) is not None
        recent = store.count_login_failures(user, since=now - policy.window, pending=False)
        # An admin's lock does not stand in for the lockout: guesses at a locked
        # account (_refuse_locked) are locked out as any others.
        locked_out = store.active_lock(PASSWORD_LOCK, user, now) is not None
        if not locked_out and recent >= policy.max_failures:
            _lock_out(store, user, remote_addr, policy, now)
            locked = True
    if locked:
        return AccountLocked(
            f'too many failed logins: account "{user}" is locked for '
            f"{int(policy.lock_for // 60)} minutes"
        )
    return AuthenticationFailed("wrong user name, password or one-time code")


def _fail(
    store: StateStore, user: str, remote_addr: str | None, reason: str, now: float, *, count: bool
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
    store: StateStore, user: str, remote_addr: str | None, policy: LockoutPolicy, now: float
) -> None:
    with store.transaction():
        store.add_lock(
            Lock(
                "",
                PASSWORD_LOCK,
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


# -- bots ---------------------------------------------------------------------------------

BOT_TOKEN_TTL = 24 * 3600


def bot_token_id(token_hash: str) -> str:
    """How admins name a bot token (`dtadmin bots tokens`): a prefix of its hash."""
    return token_hash[:12]


def issue_bot_token(
    store: StateStore,
    bot: str,
    *,
    ttl: int = BOT_TOKEN_TTL,
    actor: str = "",
    now: float | None = None,
) -> tuple[str, Token]:
    """A secret a bot's job presents (`dtclient login --bot-token FILE`) to get a
    short-lived certificate for its own key, until it expires or is removed. Only its
    hash is stored. Refused for anyone but a bot: a token is never a person's login."""
    now = time.time() if now is None else now
    if ttl <= 0:
        raise UsageError("a bot token's --ttl must be positive")
    secret = credentials.new_token()
    with store.transaction():
        decide.check_bot(store.facts(user=bot, now=now), now, bot)
        token = store.add_token(
            Token(credentials.token_hash(secret), "bot", bot, expires=now + ttl, created_by=actor)
        )
        audit.record(
            store,
            "token.create",
            message=f'bot token {bot_token_id(token.token_hash)} created for "{bot}"',
            user=bot,
            actor=actor,
            kind="bot",
            token=bot_token_id(token.token_hash),
            expires=now + ttl,
            now=now,
        )
    return secret, token


def bot_token_user(
    store: StateStore, secret: str, *, remote_addr: str | None = None, now: float | None = None
) -> tuple[str, str]:
    """The bot a presented bot token stands for, and the token's hash (to decide again
    later); every use, and every refusal, audited. A refusal is TokenInvalid, whose
    reason the bastion tells the client (expired, removed, the bot locked)."""
    now = time.time() if now is None else now
    try:
        credentials.check_token_format(secret)
    except TokenInvalid as exc:
        audit.record(store, "token.use", success=False, message=exc.message, kind="bot",
                     remote_addr=remote_addr, now=now)  # fmt: skip
        raise
    digest = credentials.token_hash(secret)
    token = store.find_token(digest, "bot")
    subject = token.subject if token is not None else None
    try:
        decide.check_bot_token(token, store.facts(user=subject, now=now), now)
    except AccessDenied as exc:
        audit.record(store, "token.use", success=False, message=exc.message, user=subject,
                     kind="bot", remote_addr=remote_addr, now=now)  # fmt: skip
        # The reason goes to the client: only the token's holder can ask.
        raise TokenInvalid(exc.message) from None
    assert token is not None
    audit.record(
        store,
        "token.use",
        message=f"bot token {bot_token_id(digest)} used",
        user=token.subject,
        remote_addr=remote_addr,
        kind="bot",
        token=bot_token_id(digest),
        now=now,
    )
    return token.subject, digest


def recheck_bot_token(store: StateStore, bot: str, token_hash: str, now: float) -> None:
    """A connection that authenticated with a bot token may go on: the token is still
    there, unexpired, for this bot, which is still an unlocked bot."""
    facts = store.facts(user=bot, now=now)
    decide.check_bot(facts, now, bot)  # the bot's own state first: removed, locked
    token = store.find_token(token_hash, "bot")
    if token is not None and token.subject != bot:
        token = None
    decide.check_bot_token(token, facts, now)
