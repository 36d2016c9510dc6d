"""dtadmin sessions: the forwarded sessions every bastion on this state holds now.

Read from ``live_sessions``, which each bastion keeps beside its audit events. A row
whose bastion is no longer running is shown as ``orphaned``: the process was killed
before it could end the session, and the next bastion to start (or a running sibling,
within its ``session_sweep_interval``) ends it in the audit log.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from bastion.admin.common import StateOpt, new_app, open_cluster
from bastion.protocol import console
from bastion.protocol.console import Format

app = new_app("List the forwarded sessions open through the bastions right now.")


@app.command("ls")
def ls(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option("--user", help="Only this user's.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """List open sessions, oldest first. Example: dtadmin sessions ls --user alice

    To end a user's sessions, lock the user (dtadmin lock) or revoke the certificate
    (dtadmin cert revoke); the bastion cuts them within a second.
    """
    cluster = open_cluster(ctx, state)
    sessions = [s for s in cluster.store.list_open_sessions() if user is None or s.user == user]
    alive = {name: cluster.store.instance_alive(name) for name in {s.instance for s in sessions}}
    now = time.time()
    docs: list[dict[str, Any]] = [
        {
            "bastion": s.instance,
            "session_id": s.session_id,
            "user": s.user,
            "device": s.device,
            "node": s.node,
            "remote_addr": s.remote_addr,
            "serial": s.serial,
            "started": console.rfc3339(s.started),
            "state": "live" if alive[s.instance] else "orphaned",
        }
        for s in sessions
    ]
    console.emit(
        fmt,
        docs,
        ["Bastion", "ID", "User", "Device", "Node", "From", "Started", "For", "State"],
        [
            (
                d["bastion"],
                str(d["session_id"]),
                d["user"] or "",
                d["device"] or "",
                d["node"] or "",
                d["remote_addr"] or "",
                console.when(s.started),
                f"{int(now - s.started)} s",
                d["state"],
            )
            for d, s in zip(docs, sessions, strict=True)
        ],
        empty="(no open sessions)",
    )
