"""How much one address, connection or user may take: decided here, counted in the shells.

Floods are decided like access: the shells keep the counters and the clocks (how many
connections are open, how many certificates a user got in the last minute, how many
password checks wait) and these functions decide over the numbers they are given.
A refusal raises :class:`RateLimited` with a message that says what to do; nothing
here reads a clock, a socket or a database.

Why each limit exists (the attacks of issue 12):

* connection slots: silent sockets from ~100 addresses filled ``max_connections``
  and no real user got in. Connections still logging in have a cap of their own
  (per address and in all), and when it is full a newcomer takes the slot of the
  oldest login from the address holding the most, so pre-login sockets cannot keep
  an address that holds fewer out.
* channels: one authenticated connection opened 2,000 dt-api channels.
* issuance: pipelined requests got 1,000 certificates in a second.
* password checks: 60 unauthenticated password attempts queued for argon2 delayed a
  real login from 0.06 s to 3.6 s; past the bound an attempt is turned away at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from bastion.protocol.errors import RateLimited

BUSY_CHECKING_PASSWORDS = "the bastion is busy checking other logins; try again in a moment"
TOO_MANY_FAILURES = "too many failed logins from your address; wait a minute"
TOO_MANY_CONNECTIONS = "too many connections from your address"
FULL = "the bastion is at its connection limit; try again later"
ISSUANCE_WINDOW = 60.0  # seconds: max_certs_per_user_per_minute counts this far back


@dataclass(frozen=True, slots=True)
class SlotLimits:
    max_connections: int
    max_per_source: int
    max_unauthenticated: int
    max_unauthenticated_per_source: int

    @property
    def unauthenticated_cap(self) -> int:
        return min(self.max_unauthenticated, self.max_connections)


@dataclass(frozen=True, slots=True)
class Slots:
    """The connection slots in use when a new connection arrives."""

    total: int  # every connection held, logged in or not
    unauthenticated: int  # connections not (yet) logged in
    from_source: int  # every connection from the newcomer's address
    unauthenticated_from_source: int  # of those, the ones not logged in
    # The address holding the most pre-login slots (the oldest first among equals)
    # and how many it holds: where a newcomer takes a slot from when all are taken.
    busiest: str | None = None
    busiest_holds: int = 0


@dataclass(frozen=True, slots=True)
class Admission:
    """A new connection is admitted, possibly in place of the oldest pre-login
    connection from ``evict_from``."""

    evict_from: str | None = None


def admit_connection(
    slots: Slots, limits: SlotLimits, recent_failures: int, max_failures: int
) -> Admission:
    """May a new connection start logging in? Raises RateLimited with the reason."""
    if recent_failures >= max_failures:
        raise RateLimited(TOO_MANY_FAILURES)
    if slots.from_source >= limits.max_per_source:
        raise RateLimited(TOO_MANY_CONNECTIONS)
    if slots.unauthenticated_from_source >= limits.max_unauthenticated_per_source:
        raise RateLimited(
            "too many connections from your address are still logging in; "
            "finish or close them, then try again"
        )
    authenticated = slots.total - slots.unauthenticated
    room = min(limits.unauthenticated_cap, limits.max_connections - authenticated)
    if slots.unauthenticated < room:
        return Admission()
    # Full. Fair share: take a slot from the address holding more pre-login slots
    # than the newcomer's own; never from a logged-in connection.
    if (
        slots.busiest is not None
        and slots.unauthenticated > 0
        and slots.busiest_holds > slots.unauthenticated_from_source
    ):
        return Admission(evict_from=slots.busiest)
    raise RateLimited(FULL)


def check_channel_open(open_channels: int, cap: int) -> None:
    """One more channel (a dt-api session, a forwarded connection) on a connection
    that has ``open_channels`` open."""
    if open_channels >= cap:
        raise RateLimited(
            f"too many channels open on this connection (limit {cap}); "
            "close some, or open another connection"
        )


def check_issuance_rate(user: str, issued_last_minute: int, limit: int) -> None:
    """One more certificate for ``user``, who was issued ``issued_last_minute`` in the
    last ``ISSUANCE_WINDOW`` (cluster-wide, from the issued-certificate records)."""
    if issued_last_minute >= limit:
        raise RateLimited(
            f"{user} was issued {issued_last_minute} certificates in the last minute "
            f"(limit {limit}); try again in a minute"
        )


def check_password_queue(pending: int, cap: int) -> None:
    """One more password check while ``pending`` wait or run: beyond the bound the
    attempt is turned away at once, never queued behind the others."""
    if pending >= cap:
        raise RateLimited(BUSY_CHECKING_PASSWORDS)
