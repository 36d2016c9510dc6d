"""The store: migrations, records round-trip, revision bumps, atomic token use."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading

import pytest

from bastion.authz.records import (
    AuditEvent,
    Device,
    DeviceCredential,
    IssuedCert,
    Lock,
    Node,
    Role,
    Rule,
    Token,
    User,
)
from bastion.protocol.errors import AlreadyExists, NotFound, StateError
from bastion.storage import Store


@pytest.fixture
def store(any_store):
    """The tests taking ``store`` run on SQLite and on PostgreSQL."""
    return any_store


def test_open_missing_state_names_the_fix(tmp_path):
    with pytest.raises(StateError, match="dtadmin init"):
        Store.open(tmp_path / "nowhere")


def test_database_and_its_wal_are_private_from_the_start(tmp_path):
    """The audit log and the state live in -wal and -shm too: with umask 022 they
    were created 0644 before the database file was tightened to 0600."""
    old = os.umask(0o022)
    try:
        s = Store.open(tmp_path / "state", create=True)
    finally:
        os.umask(old)
    try:
        s.set_setting("probe", 1)
        for name in ("cluster.db", "cluster.db-wal", "cluster.db-shm"):
            mode = stat.S_IMODE((tmp_path / "state" / name).stat().st_mode)
            assert mode == 0o600, (name, oct(mode))
    finally:
        s.close()


def test_wal_and_schema_version(tmp_path):
    store = Store.open(tmp_path, create=True)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.schema_version() >= 1
    store.close()


def test_corrupt_database_refuses_to_open(tmp_path):
    (tmp_path / "cluster.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="corrupt|unreadable"):
        Store.open(tmp_path)


def test_truncated_database_refuses_to_open(tmp_path):
    s = Store.open(tmp_path, create=True)
    for i in range(200):
        s.add_user(User(f"user{i}", ("access",), ("root",)))
    s.close()
    path = tmp_path / "cluster.db"
    for name in ("cluster.db-wal", "cluster.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateError):
        s = Store.open(tmp_path)
        s.list_users()


def test_newer_schema_is_refused(tmp_path):
    Store.open(tmp_path, create=True).close()
    conn = sqlite3.connect(tmp_path / "cluster.db")
    conn.execute("INSERT INTO _migrations (version, name, applied) VALUES (999, 'future', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="newer"):
        Store.open(tmp_path)


def test_user_round_trip_and_errors(store):
    store.add_user(User("alice", ("access", "editor"), ("root", "ubuntu")))
    with pytest.raises(AlreadyExists):
        store.add_user(User("alice", (), ()))
    got = store.get_user("alice")
    assert got.roles == ("access", "editor") and got.logins == ("root", "ubuntu")
    with pytest.raises(NotFound, match='user "bob" not found'):
        store.get_user("bob")
    store.remove_user("alice")
    assert store.find_user("alice") is None


def test_revision_bumps_on_changes_not_on_audit(store):
    before = store.revision()
    store.add_node(Node("node-1", "127.0.0.1", 22, {"env": "prod"}))
    assert store.revision() == before + 1
    store.append_audit(AuditEvent(0, 1.0, "DT0001I", "x", True))
    assert store.revision() == before + 1


def test_failed_transaction_changes_nothing(store):
    before = store.revision()
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.add_user(User("carol", (), ()))
            raise RuntimeError("boom")
    assert store.find_user("carol") is None
    assert store.revision() == before


def test_role_round_trip(store):
    role = Role(
        "ops",
        logins=("root",),
        node_labels={"env": ("prod", "staging")},
        rules=(Rule(("device",), ("enroll",)),),
        device_trust_mode="required",
    )
    store.put_role(role)
    assert store.get_role("ops") == role
    with pytest.raises(AlreadyExists):
        store.put_role(role, create_only=True)


def test_device_round_trip_with_credential(store):
    cred = DeviceCredential("c1", b"\x30\x01", "tpm_ekcert", "ab" * 32, ak_public=b"\x00\x01")
    d = store.add_device(Device("", "SN1", "linux", "enrolled", "alice", cred, ({"os": "x"},)))
    got = store.get_device("SN1")
    assert got.id == d.id and got.credential == cred and got.enrolled
    assert store.find_device_by_id(d.id) == got


def test_node_address_unique(store):
    store.add_node(Node("a", "10.0.0.1", 22))
    with pytest.raises(AlreadyExists):
        store.add_node(Node("b", "10.0.0.1", 22))
    assert store.find_node_by_addr("10.0.0.1", 22).name == "a"
    assert Node("v6", "::1", 22).addr == "[::1]:22"


def test_locks_expire(store):
    store.add_lock(Lock("", "user", "alice", "gone", expires=100.0))
    assert store.active_lock("user", "alice", 50.0) is not None
    assert store.active_lock("user", "alice", 150.0) is None
    assert len(store.list_locks(now=150.0)) == 0


def test_token_consumed_once_even_when_racing(store_factory):
    store_factory(create=True).add_token(Token("h", "enroll", "SN1", expires=1e12))
    results = []

    def worker():
        s = store_factory()
        results.append(s.consume_token("h", "enroll", now=1000.0, consumer="x"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


def test_expired_token_cannot_be_consumed(store):
    store.add_token(Token("h", "enroll", "SN1", expires=10.0))
    assert not store.consume_token("h", "enroll", now=11.0, consumer="x")
    assert not store.consume_token("h", "signup", now=1.0, consumer="x")


def test_duplicate_serial_is_refused(store):
    cert = IssuedCert(7, "k", "alice", "user", ("root",), 0, 10, "SHA256:x")
    assert store.record_cert(cert)
    assert not store.record_cert(cert)


def test_audit_filters(store):
    for i, kind in enumerate(["a", "b", "a"]):
        store.append_audit(AuditEvent(0, float(i), "C", kind, True, user="u" if i else None))
    assert [e.type for e in store.list_audit(type="a")] == ["a", "a"]
    assert [e.time for e in store.list_audit(since=1.0)] == [1.0, 2.0]
    assert len(store.list_audit(user="u")) == 2


def test_after_commit_runs_only_for_what_committed(store, caplog):
    """Audit log lines are written once their row is committed: a rolled-back
    issuance must not leave an "allow" line in the bastion's log."""
    import logging

    from bastion import audit

    ran = []
    store.after_commit(lambda: ran.append("no transaction: at once"))
    with store.transaction(bump=False):
        store.after_commit(lambda: ran.append("committed"))
        assert ran == ["no transaction: at once"]
        with pytest.raises(ValueError), store.savepoint():
            store.after_commit(lambda: ran.append("savepoint rolled back"))
            raise ValueError
    assert ran == ["no transaction: at once", "committed"]
    with pytest.raises(ValueError), store.transaction(bump=False):
        store.after_commit(lambda: ran.append("rolled back"))
        raise ValueError
    assert ran == ["no transaction: at once", "committed"]

    caplog.set_level(logging.INFO, logger="bastion.audit")
    with pytest.raises(ValueError), store.transaction(bump=False):
        audit.record(store, "cert.create", user="ghost", message="never happened")
        raise ValueError
    audit.record(store, "cert.create", user="real", message="happened")
    lines = [r.getMessage() for r in caplog.records if r.name == "bastion.audit"]
    assert len(lines) == 1 and "user=real" in lines[0]
