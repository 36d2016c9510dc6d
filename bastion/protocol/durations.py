"""Durations as people type them: 90s, 30m, 1h, 12h, 2d, 52w, or 1h30m."""

from __future__ import annotations

import re

from bastion.protocol.errors import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d{1,6})([smhdw])")


def parse_duration(text: str) -> int:
    """Seconds in ``text``; a clear error for anything else (no bare numbers, no negatives)."""
    value = text.strip().lower()
    parts = _PART.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise UsageError(
            f"invalid duration {text!r}: use a number with a unit, e.g. 90s, 30m, 1h, 2d, 1h30m"
        )
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise UsageError(f"invalid duration {text!r}: must be longer than zero")
    return seconds


def format_duration(seconds: int) -> str:
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out) or "0s"
