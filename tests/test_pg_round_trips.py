"""How many statements (each a round trip to the server) one certificate issuance
costs on PostgreSQL: an upper bound, so the count cannot silently grow back.

On SQLite a statement is a function call; on PostgreSQL it is a network round trip
under the cluster-wide write lock, and issuance per second is bounded by how many a
batch sends. Counted on the client: every statement psycopg sends from this thread.
"""

from __future__ import annotations

import threading

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz.records import User
from bastion.ca.authority import UserCertRequest
from bastion.cluster import init_cluster
from tests.postgres import available, fresh_database

pytestmark = pytest.mark.skipif(not available(), reason="PostgreSQL is not installed")

# One request: BEGIN with the write lock, the user CA setting, the request's savepoint,
# the trust settings, user, role and lock reads, the certificate, the audit tail and
# row, RELEASE, COMMIT. It was 16 before these were cut.
ONE = 12
# Each further request in the batch: the same less BEGIN/COMMIT and the CA check, and
# the audit tail (kept from the row before).
EACH_MORE = 8


@pytest.fixture
def cluster(tmp_path, pg_server):
    c = init_cluster(tmp_path / "state", "rtt", database=fresh_database(pg_server))
    c.store.add_user(User("alice", ("access",), ("root",)))
    yield c
    c.close()


@pytest.fixture
def sent(monkeypatch):
    """The statements psycopg sends from this thread while the test runs."""
    statements: list[str] = []
    me = threading.get_ident()
    execute = psycopg.Cursor.execute

    def counting(self, query, params=None, **kwargs):
        if threading.get_ident() == me:
            statements.append(str(query))
        return execute(self, query, params, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", counting)
    return statements


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
