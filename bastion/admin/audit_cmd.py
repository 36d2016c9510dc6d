"""dtadmin audit: ls (and --follow), verify, export."""

from __future__ import annotations

import datetime
import functools
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion.admin import audit_export as export_
from bastion.admin.common import StateOpt, new_app, open_cluster
from bastion.audit import EVENT_NAMES, event_types
from bastion.ca import keys
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.durations import parse_duration
from bastion.protocol.errors import AuditTampered, UsageError
from bastion.storage import audit_chain

app = new_app(
    "Read, follow, verify and export the audit log: every allow and every deny, "
    "hash-chained and signed."
)

TypeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--type",
        metavar="<type>",
        help="Only these event types (repeat, or comma-separate): e.g. session.denied. "
        "See docs/audit.md for the list.",
        show_default=False,
    ),
]
UserOpt = Annotated[str | None, typer.Option("--user", help="Only this user's events.")]
SinceOpt = Annotated[
    str | None, typer.Option("--since", help="Only events since: 1h, 2d or an ISO time.")
]


def parse_since(value: str) -> float:
    try:
        return time.time() - parse_duration(value)
    except UsageError:
        pass
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"invalid --since {value!r}: use a duration (1h) or an ISO time") from None
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()
    return parsed.timestamp()


def parse_types(values: list[str] | None) -> tuple[str, ...] | None:
    """Event types asked for; an old name means its new one, an unknown one is refused
    (a typo would otherwise show nothing, as if nothing had happened)."""
    if not values:
        return None
    known, renamed = event_types()
    wanted: list[str] = []
    for value in values:
        for name in filter(None, (v.strip() for v in value.split(","))):
            if name not in known and name not in renamed:
                raise UsageError(
                    f"unknown event type {name!r}: use one of {', '.join(sorted(known))}"
                )
            wanted.extend(renamed.get(name, (name,)))
    return tuple(dict.fromkeys(wanted))


def _row(e: Any) -> tuple[Any, ...]:
    return (
        console.when(e.time),
        e.code,
        EVENT_NAMES.get(e.type, e.type) if e.success else f"{e.type} (denied)",
        e.user,
        e.device,
        e.remote_addr,
        e.message,
    )


COLUMNS = ["Time", "Code", "Event", "User", "Device", "Remote", "Message"]


@app.command("ls")
def ls(
    ctx: typer.Context,
    types: TypeOpt = None,
    user: UserOpt = None,
    since: SinceOpt = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=100000, help="Show at most the newest N.")
    ] = 200,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Keep printing new events as they land, from any bastion or dtadmin "
            "process, until Ctrl-C. With --format json: one JSON object per line.",
        ),
    ] = False,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """Show audit events, oldest first. Example: dtadmin audit ls --type session.denied --since 1h"""
    store = open_cluster(ctx, state).store
    wanted = parse_types(types)
    after = parse_since(since) if since else None
    with store.read_transaction():
        events = store.list_audit(type=wanted, user=user, since=after, limit=limit)
        newest = store.last_audit_id()
    if not follow:
        console.emit(
            fmt,
            [export_.event_json(e) for e in events],
            COLUMNS,
            [_row(e) for e in events],
            empty="(no events)",
        )
        return
    position = export_.Position(event=newest)
    with export_.interrupted_cleanly() as stop:
        _print_follow(fmt, events, header=True)
        for batch in export_.batches(
            store,
            position,
            types=wanted,
            user=user,
            since=after,
            checkpoints=False,
            follow=True,
            stop=stop,
        ):
            _print_follow(fmt, batch, header=False)


def _print_follow(fmt: Format, events: list[Any], *, header: bool) -> None:
    import sys

    if fmt is Format.json:
        export_.write_lines(sys.stdout, events)
        return
    if header:
        sys.stdout.write("\t".join(COLUMNS) + "\n")
    for e in events:
        sys.stdout.write("\t".join(" ".join(str(v or "").split()) for v in _row(e)) + "\n")
    sys.stdout.flush()


# -- verify -----------------------------------------------------------------------------


@app.command("verify")
def verify(
    ctx: typer.Context,
    checkpoint: Annotated[
        bool,
        typer.Option(
            "--checkpoint", help="When the log is intact, sign a checkpoint over its last row now."
        ),
    ] = False,
    checkpoint_out: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint-out",
            help="Write the newest valid checkpoint to this file (JSON), to keep off this "
            "host: a later verify --against it detects rows removed from the end.",
            show_default=False,
        ),
    ] = None,
    against: Annotated[
        list[Path] | None,
        typer.Option(
            "--against",
            metavar="<file>",
            help="A checkpoint kept elsewhere (from --checkpoint-out, or an export file's "
            "last checkpoint line): the log must still hold the row it signed.",
            show_default=False,
        ),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option(
            "--key",
            help="The audit public key to check signatures with (default: the "
            "cluster's ca/audit_key; give a copy kept elsewhere to trust that instead).",
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """Check every link of the audit chain and every checkpoint signature.

    Names the first row that was changed, removed or reordered and exits with status
    16 (audit_tampered). What it cannot see: rows after the newest checkpoint removed
    from the end, or rewritten with their hashes recomputed, unless a checkpoint kept
    elsewhere is given with --against.
    """
    cluster = open_cluster(ctx, state)
    store = cluster.store
    public = _public_key(key, cluster.state_dir)
    fingerprint = keys.fingerprint(public)
    with store.read_transaction():
        report = audit_chain.verify(
            store.audit_chain_rows(), store.list_audit_checkpoints(), public, fingerprint
        )
    if not report.rows:  # a cluster's log starts with cluster.init; it is never empty
        report.problems.append(
            audit_chain.Problem(1, "every row was removed: the audit log is empty", "removed")
        )
    elif not report.checkpoints:  # the first row of a cluster is signed as it is written
        report.problems.append(
            audit_chain.Problem(
                1,
                f"no checkpoint signs any of the {report.rows} rows: checkpoints were "
                "removed (the rows may have been rewritten with their hashes recomputed)",
                "removed",
            )
        )
    for kept_path in against or []:
        _check_kept(report, kept_path, store, public, fingerprint)
    report.problems.sort(key=lambda p: p.row)
    if report.ok and checkpoint and report.rows:
        store.checkpoint_audit()
        with store.read_transaction():
            report = audit_chain.verify(
                store.audit_chain_rows(), store.list_audit_checkpoints(), public, fingerprint
            )
    if report.ok and checkpoint_out is not None:
        _write_kept(checkpoint_out, store, report)
    _say_report(fmt, report, fingerprint)
    if not report.ok:
        first = report.problems[0]
        raise AuditTampered(f"the audit log was tampered with: {first.text}")


def _public_key(path: Path | None, state_dir: Path) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    if path is None:
        return keys.load_private_key(keys.ca_dir(state_dir) / keys.AUDIT_KEY).public_key()
    try:
        public = load_ssh_public_key(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise UsageError(f"{path} is not an OpenSSH public key (audit_key.pub)") from None
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise UsageError(f"{path} is not an Ed25519 public key")
    return public


def _check_kept(report: Any, path: Path, store: Any, public: Any, fingerprint: str) -> None:
    kept = _read_kept(path)
    cp = audit_chain.Checkpoint(
        int(kept.get("checkpoint", 0)),
        int(kept["row_id"]),
        str(kept["row_hash"]),
        float(kept["signed_at"]),
        str(kept["key"]),
        str(kept["signature"]),
    )
    problem = None
    if cp.key != fingerprint or not audit_chain.checkpoint_valid(
        public, cp.row_id, cp.row_hash, cp.time, cp.signature
    ):
        problem = ("forged", f"the checkpoint in {path} is not signed by the audit key")
    else:
        rows = store.list_audit(after_id=cp.row_id - 1, limit=1, oldest_first=True)
        if not rows or rows[0].id != cp.row_id:
            problem = (
                "removed",
                f"row {cp.row_id}, signed by the checkpoint kept in {path}, is missing: "
                f"rows were removed (the log now ends at row {report.last_id or 0})",
            )
        elif rows[0].hash != cp.row_hash:
            problem = (
                "changed",
                f"row {cp.row_id} is not the row the checkpoint kept in {path} signed: "
                "rows up to it were changed and the chain recomputed",
            )
        else:
            report.last_signed = max(report.last_signed or 0, cp.row_id)
    if problem:
        report.problems.append(audit_chain.Problem(cp.row_id, problem[1], problem[0]))


def _read_kept(path: Path) -> dict[str, Any]:
    """A checkpoint file, or the last checkpoint line of an export."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    found = None
    for line in text.splitlines() if not text.lstrip().startswith("{\n") else [text]:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("event") == export_.CHECKPOINT_EVENT:
            found = obj
    needed = {"row_id", "row_hash", "signed_at", "key", "signature"}
    if found is None or not needed <= set(found):
        raise UsageError(f"{path} holds no audit checkpoint")
    return found


def _write_kept(path: Path, store: Any, report: Any) -> None:
    good = [cp for cp in store.list_audit_checkpoints() if cp.row_id == report.last_signed]
    if not good:
        raise UsageError("no valid checkpoint to write yet: run with --checkpoint")
    data = json.dumps(export_.checkpoint_json(good[-1]), indent=2, sort_keys=True) + "\n"
    try:
        keys.atomic_write(path, data.encode(), 0o600)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def _say_report(fmt: Format, report: Any, fingerprint: str) -> None:
    tail = report.unsigned_tail
    if fmt is Format.json:
        console.print_json(
            {
                "ok": report.ok,
                "rows": report.rows,
                "first_row": report.first_id,
                "last_row": report.last_id,
                "last_hash": report.last_hash,
                "checkpoints": report.checkpoints,
                "last_signed_row": report.last_signed,
                "unsigned_rows": tail,
                "key": fingerprint,
                "problems": [
                    {"row": p.row, "kind": p.kind, "message": p.text} for p in report.problems
                ],
            }
        )
        return
    for p in report.problems:
        console.say(f"row {p.row}: {p.kind}: {p.text}")
    verdict = "intact" if report.ok else f"TAMPERED ({len(report.problems)} problem(s))"
    if not report.rows:
        console.say(f"audit log {verdict}: no rows")
        return
    console.say(
        f"audit log {verdict}: rows {report.first_id}-{report.last_id} ({report.rows}), "
        f"{report.checkpoints} checkpoint(s) signed by {fingerprint}"
    )
    if report.last_signed is None:
        console.note("no valid checkpoint covers any row yet: run with --checkpoint")
    elif tail:
        console.note(
            f"rows {report.last_signed + 1}-{report.last_id} are after the newest checkpoint "
            f"(row {report.last_signed}): removing them, or rewriting them with their hashes "
            "recomputed, cannot be detected from this database alone; keep checkpoints "
            "elsewhere (--checkpoint-out, or audit export) and verify --against them"
        )
    else:
        console.note(
            "every row is signed; rows removed from the end together with their "
            "checkpoints are detected only --against a checkpoint kept elsewhere"
        )


# -- export -----------------------------------------------------------------------------


@app.command("export")
def export(
    ctx: typer.Context,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Append to this file (created 0600); a rerun resumes after the last "
            "event already in it.",
            show_default=False,
        ),
    ] = None,
    syslog: Annotated[
        str | None,
        typer.Option(
            "--syslog",
            help="Send RFC 5424 messages to a unix datagram socket (PATH or unix:PATH, "
            "e.g. /dev/log) or udp:HOST:PORT.",
            show_default=False,
        ),
    ] = None,
    after_id: Annotated[
        int | None,
        typer.Option("--after-id", min=0, help="Start after this event id.", show_default=False),
    ] = None,
    types: TypeOpt = None,
    user: UserOpt = None,
    since: SinceOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep exporting new events until Ctrl-C.")
    ] = False,
    checkpoints: Annotated[
        bool,
        typer.Option(
            "--checkpoints/--no-checkpoints",
            help="Also export the signed checkpoints (lines with event audit.checkpoint).",
        ),
    ] = True,
    state: StateOpt = None,
) -> None:
    """Export the audit log as JSON lines (one event per line) for a SIEM.

    To stdout by default, or appended to a file (--output), or to syslog (--syslog).
    Examples: dtadmin audit export -o /var/log/dt-audit.jsonl --follow;
    dtadmin audit export --syslog /dev/log --since 1h
    """
    if output is not None and syslog is not None:
        raise UsageError("give --output or --syslog, not both")
    store = open_cluster(ctx, state).store
    wanted = parse_types(types)
    after = parse_since(since) if since else None
    position = export_.resume_point(output) if output is not None else export_.Position()
    if after_id is not None:
        position.event = after_id
    sink: Any
    if syslog is not None:
        sink = export_.Syslog(syslog)
        send = sink.send
    else:
        sink = export_.open_file(output) if output is not None else None
        stream = sink if sink is not None else export_.stdout()
        send = functools.partial(export_.write_lines, stream)
    try:
        with export_.interrupted_cleanly() as stop:
            for batch in export_.batches(
                store,
                position,
                types=wanted,
                user=user,
                since=after,
                checkpoints=checkpoints,
                follow=follow,
                stop=stop,
            ):
                send(batch)
    finally:
        if sink is not None:
            sink.close()
