"""The flood limits as decisions (bastion.authz.limits) and their counters
(bastion.proxy.admission), with plain values: no sockets, no clock."""

from __future__ import annotations

import pytest

from bastion.authz import limits
from bastion.authz.limits import SlotLimits, Slots
from bastion.config import BastionConfig, load_config
from bastion.protocol.errors import RateLimited, UsageError
from bastion.proxy.admission import ConnectionSlots, RefusalDigest

LIMITS = SlotLimits(
    max_connections=10, max_per_source=5, max_unauthenticated=4, max_unauthenticated_per_source=3
)


def admit(slots: Slots, failures: int = 0) -> limits.Admission:
    return limits.admit_connection(slots, LIMITS, failures, 30)


def test_a_connection_is_admitted_while_pre_login_slots_are_free():
    assert admit(Slots(total=3, unauthenticated=3, from_source=0, unauthenticated_from_source=0))
    assert admit(Slots(9, 0, 0, 0)).evict_from is None  # 9 logged in: one slot left


@pytest.mark.parametrize(
    ("slots", "failures", "reason"),
    [
        (Slots(0, 0, 0, 0), 30, "too many failed logins"),
        (Slots(5, 0, 5, 0), 0, "too many connections from your address"),
        (Slots(3, 3, 3, 3), 0, "still logging in"),
        (Slots(10, 0, 0, 0), 0, "connection limit"),  # all logged in: nothing to take
    ],
)
def test_refusals_say_why(slots, failures, reason):
    with pytest.raises(RateLimited, match=reason):
        admit(slots, failures)


def test_when_full_a_newcomer_takes_a_slot_from_the_address_holding_more():
    full = Slots(4, 4, 0, 0, busiest="10.0.0.1", busiest_holds=2)
    assert admit(full).evict_from == "10.0.0.1"
    # ... never from an address holding no more than the newcomer's own
    with pytest.raises(RateLimited, match="connection limit"):
        admit(Slots(4, 4, 1, 1, busiest="10.0.0.1", busiest_holds=1))


def test_logged_in_connections_keep_their_reserve():
    """Pre-login sockets get at most max_unauthenticated of max_connections."""
    with pytest.raises(RateLimited):
        admit(Slots(4, 4, 2, 2, busiest="x", busiest_holds=2))
    assert admit(Slots(8, 2, 0, 0)).evict_from is None  # 6 logged in, 2 pre-login


def test_channels_issuance_and_password_checks_have_bounds():
    limits.check_channel_open(15, 16)
    with pytest.raises(RateLimited, match="too many channels open on this connection"):
        limits.check_channel_open(16, 16)
    limits.check_issuance_rate("alice", 19, 20)
    with pytest.raises(RateLimited, match="alice was issued 20 certificates"):
        limits.check_issuance_rate("alice", 20, 20)
    limits.check_password_queue(7, 8)
    with pytest.raises(RateLimited, match="busy checking other logins; try again in a moment"):
        limits.check_password_queue(8, 8)


def test_connection_slots_count_and_evict_the_oldest_of_the_busiest():
    slots = ConnectionSlots(LIMITS)
    owners = [object() for _ in range(6)]
    for owner, addr in zip(owners[:4], ("a", "a", "b", "c"), strict=True):
        assert slots.admit(owner, addr, 0, 30) is None
    assert slots.unauthenticated == 4
    assert slots.admit(owners[4], "d", 0, 30) is owners[0]  # "a" holds two: its oldest
    assert not slots.holds(owners[0]) and slots.per_source["a"] == 1
    slots.logged_in(owners[4])  # logged in: no longer pre-login, still counted
    assert slots.unauthenticated == 3 and slots.total == 4
    slots.release(owners[4])
    slots.release(owners[4])  # idempotent
    assert slots.total == 3 and "d" not in slots.per_source


def test_config_defaults_leave_logged_in_users_a_reserve():
    config = BastionConfig()
    assert 0 < config.unauthenticated_cap() < config.max_connections
    assert BastionConfig(max_connections=100, max_unauthenticated=10).unauthenticated_cap() == 10
    assert config.max_channels_per_connection > 0 and config.max_pending_password_checks > 0
    assert config.max_certs_per_user_per_minute > 0
    with pytest.raises(UsageError, match="max_channels_per_connection must be at least 1"):
        load_config(max_channels_per_connection=0)  # 0 would refuse every channel


def test_a_flood_of_refusals_becomes_two_rows_a_minute():
    rows: list[dict] = []
    digest = RefusalDigest(lambda event, **fields: rows.append({"event": event, **fields}))
    for i in range(600):
        digest.note(
            "keys", "10.0.0.9", 1000.0 + i * 0.01, message="unknown CA",
            summary="{n} more refused keys from 10.0.0.9 in the last minute",
            remote_addr="10.0.0.9",
        )  # fmt: skip
    digest.note("keys", "10.0.0.8", 1001.0, message="unknown CA", summary="{n} more")
    assert [r["message"] for r in rows] == ["unknown CA", "unknown CA"]
    digest.flush(1030.0)  # the minute is not over
    assert len(rows) == 2
    digest.flush(1061.0)
    assert rows[2]["message"] == "599 more refused keys from 10.0.0.9 in the last minute"
    assert rows[2]["remote_addr"] == "10.0.0.9" and rows[2]["event"] == "auth.failed"
    assert len(rows) == 3  # 10.0.0.8 had nothing more to say
    # A go of three (one connection's refused keys): its first is written, the other
    # two and a later go in the same minute are counted, and written at shutdown.
    digest.note("keys", "10.0.0.9", 1070.0, message="again", summary="{n} more", count=3)
    digest.note("keys", "10.0.0.9", 1071.0, message="-", summary="{n} more", count=4)
    digest.flush(1072.0, everything=True)
    assert [r["message"] for r in rows[3:]] == ["again", "6 more"]


def test_a_burst_of_refusals_is_written_in_full_before_the_count():
    rows: list[str] = []
    digest = RefusalDigest(lambda event, **fields: rows.append(fields["message"]))
    for i in range(25):
        digest.note("keys", "a", 100.0 + i, message=f"refusal {i}", summary="{n} more", burst=10)
    digest.flush(200.0)
    assert rows == [f"refusal {i}" for i in range(10)] + ["15 more"]
