"""Password logins racing each other and an admin: no lost update, one code one login.

Real argon2, a real SQLite file, and a separate Store (connection) per thread, as
separate bastions on one state directory would have. Only timing is arranged: the
argon2 check is wrapped so that the racers all finish it before any of them goes on,
or so that it waits while a real `dtadmin` process changes the user.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bastion import accounts, credentials
from bastion.authz.records import User
from bastion.cluster import init_cluster
from bastion.protocol.errors import AccountLocked, AuthenticationFailed
from bastion.storage import Store

BIN = Path(sys.executable).parent
PASSWORD = "correct horse battery"
WAIT = 60  # seconds any arranged wait may last before the test gives up


@pytest.fixture
def state(tmp_path) -> Iterator[Path]:
    cluster = init_cluster(tmp_path / "state", "races")
    cluster.close()
    yield tmp_path / "state"


def add_signed_up_user(state: Path, name: str = "alice") -> str:
    secret = credentials.new_totp_secret()
    store = Store.open(state)
    try:
        store.add_user(
            User(
                name,
                ("access",),
                ("root",),
                password_hash=credentials.hash_password(PASSWORD),
                totp_secret=secret,
            )
        )
    finally:
        store.close()
    return secret


def after_argon2(monkeypatch, then: Callable[[], None]) -> None:
    """Run ``then`` right after each real password check, before the login goes on.

    At most two checks run at once (two cores; 64 MiB each)."""
    real = credentials.verify_password
    cores = threading.Semaphore(2)

    def verify(stored_hash, password):
        with cores:
            result = real(stored_hash, password)
        then()
        return result

    monkeypatch.setattr(credentials, "verify_password", verify)


def race(state: Path, n: int, attempt: Callable[[Store], object]) -> list[object]:
    """``attempt`` in ``n`` threads at once, each on its own connection; the outcomes."""
    stores = [Store.open(state, check=False) for _ in range(n)]
    outcomes: list[object] = [None] * n
    start = threading.Barrier(n, timeout=WAIT)

    def run(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = attempt(stores[i])
        except Exception as exc:  # the outcome under test
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT * 2)
        assert not any(t.is_alive() for t in threads), "a login never finished"
    finally:
        for s in stores:
            s.close()
    return outcomes


def audit_of(state: Path, name: str) -> list:
    store = Store.open(state)
    try:
        return store.list_audit(user=name, limit=10**6)
    finally:
        store.close()


def test_one_code_sent_by_four_logins_at_once_admits_one(state, monkeypatch):
    secret = add_signed_up_user(state)
    now = time.time()
    code = credentials.totp_now(secret, now)
    all_checked = threading.Barrier(4, timeout=WAIT)
    after_argon2(monkeypatch, all_checked.wait)  # all four read the record, then go on
    outcomes = race(
        state,
        4,
        lambda store: accounts.check_password_login(
            store, "alice", PASSWORD, code, remote_addr="192.0.2.1", now=now
        ),
    )
    admitted = [o for o in outcomes if isinstance(o, User)]
    refused = [o for o in outcomes if isinstance(o, AuthenticationFailed)]
    assert len(admitted) == 1 and len(refused) == 3, outcomes
    events = audit_of(state, "alice")
    assert [e.type for e in events].count("user.login") == 1
    assert (
        sorted(e.message for e in events if e.type == "auth.failed")
        == ["that one-time code was already used"] * 3
    )


def test_twenty_wrong_guesses_at_once_are_checked_at_most_five_times(state, monkeypatch):
    add_signed_up_user(state)
    now = time.time()
    everyone_here = threading.Barrier(20, timeout=WAIT)  # real and stand-in checks alike
    after_argon2(monkeypatch, everyone_here.wait)
    outcomes = race(
        state,
        20,
        lambda store: accounts.check_password_login(
            store, "alice", "wrong horse battery", "123456", remote_addr="192.0.2.2", now=now
        ),
    )
    assert all(isinstance(o, AuthenticationFailed) for o in outcomes), outcomes
    assert any(isinstance(o, AccountLocked) for o in outcomes)
    events = audit_of(state, "alice")
    reasons = [e.message for e in events if e.type == "auth.failed"]
    assert len(reasons) == 20
    checked = reasons.count("wrong password")
    assert 1 <= checked <= accounts.LockoutPolicy().max_failures, reasons
    assert reasons.count("too many failed or pending logins; not checked") == 20 - checked
    assert [e.type for e in events].count("lock.create") == 1
    store = Store.open(state)
    try:
        locks = [lk for lk in store.list_locks(now=now) if lk.target == "alice"]
        assert len(locks) == 1
    finally:
        store.close()


def dtadmin(state: Path, *args: str) -> None:
    result = subprocess.run(
        [str(BIN / "dtadmin"), *args, "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr


def login_while_admin_acts(state: Path, monkeypatch, *admin: str) -> object:
    """A login whose argon2 check waits while a real `dtadmin` process runs ``admin``."""
    secret = add_signed_up_user(state)
    checked, admin_done = threading.Event(), threading.Event()

    def hold() -> None:
        checked.set()
        assert admin_done.wait(WAIT)

    after_argon2(monkeypatch, hold)
    outcome: list[object] = []
    store = Store.open(state, check=False)

    def login() -> None:
        now = time.time()
        try:
            code = credentials.totp_now(secret, now)
            outcome.append(accounts.check_password_login(store, "alice", PASSWORD, code, now=now))
        except Exception as exc:  # the outcome under test
            outcome.append(exc)

    thread = threading.Thread(target=login)
    thread.start()
    try:
        assert checked.wait(WAIT), "the login never reached its password check"
        dtadmin(state, *admin)
    finally:
        admin_done.set()
        thread.join(WAIT)
        store.close()
    assert outcome, "the login never finished"
    return outcome[0]


def current(state: Path, name: str = "alice") -> User:
    store = Store.open(state)
    try:
        return store.get_user(name)
    finally:
        store.close()


def test_a_reset_during_the_password_check_stands_and_the_login_is_refused(state, monkeypatch):
    result = login_while_admin_acts(state, monkeypatch, "users", "reset", "alice")
    assert isinstance(result, AuthenticationFailed), result
    after = current(state)
    assert after.password_hash is None and after.totp_secret is None
    assert not credentials.verify_password(after.password_hash, PASSWORD)
    reasons = [e.message for e in audit_of(state, "alice") if e.type == "auth.failed"]
    assert reasons == ["password changed during login"]


def test_roles_set_during_the_password_check_stay_as_set(state, monkeypatch):
    result = login_while_admin_acts(
        state, monkeypatch, "users", "update", "alice", "--set-roles", "editor"
    )
    after = current(state)
    assert after.roles == ("editor",), after
    assert isinstance(result, User), result
    assert result.roles == ("editor",) and result.password_hash == after.password_hash
    assert result.totp_last_step == after.totp_last_step is not None


def test_a_lock_during_the_password_check_refuses_the_login(state, monkeypatch):
    result = login_while_admin_acts(state, monkeypatch, "lock", "--user", "alice")
    assert isinstance(result, AccountLocked), result
    reasons = [e.message for e in audit_of(state, "alice") if e.type == "auth.failed"]
    assert len(reasons) == 1 and reasons[0].startswith("account locked during login")
