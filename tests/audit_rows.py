"""Waiting, bounded, for the bastion's audit rows.

A key refused at the query stage is audited as its connection ends (a connection that
goes on to log in leaves no refusal behind), so the row lands just after the client
exits, not before it hears the refusal. Tests poll for it instead of reading at once.
"""

from __future__ import annotations

import time
from typing import Any


def messages_once(
    store: Any, kind: str, text: str, *, after: int = 0, bound: float = 5.0
) -> list[str]:
    """The messages of ``kind`` rows past the first ``after``, once one of them has
    ``text`` (or after ``bound`` seconds)."""
    deadline = time.monotonic() + bound
    while True:
        messages = [e.message for e in store.list_audit(type=kind)][after:]
        if any(text in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.05)
