"""Label filters as `tsh ls env=prod` takes them: ``KEY=VALUE`` words, all of which a node
must carry. `dtclient ls` uses them; in the contract so `dtadmin nodes ls` can too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bastion.protocol.errors import UsageError


def parse_filters(words: Sequence[str]) -> dict[str, str]:
    """``["env=prod", "role=db"]`` as a dict; a word without ``=`` or a key given twice
    with two values is refused (a node has one value per key, so it could match nothing)."""
    wanted: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UsageError(f"label filter {word!r} is not KEY=VALUE (e.g. env=prod)")
        if wanted.get(key, value) != value:
            raise UsageError(f"label {key} is filtered twice ({wanted[key]} and {value})")
        wanted[key] = value
    return wanted


def matches(node: Mapping[str, Any], wanted: Mapping[str, str]) -> bool:
    labels = node.get("labels") or {}
    return all(key in labels and str(labels[key]) == value for key, value in wanted.items())
