"""Fail closed when blind: how long a bastion may act on a view of the state it cannot
confirm is current.

Every decision a bastion makes (a new session, a login, a live session going on) is
made on what it last read. When the cluster database stops answering (a locked or
lost disk, a PostgreSQL failover, a partition) a lock or a revocation committed
elsewhere cannot reach it, so past ``stale_after`` seconds without a confirmed read
it refuses anything new, and ``grace`` seconds later it ends what is live. A read
that succeeds ends the blind period at once. The shells keep the clock
(``time.monotonic``) and do the refusing; this decides over the times given.
"""

from __future__ import annotations

from dataclasses import dataclass

BLIND = "the bastion cannot reach the cluster database; try again shortly"
BLIND_CUT = (
    "the bastion cannot reach the cluster database, so it cannot tell whether your "
    "access still stands; connect again shortly"
)


@dataclass
class Freshness:
    """When the state was last confirmed current, and what that means now.

    :meth:`tick` reports each step once per blind period: ``"stale"`` when new work
    must be refused, ``"cut"`` when live sessions must end; :meth:`confirm` returns
    how long the period lasted when a read ends one."""

    stale_after: float
    grace: float
    confirmed: float  # monotonic time of the last read that confirmed the state
    stale_since: float | None = None  # when this blind period was declared
    cut: bool = False  # its live sessions were ended
    refused: int = 0  # connections refused in this blind period

    @property
    def stale(self) -> bool:
        return self.stale_since is not None

    def tick(self, now: float) -> str | None:
        blind_for = now - self.confirmed
        if self.stale_since is None:
            if blind_for < self.stale_after:
                return None
            self.stale_since = now
            return "stale"
        if not self.cut and blind_for >= self.stale_after + self.grace:
            self.cut = True
            return "cut"
        return None

    def confirm(self, asked: float, now: float) -> float | None:
        """A read asked at ``asked`` answered by ``now``: the state was current then.
        Returns how long this bastion had been blind, if that ends a stale period (a
        read asked long ago that answers only now does not)."""
        previous, self.confirmed = self.confirmed, max(self.confirmed, asked)
        if self.stale_since is None or now - self.confirmed >= self.stale_after:
            return None
        self.stale_since, self.cut, self.refused = None, False, 0
        return self.confirmed - previous
