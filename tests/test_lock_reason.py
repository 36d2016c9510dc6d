"""A lock's message is told only to whoever proved password and code, and the answer
is no password oracle: wrong guesses at a locked account count, and past the limit
nothing is checked (bastion.accounts, over a real SQLite file)."""

from __future__ import annotations

import time

import pytest

from bastion import accounts, credentials
from bastion.authz.records import Lock, User
from bastion.cluster import init_cluster
from bastion.protocol.errors import AccountLocked, AuthenticationFailed

PASSWORD = "correct horse battery"


@pytest.fixture
def store(tmp_path):
    cluster = init_cluster(tmp_path / "state", "lock-test")
    yield cluster.store
    cluster.close()


def _locked_user(store, name: str) -> str:
    secret = credentials.new_totp_secret()
    store.add_user(User(name, ("access",)))
    store.set_user_secrets(name, credentials.hash_password(PASSWORD), secret, 0)
    store.add_lock(
        Lock("", "user", name, message="laptop reported lost", expires=time.time() + 7200)
    )
    return secret


def test_the_lock_message_needs_password_and_code(store):
    secret = _locked_user(store, "alice")
    with pytest.raises(AuthenticationFailed) as wrong:
        accounts.check_password_login(
            store, "alice", "a wrong password", credentials.totp_now(secret)
        )
    assert not isinstance(wrong.value, AccountLocked) and not wrong.value.disclose
    assert "laptop" not in wrong.value.message
    with pytest.raises(AccountLocked) as told:
        accounts.check_password_login(store, "alice", PASSWORD, credentials.totp_now(secret))
    assert told.value.disclose and "laptop reported lost" in told.value.message
    assert "until " in told.value.message


def test_guessing_a_locked_account_stops_being_checked(store):
    secret = _locked_user(store, "bob")
    policy = accounts.LockoutPolicy(max_failures=3)
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            accounts.check_password_login(store, "bob", "guess", "000000", policy=policy)
    with pytest.raises(AuthenticationFailed) as after:
        accounts.check_password_login(
            store, "bob", PASSWORD, credentials.totp_now(secret), policy=policy
        )
    assert not after.value.disclose and "laptop" not in after.value.message


def test_concurrent_guesses_at_a_locked_account_stay_within_the_limit(store):
    """N guesses landing at once (the bastion checks several passwords in parallel)
    never get more than ``max_failures`` checked: the oracle is as bounded as an
    unlocked account's lockout (SECURITY-CHECKLIST 38)."""
    import threading

    from bastion.storage import Store

    _locked_user(store, "carol")
    policy = accounts.LockoutPolicy(max_failures=2)
    path = store.path.parent
    barrier = threading.Barrier(6)
    checked: list[str] = []
    real = accounts._check_factors

    def counting(*args, **kwargs):
        checked.append("x")
        return real(*args, **kwargs)

    def guess() -> None:
        own = Store.open(path, check=False)
        try:
            barrier.wait()
            with pytest.raises(AuthenticationFailed):
                accounts.check_password_login(own, "carol", "guess", "000000", policy=policy)
        finally:
            own.close()

    accounts._check_factors = counting
    try:
        threads = [threading.Thread(target=guess) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        accounts._check_factors = real
    assert len(checked) <= policy.max_failures


def test_guessing_a_locked_account_locks_the_password_out_as_on_any_account(store):
    """At the limit the password is locked out for ``lock_for`` (longer than the
    window), as on an unlocked account: the failures ageing out of the window do not
    reopen the oracle early."""
    secret = _locked_user(store, "dan")
    policy = accounts.LockoutPolicy(max_failures=2, window=600, lock_for=1800)
    now = time.time()
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            accounts.check_password_login(store, "dan", "guess", "000000", policy=policy, now=now)
    later = now + 700  # past the window, within the lockout
    with pytest.raises(AuthenticationFailed) as after:
        accounts.check_password_login(
            store, "dan", PASSWORD, credentials.totp_now(secret, now=later), policy=policy, now=later
        )
    assert not after.value.disclose and "laptop" not in after.value.message


def test_the_code_that_read_a_lock_message_is_spent(store):
    """One code, one use: the code typed at a locked account (and seen, say, over a
    shoulder) does not log in once an admin lifts the lock a minute later."""
    secret = _locked_user(store, "fay")
    code = credentials.totp_now(secret)
    with pytest.raises(AccountLocked) as told:
        accounts.check_password_login(store, "fay", PASSWORD, code)
    assert told.value.disclose
    store.remove_locks_for("user", "fay")
    with pytest.raises(AuthenticationFailed):
        accounts.check_password_login(store, "fay", PASSWORD, code)
