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
from bastion.storage import StateStore

app = new_app("Cluster-wide settings.")

DEFAULT_PORT = 3022


def check_public_addr(value: str) -> str:
    """HOST or HOST:PORT ([IPv6]:PORT) that users' dtclient reaches the bastion at."""
    from bastion.admin.nodes import parse_addr

    explicit = (
        value.startswith("[")
        and "]:" in value
        or (not value.startswith("[") and value.count(":") == 1)
    )
    host, port = parse_addr(value)
    port = port if explicit else DEFAULT_PORT
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def public_addr(store: StateStore) -> str | None:
    """The address users reach the bastion at (``dtadmin cluster set public-addr``)."""
    value = store.get_setting("public_addr")
    return value if isinstance(value, str) and value else None


# Each setting: its key in the store, and the check that parses the value typed.
SETTINGS: dict[str, tuple[str, Callable[[str], object]]] = {
    "device-trust-mode": ("device_trust_mode", check_trust_mode),
    "auto-enroll": ("auto_enroll", lambda v: {"on": True, "off": False}[v]),
    "public-addr": ("public_addr", check_public_addr),
}


@app.command("set")
def set_(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="device-trust-mode, auto-enroll or public-addr.")],
    value: Annotated[
        str,
        typer.Argument(
            help="off|optional|required-for-humans|required; on|off; "
            "or HOST[:PORT] users reach the bastion at."
        ),
    ],
    state: StateOpt = None,
) -> None:
    """Change a setting.

    Examples: dtadmin cluster set device-trust-mode required;
    dtadmin cluster set public-addr bastion.example.com:3022 (printed in signup commands)

    required-for-humans: people need a trusted device, bot users (dtadmin bots) do not.
    """
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
        "cluster.update",
        message=f"{name} set to {value}",
        actor=actor(),
        setting=name,
        value=value,
    ):
        store.set_setting(key, parsed)
    console.say(f"{name} is now {parsed if isinstance(parsed, str) else value}")


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
        "public_addr": public_addr(store),
        "schema_version": store.schema_version(),
        "revision": store.revision(),
    }
    if fmt is Format.json:
        console.print_json(data)
    else:
        console.print_table(["Setting", "Value"], sorted(data.items()))
