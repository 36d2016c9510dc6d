"""The PostgreSQL store against a real server: feed, single use, limits, liveness, faults.

Every test gets a fresh database on the session's server (tests/postgres.py); the
test that stops PostgreSQL starts a server of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from bastion.authz.records import AuditEvent, Lock, OpenSession, Token, User
from bastion.protocol.errors import StateError, StorageUnavailable
from bastion.storage import open_store
from bastion.storage.postgres import PostgresStore
from tests.postgres import available, fresh_database, make_template, postgres_server

pytestmark = pytest.mark.skipif(not available(), reason="PostgreSQL is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def two(pg_url, tmp_path):
    """Two stores on one database, as two bastions on two hosts would have."""
    a = PostgresStore.open(pg_url, tmp_path / "a")
    b = PostgresStore.open(pg_url, tmp_path / "b")
    yield a, b
    a.close()
    b.close()


def _in_thread(fn, *args):
    box: dict = {}

    def run():
        start = time.monotonic()
        fn(*args)
        box["took"] = time.monotonic() - start

    t = threading.Thread(target=run)
    t.start()
    return t, box


# -- the change feed ---------------------------------------------------------------------


def test_a_change_on_one_store_wakes_a_waiter_on_another(two):
    a, b = two
    a.wait_for_change(5.0)  # the first call connects the listener and returns at once
    before = a.revision()
    t, box = _in_thread(a.wait_for_change, 10.0)
    time.sleep(0.2)  # let it be waiting (if it is not yet, the NOTIFY is queued anyway)
    b.add_lock(Lock("", "user", "alice", "gone"))
    t.join(15)
    assert box["took"] < 5.0, box  # woken by the NOTIFY, not the 10 s timeout
    assert a.revision() == before + 1
    # Audit rows and session rows are no change a bastion re-checks for.
    b.append_audit(AuditEvent(0, 1.0, "C", "x.y", True))
    t0 = time.monotonic()
    a.wait_for_change(0.3)
    assert time.monotonic() - t0 >= 0.25 and a.revision() == before + 1


def test_the_feed_catches_up_after_its_connection_is_killed(two, pg_server):
    a, b = two
    a.wait_for_change(1.0)  # listening
    pg_server.admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'"
    )
    b.add_user(User("bob", (), ()))  # its NOTIFY reaches nobody: the listener is gone
    before = time.monotonic()
    a.wait_for_change(5.0)  # notices the loss
    a.wait_for_change(5.0)  # reconnects, and returns at once: the caller must re-read
    assert time.monotonic() - before < 4.0
    assert a.revision() == b.revision() and a.find_user("bob") is not None
    # And the new listener hears the next change.
    t, box = _in_thread(a.wait_for_change, 10.0)
    time.sleep(0.2)
    b.add_user(User("carol", (), ()))
    t.join(15)
    assert box["took"] < 5.0


def test_revision_is_the_newest_change_and_old_rows_are_trimmed(pg_url, tmp_path, monkeypatch):
    from bastion.storage import pg_connection

    monkeypatch.setattr(pg_connection, "TRIM_EVERY", 5)
    monkeypatch.setattr(pg_connection, "KEEP_CHANGES", 3)
    store = PostgresStore.open(pg_url, tmp_path)
    try:
        with store.transaction(bump=False):
            store._execute("INSERT INTO changes (time, origin) VALUES (0, 'old')")
        for i in range(12):
            store.set_setting(f"k{i}", i)
        assert store.revision() == 13
        rows = store._all("SELECT seq FROM changes ORDER BY seq")
        assert rows[0]["seq"] > 1 and rows[-1]["seq"] == 13  # the old row went, newest kept
    finally:
        store.close()


# -- single use and limits across bastions -------------------------------------------------


def test_one_token_spent_from_four_threads_on_two_stores_has_one_winner(two):
    a, b = two
    a.add_token(Token("h", "enroll", "SN1", expires=1e12))
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def spend(store):
        barrier.wait()
        results.append(store.consume_token("h", "enroll", now=1000.0, consumer="x"))

    threads = [threading.Thread(target=spend, args=(s,)) for s in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [False, False, False, True]


_SPEND = """
import sys
from bastion.storage.postgres import PostgresStore
store = PostgresStore.open(sys.argv[1], check=False)
won = [i for i in range(int(sys.argv[2]))
       if store.consume_token(f"t{i}", "signup", now=1000.0, consumer=sys.argv[3])]
print(",".join(map(str, won)))
"""


def test_tokens_spent_by_two_processes_are_each_spent_once(pg_url, tmp_path):
    store = PostgresStore.open(pg_url, tmp_path)
    n = 40
    for i in range(n):
        store.add_token(Token(f"t{i}", "signup", "alice", expires=1e12))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SPEND, pg_url, str(n), name],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )  # fmt: skip
        for name in ("p1", "p2")
    ]
    won = [p.communicate(timeout=60)[0].strip() for p in procs]
    got = [int(x) for w in won for x in w.split(",") if x]
    assert sorted(got) == list(range(n))  # every token once, none twice
    assert {t.consumed_by for t in store.list_tokens("signup")} <= {"p1", "p2"}
    store.close()


def test_one_totp_step_logs_in_once_across_stores(two):
    a, b = two
    a.add_user(User("alice", (), (), password_hash="H", totp_secret="S"))
    results: list[bool] = []
    barrier = threading.Barrier(2)

    def use(store):
        barrier.wait()
        results.append(store.consume_totp_step("alice", 100, "H"))

    threads = [threading.Thread(target=use, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [False, True]


def test_login_attempts_spread_over_two_stores_hold_the_limit(two):
    a, b = two
    got: list[int | None] = []
    barrier = threading.Barrier(10)

    def guess(store):
        barrier.wait()
        got.append(
            store.begin_login_attempt(
                "alice", now=1000.0, since=0.0, limit=5, remote_addr="192.0.2.1"
            )
        )

    threads = [threading.Thread(target=guess, args=((a, b)[i % 2],)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    reserved = [g for g in got if g is not None]
    assert len(reserved) == 5 and len(set(reserved)) == 5
    assert a.count_login_failures("alice", since=0.0) == 5


def test_concurrent_audit_appends_from_two_stores_keep_one_chain(two):
    from bastion.storage import audit_chain

    a, b = two

    def append(store, tag):
        for i in range(25):
            store.append_audit(AuditEvent(0, float(i), "C", "x.y", True, message=tag))

    threads = [threading.Thread(target=append, args=(s, n)) for s, n in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    report = audit_chain.verify(a.audit_chain_rows(), [], None, None)
    assert report.ok and report.rows == 50, report


def test_a_failed_unique_write_leaves_the_batch_usable(pg_url, tmp_path):
    """PostgreSQL aborts a transaction on any error; a duplicate inside a batch must
    undo only itself, as on SQLite (group commit relies on it)."""
    from bastion.authz.records import IssuedCert
    from bastion.protocol.errors import AlreadyExists

    store = PostgresStore.open(pg_url, tmp_path)
    cert = IssuedCert(7, "k", "alice", "user", ("root",), 0, 10, "SHA256:x")
    with store.transaction():
        store.add_user(User("alice", (), ()))
        assert store.record_cert(cert)
        assert not store.record_cert(cert)
        with pytest.raises(AlreadyExists):
            store.add_user(User("alice", (), ()))
        store.add_user(User("bob", (), ()))
    assert store.find_user("bob") is not None and store.find_cert(7) is not None
    store.close()


# -- liveness across hosts -----------------------------------------------------------------

_HOLD = """
import sys, time
from bastion.storage.postgres import PostgresStore
store = PostgresStore.open(sys.argv[1], check=False)
claim = store.hold_instance()
print(claim.name, flush=True)
time.sleep(120)
"""


def test_a_killed_bastions_sessions_are_swept_from_another_host(pg_url, tmp_path):
    from bastion.proxy.sessions import Registry

    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD, pg_url], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    store = PostgresStore.open(pg_url, tmp_path / "other-host")
    try:
        name = child.stdout.readline().strip()
        store.add_open_session(OpenSession(name, 1, time.time(), user="alice", node="n1"))
        store.dead_after = 0.0
        assert store.instance_alive(name)
        with store.claim_if_dead(name) as dead:
            assert not dead  # alive: its lock is held
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 15  # the server notices the closed socket
        while store.instance_alive(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not store.instance_alive(name)

        store.dead_after = 60.0  # a lock seen free once is not yet a dead bastion
        with store.claim_if_dead(name) as dead:
            assert not dead
        store.dead_after = 0.0
        registry = Registry(store)
        registry._instance = store.hold_instance()
        try:
            assert registry.sweep() == 1
        finally:
            registry._instance.release()
        assert store.list_open_sessions() == []
        (end,) = store.list_audit(type="session.end")
        assert end.fields["recovered"] is True and end.fields["bastion"] == name
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        store.close()


def test_an_instance_lock_lost_with_its_connection_is_taken_again(pg_url, tmp_path, pg_server):
    from bastion.storage import postgres

    store = PostgresStore.open(pg_url, tmp_path)
    claim = store.hold_instance()
    try:
        pg_server.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE '%pg_try_advisory_lock%' AND pid <> pg_backend_pid()"
        )
        deadline = time.monotonic() + postgres.KEEP_INTERVAL * 10
        seen_alive = False
        while time.monotonic() < deadline:
            if store.instance_alive(claim.name):
                seen_alive = True
                break
            time.sleep(0.1)
        assert seen_alive
    finally:
        claim.release()
        store.close()


# -- URLs and faults -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://dt:s3cret@db.example.com/dt",
        "postgresql://dt@db.example.com/dt?password=s3cret",
        "postgresql:///dt?host=/run/pg&password=s3cret",
    ],
)
def test_a_url_with_a_password_is_refused(url, tmp_path):
    with pytest.raises(StateError, match="password file") as err:
        open_store(tmp_path, url)
    assert "s3cret" not in err.value.message


def test_dtadmin_refuses_a_password_url_without_a_traceback(tmp_path):
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "dtadmin"), "--state", str(tmp_path),
         "--database", "postgresql://dt:s3cret@127.0.0.1:1/dt", "users", "ls"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "password file" in result.stderr and "s3cret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_refused_init_leaves_no_state_directory_behind(tmp_path):
    state = tmp_path / "new-state"
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "dtadmin"), "--state", str(state),
         "--database", "postgresql://dt:s3cret@127.0.0.1:1/dt", "init", "--cluster", "x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert not state.exists()


def test_an_empty_database_is_refused_unless_created(pg_server, tmp_path):
    pg_server.admin("CREATE DATABASE dt_empty")
    with pytest.raises(StateError, match="no cluster state in the database"):
        PostgresStore.open(pg_server.url("dt_empty"), tmp_path)


def test_a_newer_schema_is_refused(pg_url, tmp_path):
    store = PostgresStore.open(pg_url, tmp_path)
    with store.transaction(bump=False):
        store._execute("INSERT INTO _migrations (version, name, applied) VALUES (999, 'x', 0)")
    store.close()
    with pytest.raises(StateError, match="newer than this release"):
        PostgresStore.open(pg_url, tmp_path)


def test_postgresql_stopped_is_storage_unavailable_then_back(tmp_path):
    with postgres_server() as server:
        make_template(server)
        url = fresh_database(server)
        store = PostgresStore.open(url, tmp_path)
        store.add_user(User("alice", (), ()))
        server.stop()
        with pytest.raises(StorageUnavailable) as err:
            store.find_user("alice")
        assert "cluster database postgresql://" in err.value.message
        with pytest.raises(StorageUnavailable):
            store.add_user(User("bob", (), ()))
        with pytest.raises(StorageUnavailable, match="cannot be reached"):
            open_store(tmp_path, url)
        started = time.monotonic()
        store.wait_for_change(0.3)  # no feed: waits, does not raise
        assert time.monotonic() - started < 5
        result = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "dtadmin"), "--state",
             str(tmp_path), "--database", url, "users", "ls"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "cannot be reached" in result.stderr, result.stderr
        server.start()
        assert store.find_user("alice") is not None  # the pool reconnects
        store.add_user(User("bob", (), ()))
        store.close()


def test_which_database_flag_then_env_then_config(monkeypatch, tmp_path):
    from bastion.config import load_config
    from bastion.storage import database_url

    conf = tmp_path / "bastion.toml"
    conf.write_text('[bastion]\ndatabase = "postgresql://dt@db-config/dt"\n')
    cfg = load_config(conf)
    assert cfg.database == "postgresql://dt@db-config/dt"
    monkeypatch.delenv("DT_DATABASE", raising=False)
    assert database_url(None, cfg.database) == cfg.database
    assert database_url(None, None) is None  # SQLite in the state directory
    monkeypatch.setenv("DT_DATABASE", "postgresql://dt@db-env/dt")
    assert database_url(None, cfg.database) == "postgresql://dt@db-env/dt"
    assert database_url("postgresql://dt@db-flag/dt", cfg.database).endswith("db-flag/dt")
    with pytest.raises(StateError, match="postgresql:// URL"):
        open_store(tmp_path, "mysql://dt@db/dt")


# -- the schema ----------------------------------------------------------------------------


def test_the_postgresql_schema_has_every_table_and_column_sqlite_has(pg_url, tmp_path):
    """The noun modules speak one SQL to both stores: a column SQLite's migrations add
    without a PostgreSQL twin (bastion/storage/pg_migrations.py) would fail there only,
    at the first bastion that uses it. Types differ by design; names must not."""
    import sqlite3

    from bastion.storage import Store

    lite = Store.open(tmp_path / "lite", create=True)
    lite.close()
    db = sqlite3.connect(tmp_path / "lite" / "cluster.db")
    try:
        tables = [
            r[0]
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' AND name != '_migrations'"
            )
        ]
        sqlite_cols = {
            t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")}  # noqa: S608 (names from sqlite_master)
            for t in tables
        }
    finally:
        db.close()
    pg = PostgresStore.open(pg_url, tmp_path / "pg")
    try:
        rows = pg._all(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema()"
        )
    finally:
        pg.close()
    pg_cols: dict[str, set[str]] = {}
    for row in rows:
        pg_cols.setdefault(row["table_name"], set()).add(row["column_name"])
    for table, columns in sqlite_cols.items():
        assert table in pg_cols, f"no PostgreSQL table {table}"
        assert columns <= pg_cols[table], f"{table}: missing {columns - pg_cols[table]}"


def test_every_connection_notices_a_vanished_peer_within_a_minute(pg_server, tmp_path):
    """Over TCP, a bastion that loses power sends no FIN: without keepalives on the
    server's side its instance lock stays held (its sessions unswept) for hours, and
    without them on ours a read hangs for the 15 min of TCP retransmissions. Every
    connection the store makes has both; a URL's own setting wins."""
    from urllib.parse import urlparse

    from bastion.storage.pg_connection import keepalive_kwargs

    name = urlparse(fresh_database(pg_server)).path.lstrip("/")
    store = PostgresStore.open(pg_server.url(name, tcp=True), tmp_path)
    try:
        claim = store.hold_instance()
        rows = store._all(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('tcp_keepalives_idle', 'tcp_user_timeout')"
        )
        assert {r["name"]: r["setting"] for r in rows} == {
            "tcp_keepalives_idle": "10",
            "tcp_user_timeout": "30000",
        }
        seen = store._all(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
            "AND client_port IS NOT NULL AND backend_type = 'client backend'"
        )
        assert seen[0]["n"] >= 2  # the pool's and the instance claim's, both over TCP
        claim.release()
    finally:
        store.close()
    own = keepalive_kwargs("postgresql:///dt?keepalives_idle=60")
    assert "keepalives_idle" not in own and own["keepalives_count"] == "3"
