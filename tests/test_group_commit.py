"""Group commit: many certificate requests share one transaction, none loses its guarantees.

Each request in a batch is checked, signed and recorded on its own (a savepoint): a
refused one is rolled back alone and audited, the others go on. No certificate is
returned before the batch's commit; when the commit fails, every caller gets the
error and nothing of the batch is recorded.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz.records import Device, DeviceCredential, Lock, User
from bastion.ca.authority import Issued, UserCertRequest
from bastion.ca.issuer import GroupCommitIssuer
from bastion.cluster import Cluster, init_cluster
from bastion.protocol.errors import AccessDenied, DeviceNotTrusted, StorageUnavailable
from bastion.storage import connection as storage_connection
from tests.disks import fill, tmpfs

CRED = DeviceCredential("cred-1", b"\x30", "tpm_ekcert", "ab" * 32)


@pytest.fixture
def cluster(tmp_path):
    c = init_cluster(tmp_path / "state", "batch")
    for name in ("alice", "bob", "mallory"):
        c.store.add_user(User(name, ("access",), ("root",)))
    yield c
    c.close()


def key():
    return ed25519.Ed25519PrivateKey.generate().public_key()


def test_a_batch_refuses_each_bad_request_alone(cluster):
    store = cluster.store
    store.add_lock(Lock("", "user", "mallory", "stolen laptop", None, time.time(), "admin"))
    lost = store.add_device(Device("", "SN-LOST", "linux", "enrolled", "bob", CRED))
    store.add_lock(Lock("", "device", "SN-LOST", "", None, time.time(), "admin"))
    requests = [
        UserCertRequest("alice", key()),
        UserCertRequest("mallory", key()),  # locked user
        UserCertRequest("nobody", key()),  # unknown user
        UserCertRequest("bob", key(), device=lost),  # locked device
        UserCertRequest("bob", key(), remote_addr="192.0.2.7"),
    ]
    revision = store.revision()
    results = cluster.ca.sign_users(requests)
    assert [type(r) for r in results] == [
        Issued,
        AccessDenied,
        AccessDenied,
        DeviceNotTrusted,
        Issued,
    ]
    assert "locked" in results[1].message and "does not exist" in results[2].message
    recorded = {c.serial for c in store.list_certs()}
    assert recorded == {results[0].record.serial, results[4].record.serial}
    created = store.list_audit(type="cert.create")
    assert sorted(e.user for e in created if e.success) == ["alice", "bob"]
    assert sorted(e.user for e in created if not e.success) == ["bob", "mallory", "nobody"]
    assert store.revision() == revision  # issuing is not a state change to re-check for


def test_a_failed_commit_hands_out_nothing_of_the_batch(tmp_path):
    """A full disk under a batch: every caller gets the error, nothing is recorded."""
    with tmpfs(tmp_path / "tiny", "400k") as mount:
        cluster = init_cluster(mount / "state", "full")
        cluster.store.add_user(User("alice", ("access",), ("root",)))
        before = len(cluster.store.list_certs())
        filler = fill(mount)
        handed_out = 0
        with pytest.raises(StorageUnavailable):
            for _ in range(200):  # the WAL may take a few batches before it is full
                results = cluster.ca.sign_users([UserCertRequest("alice", key())] * 50)
                handed_out += sum(isinstance(r, Issued) for r in results)
        assert len(cluster.store.list_certs()) - before == handed_out
        cluster.close()
        filler.unlink()
        reopened = Cluster.open(mount / "state")
        assert reopened.store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert len(reopened.store.list_certs()) - before == handed_out
        reopened.close()


def test_concurrent_callers_share_commits_and_get_only_committed_certificates(cluster):
    """200 requests at once from the event loop: all answered, fewer commits than
    certificates, and each certificate is already visible to another connection (so
    on disk) when its caller receives it. A locked user in the crowd is refused alone."""
    cluster.store.add_lock(Lock("", "user", "mallory", "", None, time.time(), "admin"))
    issuer = GroupCommitIssuer(cluster.ca)
    other = sqlite3.connect(cluster.store.path)
    seen_committed = []

    async def one(user: str) -> Issued | Exception:
        try:
            issued = await issuer.sign(UserCertRequest(user, key()))
        except AccessDenied as exc:
            return exc
        row = other.execute(
            "SELECT 1 FROM issued_certs WHERE serial = ?", (issued.record.serial,)
        ).fetchone()
        seen_committed.append(row is not None)
        return issued

    async def crowd():
        users = ["alice", "bob"] * 100
        users[57] = "mallory"
        return await asyncio.gather(*(one(u) for u in users))

    try:
        results = asyncio.run(crowd())
    finally:
        issuer.close()
        other.close()
    refused = [r for r in results if isinstance(r, AccessDenied)]
    issued = [r for r in results if isinstance(r, Issued)]
    assert len(refused) == 1 and "mallory" in refused[0].message
    assert len(issued) == 199 and all(seen_committed)
    assert len({i.record.serial for i in issued}) == 199
    assert issuer.batches < 199  # requests were grouped
    assert len(cluster.store.list_certs()) == 199


def test_a_closed_issuer_answers_what_was_queued_and_restarts(cluster):
    issuer = GroupCommitIssuer(cluster.ca)

    async def two():
        return await asyncio.gather(
            issuer.sign(UserCertRequest("alice", key())),
            issuer.sign(UserCertRequest("bob", key())),
        )

    assert all(isinstance(r, Issued) for r in asyncio.run(two()))
    issuer.close()
    issuer.close()  # twice is harmless
    assert all(isinstance(r, Issued) for r in asyncio.run(two()))  # starts again on use
    issuer.close()


def _waiting_for_the_write_lock(thread: threading.Thread | None) -> bool:
    """The issuer's thread is inside ``Store.transaction``, where it only waits for the
    write lock (``BEGIN IMMEDIATE``) while another connection holds it."""
    frame = sys._current_frames().get(thread.ident) if thread is not None else None
    while frame is not None:
        if frame.f_code.co_name == "transaction" and frame.f_globals is vars(storage_connection):
            return True
        frame = frame.f_back
    return False


def test_the_event_loop_reads_while_a_batch_waits_for_the_write_lock(cluster):
    """The issuer signs on its own database connection: while its batch waits for (or
    holds) the write lock, reads on the bastion's connection, such as the 0.2 s
    revision poll, go on. Another process holds the write lock here; the loop reads,
    then lets go, and the waiting request completes."""
    blocker = sqlite3.connect(cluster.store.path, isolation_level=None)
    issuer = GroupCommitIssuer(cluster.ca)

    async def scenario():
        blocker.execute("BEGIN IMMEDIATE")
        pending = asyncio.ensure_future(issuer.sign(UserCertRequest("alice", key())))
        deadline = time.monotonic() + 20
        while not _waiting_for_the_write_lock(issuer._thread):
            assert time.monotonic() < deadline, "the issuer never asked for the write lock"
            assert not pending.done(), pending
            await asyncio.sleep(0.01)
        revision = cluster.store.revision()  # the bastion's own connection
        user = cluster.store.find_user("alice")
        assert not pending.done()
        blocker.execute("ROLLBACK")
        return revision, user, await pending

    try:
        revision, user, issued = asyncio.run(scenario())
    finally:
        issuer.close()
        blocker.close()
    assert user is not None and isinstance(issued, Issued)
    assert issuer._own is None  # closed with the issuer
    assert cluster.store.find_cert(issued.record.serial) is not None


def test_the_issuer_follows_a_user_ca_rotation(cluster, tmp_path):
    """The issuer signs on its own connection with its own CA object: after `dtadmin
    ca rotate` (another process) it refuses until the bastion has loaded the new CA,
    then signs with that one, never with the retired key."""
    from bastion.ca.keys import fingerprint
    from bastion.cluster import Cluster
    from bastion.protocol.errors import StateError

    issuer = GroupCommitIssuer(cluster.ca)

    async def one():
        return await issuer.sign(UserCertRequest("alice", key()))

    try:
        before = asyncio.run(one())
        admin = Cluster.open(cluster.state_dir)  # the admin's process
        try:
            admin.rotate_user_ca(actor="test")
        finally:
            admin.close()
        with pytest.raises(StateError, match="rotated"):
            asyncio.run(one())
        assert cluster.refresh_user_ca()  # what the bastion does on the revision change
        after = asyncio.run(one())
    finally:
        issuer.close()
    new_ca = fingerprint(cluster.ca.user_ca.public_key())
    assert fingerprint(after.certificate.signature_key()) == new_ca
    assert fingerprint(before.certificate.signature_key()) != new_ca
