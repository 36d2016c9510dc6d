"""One naming style for audit event types, kept by tools rather than by memory.

Every event type is ``noun.verb`` (one lowercase word each); every type a call site
writes is a known one (``bastion.audit.EVENT_CODES``); docs/audit.md documents each.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from bastion.audit import EVENT_CODES, LEGACY_NAMES, NAME_STYLE

ROOT = Path(__file__).resolve().parent.parent
LOOKS_LIKE_EVENT = re.compile(r"[a-z_]+(\.[a-z_]+)+")
FILE_NAME = re.compile(r".*\.(db|json|pub|toml|yaml|py|log|sock|lock|tmp|next|cfg)$")


def written_types() -> dict[str, list[str]]:
    """Event-type literals at every call that writes audit rows: any call whose name
    says audit or record (audit.record, audited, workers.audit_soon, audit_denied,
    _audit_once, ...), or a refusal digest's add."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "bastion").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if "audit" not in name and name not in {"record", "add_refusal"}:
                continue
            args = [*node.args, *(k.value for k in node.keywords if k.arg == "event")]
            args += [x for a in args if isinstance(a, ast.IfExp) for x in (a.body, a.orelse)]
            for arg in args:
                if (
                    isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and LOOKS_LIKE_EVENT.fullmatch(arg.value)
                    and not FILE_NAME.match(arg.value)
                ):
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.setdefault(arg.value, []).append(where)
    return found


def test_every_event_type_follows_the_one_style():
    odd = [t for t in EVENT_CODES if not re.fullmatch(NAME_STYLE, t)]
    assert not odd, f"event types not in noun.verb style: {odd}"


def test_every_type_written_is_a_known_one():
    written = written_types()
    assert len(written) >= 20  # the scan finds the call sites at all
    unknown = {t: w for t, w in written.items() if t not in EVENT_CODES}
    assert not unknown, f"add these to bastion.audit.EVENT_CODES and docs/audit.md: {unknown}"
    old = {t: w for t, w in written.items() if t in LEGACY_NAMES}
    assert not old, f"old event names still written: {old}"


def test_docs_list_every_event_type():
    doc = (ROOT / "docs" / "audit.md").read_text()
    listed = set(re.findall(r"^\| `([a-z]+\.[a-z]+)` \| DT\d{4} \|", doc, re.M))
    assert listed == set(EVENT_CODES), (
        f"docs/audit.md: missing {sorted(set(EVENT_CODES) - listed)}, "
        f"stale {sorted(listed - set(EVENT_CODES))}"
    )
    for old, new in LEGACY_NAMES.items():
        assert f"`{old}`" in doc, f"docs/audit.md should say what {old} became ({new})"
