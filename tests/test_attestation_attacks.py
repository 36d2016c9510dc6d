"""Attacks on continuous attestation (issue 15 item 3): what the bastion's end of
``dtclient agent`` must hold against. Each test is one hole found; it fails on the code
it was written against."""

from __future__ import annotations

import asyncio
import socket
import time
from types import SimpleNamespace

from bastion.authz.records import PosturePolicy
from bastion.protocol import wire
from bastion.proxy import attestation
from tests.test_attestation import facts

INTERVAL, GRACE = 1, 2


class Lane:
    """The workers, as AgentConnection uses them: reads answered from ``facts``
    (a policy asking a quote every INTERVAL s, grace GRACE s), writes recorded with
    the time they land."""

    def __init__(self, read_delay: float) -> None:
        self.read_delay = read_delay
        self.goods: list[tuple[float, float]] = []  # (written at, until)
        self.store = SimpleNamespace(
            facts=lambda **kw: facts(
                role_posture=PosturePolicy(attest_interval=INTERVAL, attest_grace=GRACE)
            )
        )

    async def read(self, fn, *args):
        await asyncio.sleep(self.read_delay)  # a busy lane, a PostgreSQL round trip
        return fn(self.store, *args)

    async def write(self, fn, device_id, until):
        assert fn is attestation.record_good
        self.goods.append((time.time(), until))

    async def persist(self, fn, *args, **kw):
        pass

    def audit_soon(self, *args, **kw):
        pass


async def _agent_answering_slowly(read_delay: float) -> list[tuple[float, float]]:
    lane = Lane(read_delay)
    api = SimpleNamespace(
        workers=lane,
        identity=SimpleNamespace(user="alice", auth="certificate", serial=7, remote_addr="x"),
        recheck=None,
        terminate=None,
    )
    a, b = socket.socketpair()
    br, bw = await asyncio.open_connection(sock=a)
    cr, cw = await asyncio.open_connection(sock=b)
    conn = attestation.AgentConnection(
        api, wire.AttestBegin(asset_tag="LAPTOP-1", credential_id="cred-1")
    )
    bastion = asyncio.ensure_future(conn.run(br, bw))

    async def agent() -> None:
        for turn in range(3):
            msg = await wire.read_message(cr, 10)
            assert isinstance(msg, wire.AttestChallenge), msg
            # First answer quick, then ones a slow TPM gives: inside the budget the
            # bastion grants (answer_time(grace)), near its end.
            await asyncio.sleep(0.05 if turn == 0 else answer_budget - 0.3)
            await wire.write_message(
                cw,
                wire.AttestResponse(
                    attest=b"", signature=b"", pcr_select=msg.pcr_select, pcr_values=[]
                ),
            )
            result = await wire.read_message(cr, 10)
            assert result.status == "ok", result

    answer_budget = attestation.answer_time(GRACE)
    try:
        await asyncio.wait_for(agent(), 20)
    finally:
        bastion.cancel()
        cw.close()
        bw.close()
    return lane.goods


def test_an_agent_answering_within_its_budget_never_lets_the_deadline_lapse(monkeypatch):
    """An agent that answers every challenge within the time the bastion gives it must
    keep the device's attested_until in the future throughout: otherwise every
    bastion's deadline check cuts the device's live sessions ("its agent stopped
    answering") while the agent is still answering, and on time. The next challenge
    goes out only after the re-check and re-plan reads (a busy workers lane, a
    PostgreSQL round trip), but the deadline is counted from the previous answer:
    the reads' time comes out of the agent's grace."""
    monkeypatch.setattr(attestation, "check_answer", lambda turn, nonce, answer: None)
    goods = asyncio.run(_agent_answering_slowly(read_delay=0.5))
    assert len(goods) == 3
    for (_, until), (written, _) in zip(goods, goods[1:], strict=False):
        assert written < until, (
            f"good quote recorded {written - until:.2f} s after the deadline the previous "
            "one set: the device's sessions were cut meanwhile"
        )
