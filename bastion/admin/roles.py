"""dtadmin roles: ls, create, rm."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bastion import resources
from bastion.admin.common import StateOpt, actor, audited, new_app, open_cluster
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.durations import format_duration
from bastion.protocol.errors import Conflict, UsageError

app = new_app("Manage roles: logins, node labels, permissions and device trust.")


@app.command("ls")
def ls(
    ctx: typer.Context,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """List roles."""
    roles = open_cluster(ctx, state).store.list_roles()
    console.emit(
        fmt,
        [resources.role_doc(r) for r in roles],
        ["Role", "Logins", "Node labels", "Device trust", "Max TTL", "Description"],
        [
            (
                r.name,
                ",".join(r.logins),
                ",".join(f"{k}={'|'.join(v)}" for k, v in r.node_labels.items()),
                r.device_trust_mode or "-",
                format_duration(r.max_session_ttl),
                r.description,
            )
            for r in roles
        ],
    )


@app.command("create")
def create(
    ctx: typer.Context,
    file: Annotated[Path, typer.Option("-f", "--file", help="Role YAML (kind: role).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing role.")] = False,
    state: StateOpt = None,
) -> None:
    """Create a role from YAML, like the seed's `tctl create -f role.yaml`.

    Example file:
      kind: role
      metadata: {name: prod-ops}
      spec:
        options: {max_session_ttl: 8h, device_trust_mode: required}
        allow: {logins: [root], node_labels: {env: prod}}
    """
    try:
        text = file.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror}") from None
    role = resources.role_from_doc(resources.load(text))
    store = open_cluster(ctx, state).store
    existing = store.find_role(role.name)
    if existing is not None and existing.preset:
        raise Conflict(f'role "{role.name}" is a preset role and cannot be replaced')
    with audited(
        store,
        "role.update" if existing else "role.create",
        message=f'role "{role.name}" saved',
        actor=actor(),
        role=role.name,
    ):
        store.put_role(role, create_only=not force)
    console.say(f'role "{role.name}" has been {"updated" if existing else "created"}')


@app.command("rm")
def rm(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The role to remove.")],
    state: StateOpt = None,
) -> None:
    """Remove a role no user holds (preset roles stay)."""
    store = open_cluster(ctx, state).store
    role = store.get_role(name)
    if role.preset:
        raise Conflict(f'role "{name}" is a preset role and cannot be removed')
    holders = [u.name for u in store.list_users() if name in u.roles]
    if holders:
        raise Conflict(
            f'role "{name}" is held by {", ".join(holders[:5])}; remove it from them first'
        )
    with audited(store, "role.delete", message=f'role "{name}" removed', actor=actor()):
        store.remove_role(name)
    console.say(f'role "{name}" has been deleted')
