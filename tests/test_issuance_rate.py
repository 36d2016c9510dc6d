"""The per-user issuance rate, where it is decided: in the CA's signing transaction
(requests that came together are counted as they are signed), and in front of it on
a dt-api channel, which serves one request at a time however many are pipelined.

No sockets: a real cluster in a temp dir, dt-api over in-memory streams.
"""

from __future__ import annotations

import asyncio
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz.records import User
from bastion.ca.authority import Issued, UserCertRequest
from bastion.ca.keys import public_line
from bastion.cluster import init_cluster
from bastion.protocol import wire
from bastion.protocol.errors import RateLimited
from bastion.proxy.admission import RefusalDigest
from bastion.proxy.api import ApiIdentity, ApiSession
from bastion.proxy.workers import Workers


def test_requests_signed_together_are_counted_in_the_transaction(tmp_path):
    cluster = init_cluster(tmp_path / "state", "rate")
    try:
        cluster.store.add_user(User("alice", ("access",), ("root",)))
        key = ed25519.Ed25519PrivateKey.generate().public_key()
        results = cluster.ca.sign_users([UserCertRequest("alice", key, rate_limit=5)] * 8)
        assert sum(isinstance(r, Issued) for r in results) == 5
        refused = [r for r in results if isinstance(r, RateLimited)]
        assert len(refused) == 3 and "alice was issued 5 certificates" in refused[0].message
        rows = [e for e in cluster.store.list_audit(type="cert.create") if not e.success]
        assert len(rows) == 3 and all("limit 5" in e.message for e in rows)
        # An admin's own request (no rate_limit) is not the flood this bounds.
        assert isinstance(cluster.ca.sign(UserCertRequest("alice", key)), Issued)
    finally:
        cluster.close()


class _Writer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class _CountingIssuer:
    """Signs with the real CA, slowly, and notes how many requests were in at once."""

    def __init__(self, ca: Any) -> None:
        self.ca = ca
        self.in_flight = self.most = 0

    async def sign(self, request: UserCertRequest) -> Issued:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.02)
            return await asyncio.to_thread(self.ca.sign, request)
        finally:
            self.in_flight -= 1


def test_pipelined_requests_on_one_channel_are_served_one_at_a_time(tmp_path):
    cluster = init_cluster(tmp_path / "state", "rate")
    workers = Workers(cluster.store)
    try:
        cluster.store.add_user(User("bob", ("access",), ("root",)))
        pub = public_line(ed25519.Ed25519PrivateKey.generate().public_key())
        issuer, rows = _CountingIssuer(cluster.ca), []

        async def serve() -> list[Any]:
            reader = asyncio.StreamReader()
            reader.feed_data(wire.encode(wire.Hello(version=wire.PROTOCOL_VERSION, client="t")))
            for _ in range(10):  # all at once, before any answer
                reader.feed_data(wire.encode(wire.CertRequest(public_key=pub)))
            reader.feed_eof()
            writer = _Writer()
            session = ApiSession(
                cluster,
                ApiIdentity("bob", "certificate"),
                workers=workers,
                issuer=issuer,  # type: ignore[arg-type]
                max_certs_per_minute=4,
                digest=RefusalDigest(lambda event, **fields: rows.append(fields)),
            )
            await asyncio.wait_for(session.run(wire.LineReader(reader), writer), 60)
            return [wire.decode(line) for line in writer.data.splitlines()]

        answers = asyncio.run(serve())
        assert isinstance(answers[0], wire.Welcome) and len(answers) == 11
        issued = [a for a in answers[1:] if isinstance(a, wire.CertIssued)]
        refused = [a for a in answers[1:] if isinstance(a, wire.Error)]
        assert issuer.most == 1  # one in flight: the next is read only after an answer
        assert len(issued) == 4 and len(refused) == 6
        assert all(e.code == "rate_limited" for e in refused)
        assert len(rows) == 1  # the first refusal; the rest go into the minute's summary
    finally:
        workers.close()
        cluster.close()
