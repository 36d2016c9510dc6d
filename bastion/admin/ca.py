"""dtadmin init, ca export/krl, auth sign, host sign: the CA's admin surface."""

from __future__ import annotations

import subprocess  # nosec B404  # runs ssh-keygen only, argv as a list (see below)
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from bastion.admin.common import StateOpt, actor, database, new_app, open_cluster, state_dir
from bastion.ca.certs import load_public_key
from bastion.ca.keys import atomic_write, fingerprint, public_line
from bastion.cluster import init_cluster
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.durations import parse_duration
from bastion.protocol.errors import StateError, UsageError
from bastion.storage import safe_url

ca_app = new_app("Export the cluster's CA keys and revocation list for nodes.")
auth_app = new_app("Sign bot certificates by hand, on the CA host (like tctl auth sign).")
host_app = new_app("Sign host certificates for the bastion and nodes.")


def init(
    ctx: typer.Context,
    cluster: Annotated[str, typer.Option("--cluster", help="Cluster name, e.g. example.com.")],
    state: StateOpt = None,
) -> None:
    """Create a cluster: user CA, host CA, preset roles and the database.

    Example: dtadmin init --cluster example.com --state /var/lib/dt-bastion
    """
    directory = state_dir(ctx, state)
    url = database(ctx)
    created = init_cluster(directory, cluster, actor=actor(), database=url)
    try:
        where = f"{directory} (state in {safe_url(url)})" if url else str(directory)
        console.say(f'Cluster "{cluster}" created in {where}')
        console.say(f"  user CA {created.ca.user_ca_fingerprint}")
        console.say(f"  host CA {created.ca.host_ca_fingerprint}")
        console.say(
            "Next: dtadmin users add NAME --roles access --logins root; "
            "dtadmin ca export --type user (for nodes)"
        )
    finally:
        created.close()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


@ca_app.command("export")
def export(
    ctx: typer.Context,
    type: Annotated[str, typer.Option("--type", help="user or host.")] = "user",
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """Print the CA public key as nodes (user) or clients (host) need it.

    --type user: the line for sshd's TrustedUserCAKeys file.
    --type host: the @cert-authority line for known_hosts, and the fingerprint that
    `dtclient login --ca-pin` takes.
    """
    if type not in ("user", "host"):
        raise UsageError("--type must be user or host")
    cluster = open_cluster(ctx, state)
    key = (cluster.ca.user_ca if type == "user" else cluster.ca.host_ca).public_key()
    line = public_line(key, f"{type}-ca@{cluster.name}")
    fp = fingerprint(key)
    if fmt is Format.json:
        console.print_json(
            {"type": type, "public_key": line, "fingerprint": fp, "cluster": cluster.name}
        )
        return
    console.say(f"# {type} CA of cluster {cluster.name}, fingerprint {fp}")
    console.say(line if type == "user" else f"@cert-authority * {line}")


@ca_app.command("krl")
def krl(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Where to write the KRL (binary).")],
    state: StateOpt = None,
) -> None:
    """Write an OpenSSH KRL for nodes' RevokedKeys: revoked serials and key ids, and
    every retired user CA (which revokes all it ever signed)."""
    cluster = open_cluster(ctx, state)
    revoked = [c for c in cluster.store.list_certs(revoked=True) if c.cert_type == "user"]
    retired = cluster.retired_user_cas()
    ca_pub = cluster.state_dir / "ca" / "user_ca.pub"
    spec_lines = [f"serial: {c.serial}\n" for c in revoked]
    spec_lines += [f"id: {c.key_id}\n" for c in revoked]
    spec_lines += [f"key: {r['public_key']}\n" for r in retired]
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec"
        spec.write_text("".join(spec_lines))
        target = Path(tmp) / "krl"
        # ssh-keygen writes the KRL format itself: no hand-written encoder to get wrong.
        # The admin's own ssh-keygen from their PATH, as from their shell; no shell here,
        # and every argument is a path this command made.
        proc = subprocess.run(  # nosec B603 B607
            ["ssh-keygen", "-q", "-k", "-f", str(target), "-s", str(ca_pub), str(spec)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise StateError(f"ssh-keygen could not write the KRL: {proc.stderr.strip()}")
        atomic_write(out, target.read_bytes(), 0o644)
    console.say(
        f"wrote {out}: {len(revoked)} revoked certificate(s), {len(retired)} retired user CA(s)"
    )


@ca_app.command("rotate")
def rotate(
    ctx: typer.Context,
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm: every user certificate stops working.")
    ] = False,
    state: StateOpt = None,
) -> None:
    """Replace the user CA: revoke everything the old one signed (a leaked CA key).

    Every user must log in again; nodes need the new CA (dtadmin ca export --type user)
    and a fresh KRL (dtadmin ca krl), which revokes the old CA outright. A running
    bastion switches to the new CA by itself.
    """
    if not yes:
        raise UsageError(
            "rotating the user CA revokes every user certificate at once; "
            "run again with --yes to confirm"
        )
    cluster = open_cluster(ctx, state)
    old_fp, new_fp, count = cluster.rotate_user_ca(actor=actor())
    console.say(f"user CA rotated: {old_fp} -> {new_fp}; {count} certificate(s) revoked")
    console.say(
        "next: give nodes the new CA (dtadmin ca export --type user) and a new KRL "
        "(dtadmin ca krl --out FILE); the old CA's private key is in ca/retired/ — shred it"
    )


@auth_app.command("sign")
def sign(
    ctx: typer.Context,
    user: Annotated[str, typer.Option("--user", help="The bot user to sign for.")],
    pubkey: Annotated[
        Path, typer.Option("--key", "--pubkey", help="The bot's OpenSSH public key file.")
    ],
    ttl: Annotated[
        str, typer.Option("--ttl", help="Lifetime (at most 4h for a bot, and its roles' cap).")
    ] = "1h",
    out: Annotated[Path | None, typer.Option("--out", help="Default: KEY-cert.pub.")] = None,
    state: StateOpt = None,
) -> None:
    """Sign a bot's certificate offline, on the CA host, like `tctl auth sign`.

    For bot users only (dtadmin bots add): people get their certificates from
    `dtclient login` (password, one-time code and, where required, their device). The
    certificate says it is a bot's (key id bot-NAME-SERIAL, extension dt-bot@dt-bastion),
    is recorded as issued and audited, and works with stock ssh -J through the bastion.

    Example: dtadmin auth sign --user ci-deploy --key ci_key.pub --ttl 1h --out ci_key-cert.pub
    """
    from bastion.ca.authority import UserCertRequest

    key = load_public_key(_read(pubkey))
    cluster = open_cluster(ctx, state)
    request = UserCertRequest(user, key, ttl=parse_duration(ttl), actor=actor(), bot_only=True)
    issued = cluster.ca.sign(request)
    target = out or _cert_path(pubkey)
    atomic_write(target, (issued.openssh + "\n").encode(), 0o644)
    until = console.when(issued.record.valid_before)
    console.say(
        f"certificate for bot {user} (serial {issued.record.serial}, principals "
        f"{','.join(issued.record.principals)}, valid until {until}) written to {target}"
    )


@host_app.command("sign")
def host_sign(
    ctx: typer.Context,
    pubkey: Annotated[Path, typer.Argument(help="The host's public key file.")],
    principals: Annotated[
        str, typer.Option("--principals", help="Host names, e.g. node-1,10.0.0.5.")
    ],
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime.")] = "52w",
    out: Annotated[Path | None, typer.Option("--out", help="Default: KEY-cert.pub.")] = None,
    state: StateOpt = None,
) -> None:
    """Sign a host certificate so clients trusting the host CA need no TOFU prompt."""
    from bastion.admin.common import split_csv

    names = tuple(split_csv(principals))
    if not names:
        raise UsageError("give at least one host name with --principals")
    key = load_public_key(_read(pubkey))
    cluster = open_cluster(ctx, state)
    issued = cluster.ca.sign_host(key, names, ttl=parse_duration(ttl), actor=actor())
    target = out or _cert_path(pubkey)
    atomic_write(target, (issued.openssh + "\n").encode(), 0o644)
    console.say(f"host certificate for {','.join(names)} written to {target}")


def _cert_path(pubkey: Path) -> Path:
    name = pubkey.name[:-4] if pubkey.name.endswith(".pub") else pubkey.name
    return pubkey.with_name(name + "-cert.pub")
