"""``dtadmin``: the admin CLI, run on the bastion host against the cluster state.

One module per noun, joined here. Every change records an audit event; every
failure ends as one line and an exit code (bastion.protocol.console.run_cli).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bastion.admin import (
    audit_cmd,
    bots,
    ca,
    certs,
    cluster_cmd,
    devices,
    eventlog_cmd,
    host_key_cmd,
    locks,
    nodes,
    posture_cmd,
    resources_cmd,
    roles,
    sessions,
    tokens,
    users,
)
from bastion.protocol import console

app = console.cli_app(
    help="Administer a dt-bastion cluster: users, roles, nodes, devices, tokens, locks, audit."
)


@app.callback()
def _root(
    ctx: typer.Context,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state", help="Cluster state directory (default: $DT_STATE or /var/lib/dt-bastion)."
        ),
    ] = None,
    database: Annotated[
        str | None,
        typer.Option(
            "--database",
            metavar="URL",
            help="PostgreSQL cluster database, postgresql://... with no password in it "
            "(default: $DT_DATABASE, else SQLite in the state directory).",
            show_default=False,
        ),
    ] = None,
) -> None:
    ctx.obj = {"state": str(state) if state else None, "database": database}


app.command("init")(ca.init)
app.command("get")(resources_cmd.get)
app.command("edit")(resources_cmd.edit)
# Every noun answers to its singular and its plural; --help shows the plural.
NOUNS = (
    ("users", "user", users.app),
    ("bots", "bot", bots.app),
    ("roles", "role", roles.app),
    ("nodes", "node", nodes.app),
    ("devices", "device", devices.app),
    ("locks", "lock", locks.app),
    ("tokens", "token", tokens.app),
    ("certs", "cert", certs.app),
    ("sessions", "session", sessions.app),
)
for plural, singular, noun_app in NOUNS:
    app.add_typer(noun_app, name=plural)
    app.add_typer(noun_app, name=singular, hidden=True)
# Also at the top, where the issue and a Teleport admin look for it.
app.add_typer(devices.roots_app, name="trust-root")
app.add_typer(ca.ca_app, name="ca")
ca.ca_app.command("host-key")(host_key_cmd.host_key)
app.add_typer(ca.auth_app, name="auth")
app.add_typer(ca.host_app, name="host")
app.add_typer(audit_cmd.app, name="audit")
app.add_typer(cluster_cmd.app, name="cluster")
app.add_typer(eventlog_cmd.app, name="eventlog")
app.add_typer(posture_cmd.app, name="posture")


def main() -> None:
    console.run_cli(app, "dtadmin")
