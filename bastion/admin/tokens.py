"""dtadmin tokens: the one-time tokens this cluster issued (signup and enrollment).

Only a token's hash is stored, so nothing here can print a secret: a token is named by
the first 12 hex digits of its hash (its ID), which say nothing about the secret.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from bastion import audit
from bastion.admin.common import StateOpt, actor, new_app, open_cluster
from bastion.authz.records import Token
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.errors import NotFound, UsageError

app = new_app("List and remove one-time signup and enrollment tokens (never their secrets).")

ID_LEN = 12
KINDS = ("signup", "enroll", "bot")


def token_id(token: Token) -> str:
    return token.token_hash[:ID_LEN]


def status(token: Token, now: float) -> str:
    if token.consumed is not None:
        return "used"
    return "expired" if token.expires <= now else "unused"


def _doc(token: Token, now: float) -> dict[str, Any]:
    return {
        "id": token_id(token),
        "kind": token.kind,
        # signup and bot tokens are for a user, enrollment tokens for a device (asset tag)
        "user": token.subject if token.kind in ("signup", "bot") else None,
        "device": token.subject if token.kind == "enroll" else None,
        "status": status(token, now),
        "expires": console.rfc3339(token.expires),
        "created": console.rfc3339(token.created or None),
        "created_by": token.created_by or None,
        "used": console.rfc3339(token.consumed),
        "used_by": token.consumed_by,
    }


@app.command("ls")
def ls(
    ctx: typer.Context,
    kind: Annotated[
        str | None, typer.Option("--kind", help="Only signup, enroll or bot tokens.")
    ] = None,
    unused: Annotated[
        bool, typer.Option("--unused", help="Only tokens that can still be used.")
    ] = False,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """List tokens: kind, for whom, expiry and whether used. Example: dtadmin tokens ls --unused"""
    if kind is not None and kind not in KINDS:
        raise UsageError(f"invalid --kind {kind!r}: use signup, enroll or bot")
    now = time.time()
    tokens = open_cluster(ctx, state).store.list_tokens(kind)
    if unused:
        tokens = [t for t in tokens if status(t, now) == "unused"]
    docs = [_doc(t, now) for t in tokens]
    console.emit(
        fmt,
        docs,
        ["ID", "Kind", "For", "Status", "Expires", "Used", "Created by"],
        [
            (
                d["id"],
                d["kind"],
                f"user {d['user']}" if d["user"] else f"device {d['device']}",
                d["status"],
                console.when(t.expires),
                console.when(t.consumed),
                d["created_by"] or "",
            )
            for d, t in zip(docs, tokens, strict=True)
        ],
        empty="(no tokens; dtadmin users add / device enroll-token issue them)",
    )


@app.command("rm")
def rm(
    ctx: typer.Context,
    ids: Annotated[list[str], typer.Argument(help="Token IDs from `dtadmin tokens ls`.")],
    state: StateOpt = None,
) -> None:
    """Remove tokens so they can no longer be used. Example: dtadmin tokens rm 3f9a0c12b4d1"""
    store = open_cluster(ctx, state).store
    with store.transaction():  # all or none
        tokens = store.list_tokens()
        for wanted in ids:
            prefix = wanted.strip().lower()
            if len(prefix) < 6 or any(c not in "0123456789abcdef" for c in prefix):
                raise UsageError(f"invalid token ID {wanted!r}: give the ID `tokens ls` prints")
            matches = [t for t in tokens if t.token_hash.startswith(prefix)]
            if not matches:
                raise NotFound(f'token "{wanted}" not found (see: dtadmin tokens ls)')
            if len(matches) > 1:
                raise UsageError(f'token ID "{wanted}" is ambiguous; give all {ID_LEN} digits')
            token = matches[0]
            store.remove_token(token.token_hash)
            audit.record(
                store,
                "token.delete",
                message=f"{token.kind} token {token_id(token)} for {token.subject} removed",
                user=token.subject if token.kind in ("signup", "bot") else None,
                device=token.subject if token.kind == "enroll" else None,
                actor=actor(),
                token=token_id(token),
                kind=token.kind,
            )
            console.say(f"{token.kind} token {token_id(token)} ({token.subject}) removed")
