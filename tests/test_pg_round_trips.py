"""How many statements (each a round trip to the server) one certificate issuance
costs on PostgreSQL: an upper bound, so the count cannot silently grow back.

On SQLite a statement is a function call; on PostgreSQL it is a network round trip
under the cluster-wide write lock, and issuance per second is bounded by how many a
batch sends. Counted on the client: every statement psycopg sends from this thread.
"""

from __future__ import annotations

import contextlib
import threading

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz.records import AuditEvent, User
from bastion.ca.authority import UserCertRequest
from bastion.cluster import init_cluster
from bastion.protocol.errors import StateError
from bastion.storage import audit_chain
from bastion.storage.postgres import PostgresStore
from tests.postgres import available, fresh_database

pytestmark = pytest.mark.skipif(not available(), reason="PostgreSQL is not installed")

# One request: BEGIN with the write lock, the user CA setting, the request's savepoint,
# the trust settings, user, role and lock reads, the certificate, the audit tail and
# row, RELEASE, COMMIT. It was 16 before these were cut.
ONE = 10
# Each further request in the batch: the same less BEGIN/COMMIT and the CA check, and
# the audit tail (kept from the row before).
EACH_MORE = 6


@pytest.fixture
def cluster(tmp_path, pg_server):
    c = init_cluster(tmp_path / "state", "rtt", database=fresh_database(pg_server))
    c.store.add_user(User("alice", ("access",), ("root",)))
    yield c
    c.close()


@pytest.fixture
def sent(monkeypatch):
    """The round trips psycopg makes from this thread while the test runs, each as the
    statements it sent: one per execute, or one per pipeline however many it held."""
    trips: list[str] = []
    group: list[list[str]] = []  # the statements of the pipeline open now, if any
    me = threading.get_ident()
    execute, pipeline = psycopg.Cursor.execute, psycopg.Connection.pipeline

    def counting(self, query, params=None, **kwargs):
        if threading.get_ident() == me:
            (group[-1] if group else trips).append(str(query))
        return execute(self, query, params, **kwargs)

    @contextlib.contextmanager
    def counting_pipeline(self):
        group.append([])
        try:
            with pipeline(self) as p:
                yield p
        finally:
            statements = group.pop()
            if threading.get_ident() == me and statements:
                trips.append(" | ".join(statements))

    monkeypatch.setattr(psycopg.Cursor, "execute", counting)
    monkeypatch.setattr(psycopg.Connection, "pipeline", counting_pipeline)
    return trips


def _request() -> UserCertRequest:
    return UserCertRequest("alice", ed25519.Ed25519PrivateKey.generate().public_key())


def test_one_issuance_stays_within_its_round_trips(cluster, sent):
    cluster.ca.sign_users([_request()])  # the first: loads what a store loads once
    sent.clear()
    (issued,) = cluster.ca.sign_users([_request()])
    assert not isinstance(issued, Exception), issued
    assert len(sent) <= ONE, "\n".join(sent)
    # Still linked into the chain and recorded, under the lock from the first statement.
    assert "pg_advisory_xact_lock" in sent[0]
    assert cluster.store.find_cert(issued.record.serial) is not None


def test_a_batch_costs_less_per_request(cluster, sent):
    cluster.ca.sign_users([_request()])
    sent.clear()
    results = cluster.ca.sign_users([_request() for _ in range(10)])
    assert all(not isinstance(r, Exception) for r in results), results
    assert len(sent) <= ONE + 9 * EACH_MORE, "\n".join(sent)
    tails = [s for s in sent if "FROM audit ORDER BY id DESC" in s]
    assert len(tails) == 1, "the audit tail is read once per transaction"


def test_deferred_savepoints_fail_alone_and_the_chain_stays_linked(pg_url, tmp_path):
    """SAVEPOINT and RELEASE ride with the next statement and the audit tail is kept
    for the transaction: a part rolled back (nested, after a failed statement, or
    with nothing run in it) still takes out exactly its own rows, and the next row
    links to what is really there."""
    store = PostgresStore.open(pg_url, tmp_path)
    try:

        def note(text: str) -> None:
            store.append_audit(AuditEvent(0, 1.0, "DT0001I", "x", True, message=text))

        with store.transaction(bump=False):
            note("kept 1")
            with store.savepoint():  # nothing runs in it: never sent
                pass
            with pytest.raises(ValueError), store.savepoint():
                note("undone: the part failed")
                with store.savepoint():
                    note("undone: inside the failed part")
                raise ValueError
            with store.savepoint():
                note("kept 2")
                with pytest.raises(StateError), store.savepoint():
                    note("undone: before a failed statement")
                    store._all("SELECT no_such_column FROM audit")
                note("kept 3: the transaction is usable again")
            with pytest.raises(ValueError), store.savepoint():
                raise ValueError  # failed with nothing sent
            note("kept 4")
        rows = list(store.audit_chain_rows())
        assert [r["message"] for r in rows] == [
            "kept 1", "kept 2", "kept 3: the transaction is usable again", "kept 4"
        ]  # fmt: skip
        assert [r["id"] for r in rows] == [1, 2, 3, 4]
        report = audit_chain.verify(rows, [], None, None)
        assert not report.problems, report.problems
    finally:
        store.close()
