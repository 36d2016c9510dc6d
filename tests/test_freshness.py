"""The blind-period decision (bastion.authz.freshness), over the times it is given."""

from __future__ import annotations

from bastion.authz.freshness import Freshness


def test_stale_then_cut_each_once_per_blind_period():
    f = Freshness(stale_after=10, grace=30, confirmed=100.0)
    assert [f.tick(t) for t in (105, 109.9)] == [None, None] and not f.stale
    assert f.tick(110) == "stale" and f.stale
    assert [f.tick(t) for t in (111, 139.9)] == [None, None]
    assert f.tick(140) == "cut"
    assert [f.tick(t) for t in (141, 500)] == [None, None]  # said once, not every turn


def test_a_read_that_answers_ends_the_period_and_says_how_long_it_lasted():
    f = Freshness(stale_after=10, grace=30, confirmed=100.0)
    f.tick(112)
    f.refused = 7
    assert f.confirm(asked=120, now=120.5) == 20
    assert not f.stale and f.refused == 0 and f.tick(121) is None
    assert f.tick(130) == "stale"  # a new period, told again


def test_a_read_asked_long_ago_that_answers_only_now_ends_nothing():
    f = Freshness(stale_after=10, grace=30, confirmed=100.0)
    f.tick(115)
    assert f.confirm(asked=101, now=116) is None  # current as of 101 only
    assert f.stale and f.confirmed == 101
    f.confirm(asked=90, now=117)
    assert f.confirmed == 101  # an older answer never moves it back


def test_a_confirmed_view_is_never_stale():
    f = Freshness(stale_after=10, grace=30, confirmed=0.0)
    for t in range(1, 100):
        assert f.confirm(asked=t - 0.2, now=float(t)) is None
        assert f.tick(float(t)) is None
