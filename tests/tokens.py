"""The token `dtadmin users add` / `device token` prints, for whoever plays the person
it is handed to (tests, bench, the demo)."""

from __future__ import annotations

import re

_TOKEN_LINE = re.compile(r"^\s+([A-Za-z0-9_-]{43})\s*$", re.MULTILINE)
_IN_COMMAND = re.compile(r"--token ([A-Za-z0-9_-]{43})\b")  # what older versions printed


def printed_token(output: str) -> str:
    """The token on a line of its own in dtadmin's output."""
    match = _TOKEN_LINE.search(output) or _IN_COMMAND.search(output)
    if match is None:
        raise ValueError(f"dtadmin printed no token:\n{output}")
    return match.group(1)
