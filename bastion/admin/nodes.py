"""dtadmin nodes: the inventory the bastion forwards to, and nothing else."""

from __future__ import annotations

import io
import ipaddress
import json
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Annotated, Any

import typer

import bastion as bastion_pkg
from bastion import audit
from bastion.admin.common import StateOpt, actor, audited, new_app, open_cluster, split_csv
from bastion.authz import published
from bastion.authz.rbac import check_name
from bastion.authz.records import DevicePosture, Node, Role
from bastion.cluster import Cluster
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.durations import parse_duration
from bastion.protocol.errors import NotFound, StateError, UsageError
from bastion.protocol.files import atomic_write
from bastion.storage.posture import CORRUPT as CORRUPT_POSTURE

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
    selectors: Annotated[
        list[str] | None,
        typer.Argument(
            help="Only nodes with these labels (all must match), e.g. env=prod.",
            metavar="KEY=VALUE",
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """List the node inventory. Example: dtadmin nodes ls env=prod team=db"""
    wanted: dict[str, str] = {}
    for selector in selectors or ():
        wanted.update(parse_labels(selector))
    nodes = [
        n
        for n in open_cluster(ctx, state).store.list_nodes()
        if all(n.labels.get(k) == v for k, v in wanted.items())
    ]
    console.emit(
        fmt,
        [
            {
                "name": n.name,
                "addr": n.host,
                "port": n.port,
                "labels": n.labels,
                "created": console.rfc3339(n.created or None),
            }
            for n in nodes
        ],
        ["Node", "Address", "Labels"],
        [
            (n.name, n.addr, ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())))
            for n in nodes
        ],
        empty="(no nodes match)"
        if wanted
        else "(no nodes; add one with: dtadmin nodes add NAME --addr HOST:PORT)",
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


HELPER = "/usr/local/bin/dt-node-principals"
NODE_STATE = "/etc/ssh/dt_node_state.json"


@app.command("sshd-config")
def sshd_config(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The node to print sshd_config lines for.")],
    helper: Annotated[
        str, typer.Option("--helper", help="Where the node has dt-node-principals.")
    ] = HELPER,
    require_device: Annotated[
        bool,
        typer.Option(
            "--require-device",
            help="Require a trusted device on this node whatever the cluster's modes say.",
        ),
    ] = False,
    state: StateOpt = None,
) -> None:
    """Print the sshd_config lines that make a node trust this cluster and enforce devices.

    The node's dt-node-principals decides device trust as the bastion does, from the
    cluster's and each role's device-trust mode in the state `dtadmin nodes publish`
    writes; see docs/getting-started.md, "Nodes reachable without the bastion".
    """
    cluster = open_cluster(ctx, state)
    node = cluster.store.find_node(name)
    if node is None:
        raise NotFound(f'node "{name}" not found')
    mode = cluster.store.get_setting("device_trust_mode")
    strict = " --require-device" if require_device else ""
    lines = [
        f"# sshd_config for node {node.name} (cluster {cluster.name}, device trust {mode})",
        "# /etc/ssh/dt_user_ca.pub: from `dtadmin ca export --type user`",
        "TrustedUserCAKeys /etc/ssh/dt_user_ca.pub",
        f"# from `dtadmin host sign KEY.pub --principals {node.name},{node.host}`",
        "HostCertificate /etc/ssh/ssh_host_ed25519_key-cert.pub",
        "# from `dtadmin ca krl --out /etc/ssh/dt_revoked.krl`",
        "RevokedKeys /etc/ssh/dt_revoked.krl",
        f"# {helper}: from `dtadmin nodes helper --out dt-node-principals`;",
        f"# {NODE_STATE}: from `dtadmin nodes publish --out dt_node_state.json`,",
        "# copied again whenever it changes (its cluster and role modes decide)",
        f"AuthorizedPrincipalsCommand {helper} --ca /etc/ssh/dt_user_ca.pub "
        f"--state {NODE_STATE}{strict} %u %t %k",
        "AuthorizedPrincipalsCommandUser nobody",
    ]
    console.say("\n".join(lines))


def node_state(cluster: Cluster, *, now: float, valid_for: float) -> dict[str, Any]:
    """The published document (bastion.authz.published), read in one snapshot and
    signed with the user CA key that nodes already trust."""
    store = cluster.store
    with store.read_transaction():
        try:
            mode: object = store.get_setting("device_trust_mode")
        except StateError:
            mode = None  # nodes read it as required
        try:
            cluster_posture: object = store.get_setting("posture_policy")
        except StateError:
            cluster_posture = published.UNREADABLE_POLICY  # nodes read it as denying
        users = store.list_users()
        roles: list[Role] = []
        unreadable: list[str] = []
        for role_name in sorted({r for u in users for r in u.roles}):
            try:
                role = store.find_role(role_name)
            except StateError:
                unreadable.append(role_name)
                continue
            if role is not None:
                roles.append(role)
        devices = store.list_devices()
        postures = {}
        for device in devices:
            try:
                record = store.find_device_posture(device.id)
            except StateError:  # a corrupt record denies, as on the bastion
                record = DevicePosture(
                    device.id,
                    verdict="deny",
                    reasons=(CORRUPT_POSTURE.format(tag=device.asset_tag),),
                )
            if record is not None:
                postures[device.id] = record
        doc = published.build(
            cluster=cluster.name,
            user_ca_fingerprint=cluster.ca.user_ca_fingerprint,
            cluster_mode=mode,
            users=users,
            roles=roles,
            devices=devices,
            locks=store.list_locks(now=now),
            published=now,
            expires=now + valid_for,
            cluster_posture=cluster_posture,
            postures=postures,
        )
    for role_name in unreadable:  # a role nodes cannot read requires a device there
        doc["roles"][role_name] = None
    published.sign(doc, cluster.ca.user_ca_fingerprint, cluster.ca.user_ca.sign)
    return doc


@app.command("publish")
def publish(
    ctx: typer.Context,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write here (atomically) instead of stdout.")
    ] = None,
    valid_for: Annotated[
        str,
        typer.Option(
            "--valid-for",
            help="How long nodes believe it (90m, 1d, ...); an expired copy makes a node "
            "require a trusted device. Publish again well before.",
        ),
    ] = "1d",
    state: StateOpt = None,
) -> None:
    """Write the state nodes decide device trust over (for dt-node-principals --state).

    It holds the cluster's and every role's device-trust mode and posture policy, users
    and their roles, devices (no keys) with their posture verdicts (no measurements) and
    locks; no secrets. Copy it to each node as
    /etc/ssh/dt_node_state.json (root-owned, mode 0644) whenever it changes.
    Example: dtadmin nodes publish --out /var/lib/dt-bastion/node-state.json
    """
    seconds = parse_duration(valid_for)
    doc = node_state(open_cluster(ctx, state), now=time.time(), valid_for=seconds)
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    if out is None:
        sys.stdout.write(data.decode())
        return
    _write(out, data, 0o644)
    console.note(f"node state written to {out} (valid until {doc['expires']})")


def _write(path: Path, data: bytes, mode: int) -> None:
    try:
        atomic_write(path, data, mode)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


# What the node helper is made of: the contract and the decision core, nothing else.
_HELPER_PACKAGES = ("bastion/protocol", "bastion/authz")


@app.command("helper")
def helper_cmd(
    out: Annotated[Path, typer.Option("--out", help="The file to write (mode 0755).")],
    python: Annotated[
        str,
        typer.Option("--python", help="The node's Python (3.11+, with cryptography >= 42)."),
    ] = "/opt/dt-node/bin/python3",
) -> None:
    """Write dt-node-principals as one executable file for a node.

    It carries the certificate parser and the decision core the bastion itself uses;
    the node needs only Python 3.11+ and cryptography (see docs/getting-started.md).
    Example: dtadmin nodes helper --out dt-node-principals
    """
    root = Path(bastion_pkg.__file__).resolve().parent.parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bastion/__init__.py", "")
        zf.write(root / "bastion" / "node_principals.py", "bastion/node_principals.py")
        for package in _HELPER_PACKAGES:
            for path in sorted((root / package).glob("*.py")):
                zf.write(path, f"{package}/{path.name}")
        zf.writestr(
            "__main__.py",
            "import sys\nfrom bastion.node_principals import main\nsys.exit(main())\n",
        )
    _write(out, f"#!{python}\n".encode() + buf.getvalue(), 0o755)
    console.say(f"wrote {out}: install it on the node as {HELPER} (owned by root, mode 0755)")
