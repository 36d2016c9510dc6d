"""dtadmin audit ls."""

from __future__ import annotations

import datetime
import time
from typing import Annotated

import typer

from bastion.admin.common import StateOpt, new_app, open_cluster
from bastion.audit import EVENT_NAMES
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.durations import parse_duration
from bastion.protocol.errors import UsageError

app = new_app("Read the audit log: every allow and every deny.")


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


@app.command("ls")
def ls(
    ctx: typer.Context,
    type: Annotated[str | None, typer.Option("--type", help="e.g. session.denied")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Only this user's events.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="1h, 2d or an ISO time.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=100000)] = 200,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """Show audit events, oldest first. Example: dtadmin audit ls --type session.denied --since 1h"""
    events = open_cluster(ctx, state).store.list_audit(
        type=type, user=user, since=parse_since(since) if since else None, limit=limit
    )
    console.emit(
        fmt,
        [
            {
                "id": e.id,
                "time": datetime.datetime.fromtimestamp(e.time, datetime.UTC).isoformat(),
                "code": e.code,
                "event": e.type,
                "success": e.success,
                "user": e.user,
                "device": e.device,
                "addr.remote": e.remote_addr,
                "message": e.message,
                **e.fields,
            }
            for e in events
        ],
        ["Time", "Code", "Event", "User", "Device", "Remote", "Message"],
        [
            (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time)),
                e.code,
                EVENT_NAMES.get(e.type, e.type) if e.success else f"{e.type} (denied)",
                e.user,
                e.device,
                e.remote_addr,
                e.message,
            )
            for e in events
        ],
        empty="(no events)",
    )
