"""``dtadmin ca host-key``: the bastion's plain host key, for clients that cannot check
host certificates.

OpenSSH, PuTTY 0.78+ and dtclient trust the bastion through its host certificate (the
host CA in ``@cert-authority`` / ``sshhostcas`` / the pinned ``--ca-pin``). paramiko,
libssh and Dropbear see only the key inside the certificate and ask "continue
connecting?" on first use; this prints what the user must compare there.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bastion.admin.common import StateOpt, open_cluster
from bastion.ca.keys import fingerprint, load_private_key, public_line
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.errors import StateError


def host_key(
    ctx: typer.Context,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """Print the bastion's own host key: its SHA256 fingerprint and public key line.

    For SSH clients that cannot verify the bastion's host certificate (paramiko, libssh,
    Dropbear): they show this fingerprint at their first-use prompt, or take the line
    for their known_hosts. Users can print the same with `dtclient host-key`, which
    checks it through the pinned host CA.
    """
    cluster = open_cluster(ctx, state)
    path = cluster.bastion_host_key_path()
    if not path.exists():
        raise StateError(
            f"the bastion has no host key yet ({path}): `dt-bastion serve` makes it when it "
            "first starts"
        )
    key = load_private_key(path).public_key()
    line = public_line(key, f"dt-bastion@{cluster.name}")
    fp = fingerprint(key)
    if fmt is Format.json:
        console.print_json(
            {
                "cluster": cluster.name,
                "fingerprint": fp,
                "public_key": line,
                "type": line.split()[0],
            }
        )
        return
    console.say(f"# host key of the bastion of cluster {cluster.name} ({line.split()[0]})")
    console.say(fp)
    console.say(line)
