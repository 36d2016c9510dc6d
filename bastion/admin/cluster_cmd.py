"""dtadmin cluster: cluster-wide settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from bastion.admin.common import StateOpt, actor, audited, new_app, open_cluster
from bastion.authz.rbac import check_trust_mode
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.errors import UsageError

app = new_app("Cluster-wide settings.")

# Each setting: its key in the store, and the check that parses the value typed.
SETTINGS: dict[str, tuple[str, Callable[[str], object]]] = {
    "device-trust-mode": ("device_trust_mode", check_trust_mode),
    "auto-enroll": ("auto_enroll", lambda v: {"on": True, "off": False}[v]),
}


@app.command("set")
def set_(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="device-trust-mode or auto-enroll.")],
    value: Annotated[str, typer.Argument(help="off|optional|required, or on|off.")],
    state: StateOpt = None,
) -> None:
    """Change a setting. Example: dtadmin cluster set device-trust-mode required"""
    if name not in SETTINGS:
        raise UsageError(f"unknown setting {name!r}: use one of {', '.join(SETTINGS)}")
    key, check = SETTINGS[name]
    try:
        parsed = check(value)
    except KeyError:
        raise UsageError(f"invalid value {value!r} for {name}: use on or off") from None
    store = open_cluster(ctx, state).store
    with audited(
        store,
        "cluster.setting",
        message=f"{name} set to {value}",
        actor=actor(),
        setting=name,
        value=value,
    ):
        store.set_setting(key, parsed)
    console.say(f"{name} is now {value}")


@app.command("show")
def show(
    ctx: typer.Context,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """Show the cluster's name, CAs and settings."""
    cluster = open_cluster(ctx, state)
    store = cluster.store
    data = {
        "cluster": cluster.name,
        "state": str(cluster.state_dir),
        "user_ca": cluster.ca.user_ca_fingerprint,
        "host_ca": cluster.ca.host_ca_fingerprint,
        "device_trust_mode": store.get_setting("device_trust_mode"),
        "auto_enroll": bool(store.get_setting("auto_enroll", False)),
        "schema_version": store.schema_version(),
        "revision": store.revision(),
    }
    if fmt is Format.json:
        console.print_json(data)
    else:
        console.print_table(["Setting", "Value"], sorted(data.items()))
