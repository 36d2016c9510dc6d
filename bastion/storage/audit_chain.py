"""The audit log's hash chain and its signed checkpoints, as pure functions over rows.

Each audit row commits to the one before it::

    hash(row) = SHA-256(hash(previous row) || canonical(row))

with ``GENESIS`` (32 zero bytes) before the first row. ``canonical`` is a JSON array
of the row's columns exactly as stored (``fields`` is its stored JSON text, not a
re-encoding), so a verifier needs no knowledge of what the fields mean, and any
store (SQLite here, PostgreSQL later) that keeps the same columns computes the same
hashes. The row id is part of it: a row moved to another id no longer matches.

A checkpoint is an Ed25519 signature by the cluster's audit key (never a CA key) over
one row's id and hash, and so over every row up to it. Rows after the last
checkpoint are protected by the chain alone: whoever can write the database can
delete them, or rewrite them with hashes recomputed, without a trace here. A copy of
a checkpoint kept elsewhere (``dtadmin audit verify --checkpoint-out``, the export)
closes that gap up to the copy.

:func:`verify` walks rows and checkpoints and names what broke; it is written so a
caller can stream millions of rows through it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

GENESIS = bytes(32)
CHECKPOINT_DOMAIN = b"dt-bastion audit checkpoint v1\n"
COLUMNS = (
    "id",
    "time",
    "code",
    "type",
    "success",
    "message",
    "user",
    "device",
    "remote_addr",
    "fields",
)
_WINDOW = 8  # how far apart two swapped rows may be for verify to call it a reorder


def canonical(row: Mapping[str, Any]) -> bytes:
    """The bytes a row's hash covers: its stored columns, in a fixed order."""
    values: list[Any] = [row.get(c) for c in COLUMNS]
    values[0] = int(values[0])
    values[1] = float(values[1])
    values[4] = int(values[4])
    return json.dumps(values, ensure_ascii=True, separators=(",", ":")).encode()


def link(prev: bytes, row: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(prev + canonical(row)).digest()


def checkpoint_message(row_id: int, row_hash: str, made: float) -> bytes:
    """What a checkpoint's signature covers."""
    body = json.dumps([int(row_id), row_hash, float(made)], separators=(",", ":"))
    return CHECKPOINT_DOMAIN + body.encode()


def sign_checkpoint(key: ed25519.Ed25519PrivateKey, row_id: int, row_hash: str, made: float) -> str:
    return base64.b64encode(key.sign(checkpoint_message(row_id, row_hash, made))).decode()


def checkpoint_valid(
    public: ed25519.Ed25519PublicKey, row_id: int, row_hash: str, made: float, signature: str
) -> bool:
    try:
        public.verify(
            base64.b64decode(signature, validate=True),
            checkpoint_message(row_id, row_hash, made),
        )
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# -- verification ---------------------------------------------------------------------


@dataclass
class Problem:
    """One thing verify found wrong; ``row`` is the first row it concerns."""

    row: int
    text: str
    kind: str  # changed | removed | reordered | forged | unhashed
    origin: int | None = None  # for reordered: the id the row was written under


@dataclass
class Report:
    rows: int = 0
    first_id: int | None = None
    last_id: int | None = None
    last_hash: str | None = None
    checkpoints: int = 0
    last_signed: int | None = None  # the highest row a valid checkpoint covers
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsigned_tail(self) -> int:
        """Rows after the last valid checkpoint."""
        if self.last_id is None:
            return 0
        return self.rows if self.last_signed is None else self.last_id - self.last_signed


@dataclass(frozen=True)
class Checkpoint:
    id: int
    row_id: int
    row_hash: str
    time: float
    key: str  # the signing key's SHA256 fingerprint
    signature: str


def verify(
    rows: Iterable[Mapping[str, Any]],
    checkpoints: Iterable[Checkpoint],
    public: ed25519.Ed25519PublicKey | None,
    key_fingerprint: str | None,
    *,
    max_problems: int = 20,
) -> Report:
    """Check every link (rows in id order) and every checkpoint.

    A row whose stored hash does not follow from the stored hash before it is named,
    with the likeliest cause: a gap in the ids before it (rows removed), a hash that
    matches the row at another place (reordered), or else its content changed. Each
    row is checked against its predecessor's *stored* hash, so one edited row is one
    problem, not every row after it.
    """
    report = Report()
    signed = sorted(checkpoints, key=lambda cp: cp.id)
    wanted = {cp.row_id for cp in signed}
    stored: dict[int, str] = {}  # stored hashes of the rows checkpoints name
    recent: dict[int, str] = {}  # and of the last rows, to explain a broken link
    suspects: list[dict[str, Any]] = []  # rows whose link broke, explained a window later
    prev_hash, prev_id = GENESIS, None

    def problem(row: int, kind: str, text: str, origin: int | None = None) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(Problem(row, text, kind, origin))

    def explain_due(upto: float) -> None:
        while suspects and suspects[0]["id"] + _WINDOW <= upto:
            _explain(problem, suspects.pop(0), recent)

    for row in _rows(rows):
        report.rows += 1
        rid = row["id"]
        report.first_id = rid if report.first_id is None else report.first_id
        report.last_id, report.last_hash = rid, row.get("hash")
        have = row.get("hash")
        if have is None:
            problem(rid, "unhashed", f"row {rid} has no hash: it was inserted outside dt-bastion")
        elif have != link(prev_hash, row).hex():
            if prev_id is not None and prev_id < rid - 1 or prev_id is None and rid > 1:
                first = 1 if prev_id is None else prev_id + 1
                gone = f"row {first}" if first == rid - 1 else f"rows {first}-{rid - 1}"
                problem(
                    first,
                    "removed",
                    f"{gone} removed: row {rid} no longer links to the row before it",
                )
            elif len(suspects) + len(report.problems) < max_problems:
                suspects.append(row)
        if rid in wanted:
            stored[rid] = have or ""
        recent[rid] = have or ""
        for old in [i for i in recent if i < rid - 2 * _WINDOW]:
            del recent[old]
        explain_due(rid)
        if have is not None:
            prev_hash = bytes.fromhex(have) if _is_hex(have) else b""
        prev_id = rid
    explain_due(float("inf"))
    _renumbered(report)
    _check_checkpoints(report, signed, stored, public, key_fingerprint, problem)
    report.problems.sort(key=lambda p: p.row)
    return report


def _renumbered(report: Report) -> None:
    """A row deleted and every row after it moved down one id reads as one changed
    row and then rows each one place off: say what happened."""
    probs = report.problems
    for i, p in enumerate(probs):
        after = probs[i + 1 : i + 4]
        if (
            p.kind == "changed"
            and len(after) >= 2
            and all(
                q.kind == "reordered" and q.row == p.row + k + 1 and q.origin == q.row + 1
                for k, q in enumerate(after)
            )
        ):
            probs[i] = Problem(
                p.row,
                f"row {p.row} removed, and the rows after it renumbered to close the gap",
                "removed",
            )
            return


def _rows(rows: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    for row in rows:
        yield dict(row)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _explain(problem: Any, row: dict[str, Any], stored: dict[int, str]) -> None:
    """Why a row's link broke: it was moved here from another id (reordered), or it
    is intact and only the row before it was moved (not a problem of its own), or
    its content changed."""
    rid, have = row["id"], row.get("hash")
    nearby = [rid + d for d in range(-_WINDOW, _WINDOW + 1)]
    prevs = [bytes.fromhex(stored[i]) for i in nearby if _is_hex(stored.get(i, "x"))]
    if rid - _WINDOW <= 1:
        prevs.append(GENESIS)
    for original in nearby:
        if original == rid or original < 1:
            continue
        moved = {**row, "id": original}
        if any(link(p, moved).hex() == have for p in prevs):
            problem(
                rid,
                "reordered",
                f"row {rid} holds the event written as row {original}: rows were reordered",
                original,
            )
            return
    if any(link(p, row).hex() == have for p in prevs):
        return  # intact: the row before it is the one out of place, named on its own
    problem(
        rid,
        "changed",
        f"row {rid} was changed: its content does not match its hash "
        f"(or row {rid - 1} was changed and its hash recomputed)",
    )


def _check_checkpoints(
    report: Report,
    signed: list[Checkpoint],
    stored: dict[int, str],
    public: ed25519.Ed25519PublicKey | None,
    key_fingerprint: str | None,
    problem: Any,
) -> None:
    good = 0  # the row of the last checkpoint that held
    for cp in signed:
        row_id = cp.row_id
        report.checkpoints += 1
        if public is None:
            continue
        if cp.key != key_fingerprint:
            problem(
                row_id,
                "forged",
                f"checkpoint {cp.id} (row {row_id}) is signed by key {cp.key}, "
                f"not the cluster's audit key {key_fingerprint}: forged",
            )
            continue
        if not checkpoint_valid(public, cp.row_id, cp.row_hash, cp.time, cp.signature):
            problem(
                row_id,
                "forged",
                f"checkpoint {cp.id} (row {row_id}) has a bad signature: forged or altered",
            )
            continue
        if row_id not in stored:
            problem(
                row_id,
                "removed",
                f"row {row_id}, signed by checkpoint {cp.id}, is missing: removed",
            )
            continue
        if stored[row_id] != cp.row_hash:
            problem(
                good + 1,
                "changed",
                f"row {row_id} is not the row checkpoint {cp.id} signed: a row from "
                f"{good + 1} to {row_id} was changed, removed or reordered, and the hashes "
                "after it recomputed",
            )
            continue
        good = max(good, row_id)
        report.last_signed = good
