"""dtadmin lock: stop a user or a device now, optionally for a while."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from bastion import audit
from bastion.admin.common import StateOpt, actor, new_app, open_cluster
from bastion.authz.records import Lock
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.durations import parse_duration
from bastion.protocol.errors import NotFound, UsageError

app = new_app("Lock users or devices: new logins and live sessions are refused at once.")


@app.callback(invoke_without_command=True)
def lock(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option("--user", help="Lock this user.")] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="Lock this device (asset tag).")
    ] = None,
    message: Annotated[str, typer.Option("--message", help="Shown to the locked user.")] = "",
    ttl: Annotated[str | None, typer.Option("--ttl", help="Lift the lock after this long.")] = None,
    state: StateOpt = None,
) -> None:
    """Lock a user or a device. Example: dtadmin lock --user alice --message "left" --ttl 24h"""
    if ctx.invoked_subcommand is not None:
        return
    if user is not None and device is None:
        kind, target = "user", user
    elif device is not None and user is None:
        kind, target = "device", device
    else:
        raise UsageError("give exactly one of --user or --device")
    store = open_cluster(ctx, state).store
    if kind == "user":
        store.get_user(target)
    else:
        store.get_device(target)
    expires = time.time() + parse_duration(ttl) if ttl else None
    with store.transaction():
        record = store.add_lock(Lock("", kind, target, message, expires, created_by=actor()))
        audit.record(
            store,
            "lock.create",
            message=f"{kind} {target} locked: {message}",
            user=target if kind == "user" else None,
            device=target if kind == "device" else None,
            actor=actor(),
            lock=record.id,
        )
    console.say(f'{kind} "{target}" locked (lock id {record.id})')


@app.command("ls")
def ls(
    ctx: typer.Context,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """List locks in force."""
    locks = open_cluster(ctx, state).store.list_locks(now=time.time())
    console.emit(
        fmt,
        [
            {
                "id": lk.id,
                "kind": lk.target_kind,
                "target": lk.target,
                "message": lk.message,
                "expires": console.rfc3339(lk.expires),
                "created": console.rfc3339(lk.created or None),
                "created_by": lk.created_by or None,
            }
            for lk in locks
        ],
        ["ID", "Kind", "Target", "Message", "Expires"],
        [
            (
                lk.id,
                lk.target_kind,
                lk.target,
                lk.message,
                console.when(lk.expires) if lk.expires else "never",
            )
            for lk in locks
        ],
        empty="(no locks)",
    )


@app.command("rm")
def rm(
    ctx: typer.Context,
    lock_id: Annotated[str, typer.Argument(help="Lock id from `dtadmin lock ls`.")],
    state: StateOpt = None,
) -> None:
    """Lift a lock."""
    store = open_cluster(ctx, state).store
    with store.transaction():
        lock = next((lk for lk in store.list_locks() if lk.id == lock_id), None)
        if lock is None:
            raise NotFound(f'lock "{lock_id}" not found')
        store.remove_lock(lock_id)
        # Named like the lock.create row, so `dtadmin audit ls --user X` shows both ends.
        audit.record(
            store,
            "lock.delete",
            message=f"lock {lock_id} removed ({lock.target_kind} {lock.target})",
            user=lock.target if lock.target_kind in ("user", "password") else None,
            device=lock.target if lock.target_kind == "device" else None,
            actor=actor(),
            lock=lock_id,
            kind=lock.target_kind,
        )
    console.say(f"lock {lock_id} removed")
