"""Continuous attestation, the bastion's pure parts: who may attest for a device, what
a good answer is, and when a live session must be decided again.

The answers are real quotes of a software TPM (the bastion verifies marshalled bytes,
as it does for any TPM); the facts are hand-built records, as the core decides them.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from bastion.authz.facts import Facts
from bastion.authz.records import (
    POSTURE_PCRS,
    Device,
    DeviceCredential,
    DevicePosture,
    IssuedCert,
    Measurement,
    Node,
    PosturePolicy,
    Role,
    User,
)
from bastion.protocol import wire
from bastion.protocol.errors import (
    AccessDenied,
    AttestationError,
    DeviceNotTrusted,
    NonceMismatch,
)
from bastion.protocol.quote import attest_quote_data, login_quote_data
from bastion.proxy import attestation, policy, sessions
from bastion.proxy.sessions import LiveSession, Registry
from client.attest_agent import tpm_quote

NOW = 1_900_000_000.0
CONTINUOUS = PosturePolicy(attest_interval=2, attest_grace=3)


def facts(
    *,
    role_posture: PosturePolicy | None = CONTINUOUS,
    device_id: str | None = "dev-1",
    credential: str = "cred-1",
    ak: bytes = b"ak",
    measured: Measurement | None = None,
    user: str = "alice",
) -> Facts:
    device = Device(
        id="dev-1",
        asset_tag="LAPTOP-1",
        os_type="linux",
        enroll_status="enrolled",
        owner="alice",
        credential=DeviceCredential(credential, b"der", "tpm_ekcert", "ekhash", ak_public=ak),
    )
    return Facts(
        cluster_mode="optional",
        user=User(user, ("access",), ("root",)),
        roles=(Role("access", ("root",), posture=role_posture),),
        issued=IssuedCert(7, "alice", "alice", "user", ("root",), 0, 2**40, "fp", device_id),
        device=device,
        device_posture=DevicePosture("dev-1", measured=measured),
    )


# -- who may attest, and how ---------------------------------------------------------------


def test_the_plan_follows_the_strictest_continuous_policy():
    turn = attestation.plan(facts(), "alice", "LAPTOP-1", "cred-1", NOW)
    assert turn is not None
    assert (turn.device_id, turn.interval, turn.grace) == ("dev-1", 2, 3)
    assert set(POSTURE_PCRS) <= set(turn.pcrs) and turn.pcrs == tuple(sorted(turn.pcrs))
    assert turn.ak_public == b"ak"


def test_a_device_no_policy_asks_is_never_challenged():
    assert attestation.plan(facts(role_posture=None), "alice", "LAPTOP-1", "cred-1", NOW) is None
    checks_only = PosturePolicy(secure_boot=True)
    assert attestation.plan(facts(role_posture=checks_only), "alice", "LAPTOP-1", "cred-1", NOW) is None


def test_only_the_certificates_own_device_may_attest():
    with pytest.raises(AccessDenied, match="certificate with device extensions"):
        attestation.plan(facts(device_id=None), "alice", "LAPTOP-1", "cred-1", NOW)
    with pytest.raises(DeviceNotTrusted, match='not issued for device "OTHER"'):
        attestation.plan(facts(), "alice", "OTHER", "cred-1", NOW)
    with pytest.raises(DeviceNotTrusted, match='not issued for device "LAPTOP-1"'):
        attestation.plan(facts(device_id="dev-2"), "alice", "LAPTOP-1", "cred-1", NOW)
    with pytest.raises(DeviceNotTrusted):  # re-enrolled since: another credential
        attestation.plan(facts(), "alice", "LAPTOP-1", "cred-old", NOW)
    with pytest.raises(DeviceNotTrusted):  # another user's certificate naming the device
        attestation.plan(facts(user="bob"), "bob", "LAPTOP-1", "cred-1", NOW)


def test_answer_time_budgets_for_a_slow_tpm():
    assert attestation.answer_time(3) == 3.0
    assert attestation.answer_time(0) == attestation.MIN_ANSWER


def test_attest_quotes_are_never_login_quotes():
    nonce = bytes(32)
    assert attest_quote_data(nonce) != login_quote_data(nonce, b"")
    assert attest_quote_data(nonce) == attest_quote_data(bytes(32))
    assert len(attest_quote_data(nonce)) == 32


# -- what a good answer is (real quotes) -------------------------------------------------------


@pytest.fixture
def device(swtpm, tmp_path):
    """A software TPM's AK and the PCR values it would quote now."""
    from client.tpm import TPM

    ak_dir = tmp_path / "ak"
    with TPM.open(swtpm.tcti) as tpm:
        ak = tpm.load_or_create_ak(ak_dir)
    turn = attestation.plan(facts(ak=ak), "alice", "LAPTOP-1", "cred-1", NOW)
    assert turn is not None
    first = answer(swtpm.tcti, ak_dir, turn, b"n" * 32)
    measured = Measurement(pcrs=attestation.quoted_pcrs(first))
    turn = attestation.plan(facts(ak=ak, measured=measured), "alice", "LAPTOP-1", "cred-1", NOW)
    return type("Device", (), {"tcti": swtpm.tcti, "ak_dir": ak_dir, "turn": turn, "ak": ak})


def challenge(turn: attestation.Turn, nonce: bytes) -> wire.AttestChallenge:
    return wire.AttestChallenge(
        nonce=nonce, pcr_select=list(turn.pcrs), interval=turn.interval, grace=turn.grace
    )


def answer(tcti, ak_dir, turn, nonce) -> wire.AttestResponse:
    """What dtclient agent sends, through the wire and back."""
    sent = tpm_quote(tcti, ak_dir, challenge(turn, nonce))
    return wire.decode(wire.encode(sent))


def test_a_fresh_quote_over_the_nonce_with_unchanged_pcrs_is_good(device):
    nonce = b"\x01" * 32
    attestation.check_answer(device.turn, nonce, answer(device.tcti, device.ak_dir, device.turn, nonce))


def test_a_replayed_quote_is_refused(device):
    old = answer(device.tcti, device.ak_dir, device.turn, b"\x01" * 32)
    with pytest.raises(NonceMismatch):
        attestation.check_answer(device.turn, b"\x02" * 32, old)


def test_a_quote_of_other_pcrs_is_refused(device):
    nonce = b"\x03" * 32
    good = answer(device.tcti, device.ak_dir, device.turn, nonce)
    fewer = wire.AttestResponse(
        attest=good.attest,
        signature=good.signature,
        pcr_select=good.pcr_select[1:],
        pcr_values=good.pcr_values[1:],
    )
    with pytest.raises(AttestationError, match="not the .* asked for"):
        attestation.check_answer(device.turn, nonce, fewer)


def test_another_tpms_quote_is_refused(device, attacker_swtpm, tmp_path):
    from client.tpm import TPM

    with TPM.open(attacker_swtpm.tcti) as tpm:
        tpm.load_or_create_ak(tmp_path / "attacker-ak")
    nonce = b"\x04" * 32
    forged = answer(attacker_swtpm.tcti, tmp_path / "attacker-ak", device.turn, nonce)
    with pytest.raises(AttestationError):
        attestation.check_answer(device.turn, nonce, forged)


def test_an_extended_pcr_is_drift_during_the_session(device):
    subprocess.run(
        ["tpm2_pcrextend", "-T", device.tcti, "4:sha256=" + "ab" * 32],
        check=True,
        capture_output=True,
        timeout=30,
    )
    nonce = b"\x05" * 32
    with pytest.raises(DeviceNotTrusted, match=r"^PCR 4 changed during the session: boot loader"):
        attestation.check_answer(
            device.turn, nonce, answer(device.tcti, device.ak_dir, device.turn, nonce)
        )


def test_nothing_measured_at_login_is_nothing_to_compare_with(device):
    import dataclasses

    turn = dataclasses.replace(device.turn, measured=None)
    nonce = b"\x06" * 32
    with pytest.raises(DeviceNotTrusted, match="no measured boot"):
        attestation.check_answer(turn, nonce, answer(device.tcti, device.ak_dir, turn, nonce))


# -- when a live session is decided again -------------------------------------------------------


class _Store:
    """Only what the registry's deadline turn asks of a store: a read transaction."""

    def read_transaction(self):
        import contextlib

        return contextlib.nullcontext()


def test_sessions_past_their_deadline_are_decided_again_and_cut(monkeypatch):
    """The scheduling alone (the decision itself is decide's, tested there): a session
    whose cached deadline passed is decided again on the next turn, and one whose
    device attested since goes on with the deadline that decision returns."""
    import time

    from bastion.authz.decide import CertClaims

    asked: list[int] = []
    verdicts: dict[int, float | Exception] = {}

    def check_live_session(store, identity, node, now):
        asked.append(identity.serial)
        verdict = verdicts[identity.serial]
        if isinstance(verdict, Exception):
            raise verdict
        return verdict

    monkeypatch.setattr(policy, "check_live_session", check_live_session)
    closed: list[int] = []

    def session(serial: int, deadline: float | None) -> LiveSession:
        s = LiveSession(
            CertClaims("alice", serial, "k", device_id="dev-1", asset_tag="LAPTOP-1"),
            Node("node-1", "127.0.0.1", 22),
            None,
            close=lambda: closed.append(serial),
        )
        s.attest_deadline = deadline
        return s

    now = time.time()
    registry = Registry(_Store())  # type: ignore[arg-type]
    due, attested, later, none = (
        session(1, now - 1),
        session(2, now - 1),
        session(3, now + 60),
        session(4, None),
    )
    for s in (due, attested, later, none):
        registry.track(s)
    verdicts[1] = DeviceNotTrusted('device "LAPTOP-1" is no longer attested: PCR 4 changed')
    verdicts[2] = now + 5

    class Inline:
        async def read(self, fn, *args):
            return fn(registry.store, *args)

    asyncio.run(registry._check_deadlines(Inline()))  # type: ignore[arg-type]
    assert sorted(asked) == [1, 2]
    assert closed == [1] and due.terminated_reason is not None
    assert "no longer attested" in due.terminated_reason
    assert attested.attest_deadline == now + 5 and not attested.ended
    assert not later.ended and not none.ended
    assert sessions.audit_fields(due)["device"] == "LAPTOP-1"
