"""dtadmin cert: the certificates this cluster issued, and revoking them.

Revocation is recorded in the database the bastion reads on every connection and
re-reads whenever the state changes, so a revoked certificate is refused from the
next handshake and its live sessions are cut within the watcher's interval. Nodes
learn of it from ``dtadmin ca krl``.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from bastion import audit
from bastion.admin.common import StateOpt, actor, new_app, open_cluster
from bastion.authz.records import IssuedCert
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.errors import NotFound, UsageError

app = new_app("List issued certificates and revoke them (by serial, key id or user).")


def _doc(c: IssuedCert) -> dict:
    # The JSON contract: a 64-bit serial as a string (jq rounds a number above 2**53),
    # times in RFC 3339.
    return {
        "serial": str(c.serial),
        "key_id": c.key_id,
        "type": c.cert_type,
        "user": c.user,
        "principals": list(c.principals),
        "valid_after": console.rfc3339(c.valid_after),
        "valid_before": console.rfc3339(c.valid_before),
        "device_id": c.device_id,
        "issued": console.rfc3339(c.issued or None),
        "revoked": console.rfc3339(c.revoked),
    }


@app.command("ls")
def ls(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option("--user", help="Only this user's.")] = None,
    revoked: Annotated[
        bool | None,
        typer.Option(
            "--revoked/--active", help="Only revoked, or only not revoked.", show_default=False
        ),
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """List issued certificates, newest last. Example: dtadmin cert ls --user alice --active"""
    certs = open_cluster(ctx, state).store.list_certs(user=user, revoked=revoked)
    now = time.time()
    console.emit(
        fmt,
        [_doc(c) for c in certs],
        ["Serial", "Key ID", "Type", "User", "Valid until", "Device", "Status"],
        [
            (
                str(c.serial),
                c.key_id,
                c.cert_type,
                c.user,
                console.when(c.valid_before),
                c.device_id or "",
                "revoked"
                if c.revoked is not None
                else ("expired" if c.valid_before < now else "valid"),
            )
            for c in certs
        ],
        empty="(no certificates)",
    )


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    serials: Annotated[
        list[int] | None, typer.Argument(help="Serials to revoke.", show_default=False)
    ] = None,
    key_id: Annotated[
        str | None, typer.Option("--key-id", help="Revoke the certificate(s) with this key id.")
    ] = None,
    user: Annotated[
        str | None, typer.Option("--user", help="Revoke every live certificate of this user.")
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Recorded in the audit log.")] = "",
    state: StateOpt = None,
) -> None:
    """Revoke user certificates: refused at once, live sessions using them are cut.

    Examples: dtadmin cert revoke 8812735; dtadmin cert revoke --key-id alice-8812735;
    dtadmin cert revoke --user alice --reason "laptop stolen".
    To revoke everything one CA ever signed, use: dtadmin ca rotate.
    """
    serials = list(serials or [])
    if not serials and key_id is None and user is None:
        raise UsageError("name what to revoke: SERIAL..., --key-id ID or --user NAME")
    store = open_cluster(ctx, state).store
    for serial in serials:
        found = store.find_cert(serial)
        if found is None or found.cert_type != "user":
            raise NotFound(f"no user certificate with serial {serial} was issued by this cluster")
    if key_id is not None and not any(
        c.cert_type == "user" for c in store.list_certs(key_id=key_id)
    ):
        raise NotFound(f"no user certificate with key id {key_id!r} was issued by this cluster")
    if user is not None and store.find_user(user) is None and not store.list_certs(user=user):
        raise NotFound(f'no user "{user}" and no certificates issued to that name')
    with store.transaction():
        done = store.revoke_certs(time.time(), serials=tuple(serials), key_id=key_id, user=user)
        for cert in done:
            audit.record(
                store,
                "cert.revoke",
                message=f"certificate serial {cert.serial} ({cert.key_id}) revoked"
                + (f": {reason}" if reason else ""),
                user=cert.user,
                serial=str(cert.serial),
                key_id=cert.key_id,
                actor=actor(),
            )
    if done:
        console.say(
            f"revoked {len(done)} certificate(s): "
            + ", ".join(str(c.serial) for c in done[:10])
            + (" ..." if len(done) > 10 else "")
        )
        console.say("nodes: refresh their RevokedKeys with dtadmin ca krl --out FILE")
    else:
        console.note("nothing to revoke: every matching certificate was already revoked")
