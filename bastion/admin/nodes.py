"""dtadmin nodes: the inventory the bastion forwards to, and nothing else."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

import typer

from bastion import audit
from bastion.admin.common import StateOpt, actor, audited, new_app, open_cluster, split_csv
from bastion.authz.rbac import check_name
from bastion.authz.records import Node
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.errors import NotFound, UsageError

app = new_app("Manage nodes: the only places the bastion forwards to.")

_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")


def parse_addr(value: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT, validated."""
    host, port_text = value, "22"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"invalid address {value!r}: expected [IPv6]:PORT")
            port_text = rest[1:]
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    elif ":" in value:
        raise UsageError(f"invalid address {value!r}: write IPv6 addresses as [addr]:port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"invalid port in {value!r}")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not _HOST_RE.fullmatch(host):
            raise UsageError(f"invalid host in {value!r}") from None
    return host, int(port_text)


def parse_labels(value: str | None) -> dict[str, str]:
    labels = {}
    for item in split_csv(value):
        key, sep, val = item.partition("=")
        if not sep or not key or not re.match(r"^[A-Za-z0-9._/-]{1,63}$", key):
            raise UsageError(f"invalid label {item!r}: expected key=value")
        labels[key] = val
    return labels


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Node name users type: ssh -J bastion root@NAME.")],
    addr: Annotated[str, typer.Option("--addr", help="HOST:PORT of the node's sshd.")],
    labels: Annotated[str | None, typer.Option("--labels", help="e.g. env=prod,team=db")] = None,
    state: StateOpt = None,
) -> None:
    """Add a node to the inventory.

    Example: dtadmin nodes add node-1 --addr 10.0.0.5:22 --labels env=prod
    """
    check_name("node", name)
    host, port = parse_addr(addr)
    store = open_cluster(ctx, state).store
    with store.transaction():
        node = store.add_node(Node(name, host, port, parse_labels(labels)))
        audit.record(
            store,
            "node.create",
            message=f'node "{name}" at {node.addr} added',
            actor=actor(),
            node=name,
        )
    console.say(f'node "{name}" ({node.addr}) added')


@app.command("ls")
def ls(
    ctx: typer.Context,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """List the node inventory."""
    nodes = open_cluster(ctx, state).store.list_nodes()
    if fmt is Format.json:
        console.print_json(
            [{"name": n.name, "addr": n.host, "port": n.port, "labels": n.labels} for n in nodes]
        )
        return
    console.print_table(
        ["Node", "Address", "Labels"],
        [
            (n.name, n.addr, ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())))
            for n in nodes
        ],
        empty="(no nodes; add one with: dtadmin nodes add NAME --addr HOST:PORT)",
    )


@app.command("rm")
def rm(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The node to remove.")],
    state: StateOpt = None,
) -> None:
    """Remove a node; the bastion stops forwarding to it at once."""
    store = open_cluster(ctx, state).store
    with audited(store, "node.delete", message=f'node "{name}" removed', actor=actor(), node=name):
        store.remove_node(name)
    console.say(f'node "{name}" removed')


@app.command("sshd-config")
def sshd_config(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The node to print sshd_config lines for.")],
    state: StateOpt = None,
) -> None:
    """Print the sshd_config lines that make a node trust this cluster and enforce devices."""
    node = open_cluster(ctx, state).store.find_node(name)
    if node is None:
        raise NotFound(f'node "{name}" not found')
    lines = [
        f"# sshd_config for node {node.name}",
        "# /etc/ssh/dt_user_ca.pub: from `dtadmin ca export --type user`",
        "TrustedUserCAKeys /etc/ssh/dt_user_ca.pub",
        f"# from `dtadmin host sign KEY.pub --principals {node.name},{node.host}`",
        "HostCertificate /etc/ssh/ssh_host_ed25519_key-cert.pub",
        "# from `dtadmin ca krl --out /etc/ssh/dt_revoked.krl`",
        "RevokedKeys /etc/ssh/dt_revoked.krl",
        "AuthorizedPrincipalsCommand /usr/local/bin/dt-node-principals "
        "--ca /etc/ssh/dt_user_ca.pub %u %t %k",
        "AuthorizedPrincipalsCommandUser nobody",
    ]
    console.say("\n".join(lines))
