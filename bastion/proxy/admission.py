"""The counters behind the flood limits: connection slots, and refusals summarised.

The decisions are :mod:`bastion.authz.limits`; this module only counts, on the event
loop, with no storage of its own.

* :class:`ConnectionSlots`: every connection, and those still logging in per address
  in the order they came, so a full bastion can hand the oldest pre-login slot of the
  address holding the most to a newcomer (``limits.admit_connection``).
* :class:`RefusalDigest`: a flood of refusals (600 refused keys wrote 603 fsync'd
  audit rows in 1.3 s) becomes one audit row per kind and key (an address, a user) and
  minute: the first refusal as it is, then one row with how many more there were when
  the minute rolls over (or the bastion stops).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from bastion.authz import limits
from bastion.authz.limits import Admission, SlotLimits, Slots

WINDOW = 60.0


class ConnectionSlots:
    """Who holds a connection slot; ``owner`` is any object, one per connection."""

    def __init__(self, slot_limits: SlotLimits) -> None:
        self.limits = slot_limits
        self.total = 0
        self.per_source: dict[str, int] = defaultdict(int)
        # address -> its connections still logging in, oldest first (dicts keep order)
        self.waiting: dict[str, dict[Hashable, None]] = {}
        self.unauthenticated = 0
        self._held: dict[Hashable, tuple[str, bool]] = {}  # owner -> (address, logged in)

    def admit(
        self, owner: Hashable, addr: str, recent_failures: int, max_failures: int
    ) -> Hashable | None:
        """Take a slot for a new connection, or raise RateLimited. Returns the owner
        whose pre-login slot was given to it (already released here: close it)."""
        busiest, holds = self._busiest()
        slots = Slots(
            total=self.total,
            unauthenticated=self.unauthenticated,
            from_source=self.per_source.get(addr, 0),
            unauthenticated_from_source=len(self.waiting.get(addr, ())),
            busiest=busiest,
            busiest_holds=holds,
        )
        admission: Admission = limits.admit_connection(
            slots, self.limits, recent_failures, max_failures
        )
        victim = None
        if admission.evict_from is not None:
            victim = next(iter(self.waiting[admission.evict_from]))
            self.release(victim)
        self.total += 1
        self.per_source[addr] += 1
        self.unauthenticated += 1
        self.waiting.setdefault(addr, {})[owner] = None
        self._held[owner] = (addr, False)
        return victim

    def logged_in(self, owner: Hashable) -> None:
        """The connection authenticated: its slot no longer counts as pre-login."""
        held = self._held.get(owner)
        if held is None or held[1]:
            return
        addr = held[0]
        self._unwait(owner, addr)
        self._held[owner] = (addr, True)

    def release(self, owner: Hashable) -> None:
        """The connection is gone (or was evicted); idempotent."""
        held = self._held.pop(owner, None)
        if held is None:
            return
        addr, logged_in = held
        if not logged_in:
            self._unwait(owner, addr)
        self.total -= 1
        self.per_source[addr] -= 1
        if self.per_source[addr] <= 0:
            del self.per_source[addr]

    def holds(self, owner: Hashable) -> bool:
        return owner in self._held

    def _unwait(self, owner: Hashable, addr: str) -> None:
        waiting = self.waiting.get(addr)
        if waiting is not None and owner in waiting:
            del waiting[owner]
            self.unauthenticated -= 1
            if not waiting:
                del self.waiting[addr]

    def _busiest(self) -> tuple[str | None, int]:
        """Only looked for when the pre-login slots are all taken."""
        authenticated = self.total - self.unauthenticated
        room = min(self.limits.unauthenticated_cap, self.limits.max_connections - authenticated)
        if self.unauthenticated < room or not self.waiting:
            return None, 0
        # The most slots; among equals the address whose oldest login came first
        # (insertion order of ``waiting`` follows each address's first connection).
        addr = max(self.waiting, key=lambda a: len(self.waiting[a]))
        return addr, len(self.waiting[addr])


@dataclass
class _Window:
    started: float
    summary: str  # "{n} more ... in the last minute" ({n}: how many)
    fields: dict[str, Any] = field(default_factory=dict)
    written: int = 0  # goes whose first refusal was written in full
    more: int = 0


class RefusalDigest:
    """At most two audit rows per (kind, key) and minute; see the module docstring.

    ``write(event_type, **fields)`` writes one audit row (fire and forget).
    """

    def __init__(self, write: Callable[..., None], max_keys: int = 10_000) -> None:
        self._write = write
        self.max_keys = max_keys
        self._windows: dict[tuple[str, str], _Window] = {}

    def note(
        self,
        kind: str,
        key: str,
        now: float,
        *,
        message: str,
        summary: str,
        count: int = 1,
        burst: int = 1,
        event: str = "auth.failed",
        **fields: Any,
    ) -> None:
        """``count`` refusals of ``kind`` for ``key`` at once (one go: a connection's
        refused keys). The first refusal of each of the first ``burst`` goes of a
        minute is written as ``message``; every other refusal is counted, and the count
        written once as ``summary`` with ``{n}`` replaced by it."""
        if count <= 0:
            return
        window = self._windows.get((kind, key))
        if window is not None and now - window.started >= WINDOW:
            self._flush(kind, key)
            window = None
        if window is None:
            if len(self._windows) >= self.max_keys:
                self.flush(now, everything=True)
            window = self._windows[(kind, key)] = _Window(
                now, summary, {"event": event, **fields}, written=0
            )
        if window.written >= burst:
            window.more += count
            return
        window.written += 1
        window.more += count - 1
        self._write(event, success=False, message=message, **fields)

    def flush(self, now: float, *, everything: bool = False) -> None:
        """Write the summaries of minutes that are over (all of them at shutdown)."""
        for kind, key in list(self._windows):
            if everything or now - self._windows[(kind, key)].started >= WINDOW:
                self._flush(kind, key)

    def _flush(self, kind: str, key: str) -> None:
        window = self._windows.pop((kind, key))
        if window.more:
            fields = dict(window.fields)
            event = fields.pop("event")
            self._write(
                event,
                success=False,
                message=window.summary.replace("{n}", str(window.more)),
                **fields,
            )
