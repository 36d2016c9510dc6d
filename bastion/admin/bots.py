"""dtadmin bots: users for automation (CI jobs, deploy scripts), and their tokens.

A bot is a user with ``bot`` set: no password, no one-time code, no signup and no
device. Its certificates are short-lived and say it is a bot (key id ``bot-NAME-SERIAL``
and the ``dt-bot@dt-bastion`` extension); they come from ``dtadmin auth sign`` on the
CA host, or from a bot token its job presents (``dtclient login --bot-token FILE``).
In a cluster whose device-trust mode is ``required-for-humans`` people need a trusted
device and bots do not. Locks (``dtadmin lock --user BOT``) and revocation apply to
bots as to people.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from bastion import audit
from bastion.admin.common import StateOpt, actor, audited, new_app, open_cluster, split_csv
from bastion.admin.users import check_roles
from bastion.authz.rbac import BOT_MAX_TTL, check_logins, check_user_name
from bastion.authz.records import User
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.errors import NotFound, UsageError
from bastion.storage import StateStore

app = new_app(
    "Manage bot users for CI and automation: no password or device; short-lived "
    "certificates from `dtadmin auth sign` or a bot token."
)


def _create_secret_file(path: Path) -> int:
    """A new file only its owner can read, never one already there nor through a link."""
    try:
        return os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        raise UsageError(f"{path} already exists; give a new file name to --out") from None
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from None


def get_bot(store: StateStore, name: str) -> User:
    user = store.find_user(name)
    if user is None or not user.bot:
        hint = " (it is a person: see dtadmin users)" if user is not None else ""
        raise NotFound(f'bot "{name}" not found{hint} (see: dtadmin bots ls)')
    return user


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The bot's user name, e.g. ci-deploy.")],
    roles: Annotated[str, typer.Option("--roles", help="Comma-separated roles, e.g. access.")],
    logins: Annotated[
        str, typer.Option("--logins", help="Comma-separated Unix logins, e.g. deploy.")
    ] = "",
    state: StateOpt = None,
) -> None:
    """Add a bot user (no password, no one-time code, no device).

    Example: dtadmin bots add ci-deploy --roles access --logins deploy
    """
    store = open_cluster(ctx, state).store
    check_user_name("bot", name)
    role_list = check_roles(store, split_csv(roles))
    if not role_list:
        raise UsageError("give at least one role with --roles")
    logins_list = check_logins(split_csv(logins))
    who = actor()
    now = time.time()
    with audited(
        store, "bot.create", message=f'bot "{name}" created', user=name, actor=who,
        roles=list(role_list), logins=list(logins_list),
    ):  # fmt: skip
        store.add_user(User(name, role_list, logins_list, created_by=who, bot=True))
        # Whatever an earlier user of this name left behind must not come back to life.
        store.remove_tokens("bot", name)
        store.remove_tokens("signup", name)
        store.revoke_certs(now, user=name)
    console.say(f'Bot "{name}" has been created with roles {", ".join(role_list)}.')
    console.say("Give its job a certificate, either:")
    console.say(f"  dtadmin bots token {name} --ttl 24h --out {name}.token")
    console.say(f"    (the job runs: dtclient login --proxy HOST:PORT --bot-token {name}.token)")
    console.say(f"  dtadmin auth sign --user {name} --key KEY.pub --ttl 1h  (on this host)")


@app.command("ls")
def ls(
    ctx: typer.Context,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """List bot users with their roles, logins and live tokens."""
    store = open_cluster(ctx, state).store
    now = time.time()
    bots = [u for u in store.list_users() if u.bot]
    tokens = [t for t in store.list_tokens("bot") if t.expires > now]
    live = {b.name: sum(1 for t in tokens if t.subject == b.name) for b in bots}
    console.emit(
        fmt,
        [
            {
                "name": b.name,
                "roles": list(b.roles),
                "logins": list(b.logins),
                "tokens": live[b.name],
                "created": console.rfc3339(b.created),
                "created_by": b.created_by,
            }
            for b in bots
        ],
        ["Bot", "Roles", "Logins", "Live tokens", "Created"],
        [
            (
                b.name,
                ",".join(b.roles),
                ",".join(b.logins),
                str(live[b.name]),
                console.when(b.created),
            )
            for b in bots
        ],  # fmt: skip
        empty="(no bots; add one with: dtadmin bots add NAME --roles access)",
    )


@app.command("rm")
def rm(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The bot to remove.")],
    state: StateOpt = None,
) -> None:
    """Remove a bot: its tokens stop working, its certificates are revoked, and the
    bastion closes its live sessions within a second."""
    store = open_cluster(ctx, state).store
    who = actor()
    with store.transaction():
        get_bot(store, name)
        store.remove_user(name)
        tokens = store.remove_tokens("bot", name)
        revoked = store.revoke_certs(time.time(), user=name)
        audit.record(
            store, "bot.delete", message=f'bot "{name}" removed', user=name, actor=who,
            tokens=tokens, revoked=[str(c.serial) for c in revoked],
        )  # fmt: skip
    console.say(
        f'Bot "{name}" has been deleted ({tokens} token(s) removed, '
        f"{len(revoked)} certificate(s) revoked)."
    )


@app.command("token")
def token(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The bot the token is for.")],
    ttl: Annotated[
        str, typer.Option("--ttl", help="How long the token works, e.g. 24h or 30d.")
    ] = "24h",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Write the token to this new file (mode 0600) instead of printing it.",
        ),
    ] = None,
    state: StateOpt = None,
) -> None:
    """Mint a bot token: the secret a CI job uses to get short-lived certificates.

    The job runs `dtclient login --proxy HOST:PORT --bot-token FILE` and gets a
    certificate (at most 4h; 1h unless it asks with --ttl) for a fresh key of its own.
    The token works until --ttl passes or it is removed (dtadmin bots token-rm); every
    use is audited (token.use, kind bot). Keep it in your CI's secret store.

    Example: dtadmin bots token ci-deploy --ttl 30d --out ci-deploy.token
    """
    from bastion.accounts import bot_token_id, issue_bot_token
    from bastion.protocol.durations import parse_duration

    store = open_cluster(ctx, state).store
    get_bot(store, name)
    seconds = parse_duration(ttl)
    fd = _create_secret_file(out) if out is not None else None
    try:
        secret, record = issue_bot_token(store, name, ttl=seconds, actor=actor())
        if fd is not None:
            os.write(fd, (secret + "\n").encode())
            os.fsync(fd)
    except BaseException:
        if out is not None:
            with contextlib.suppress(OSError):
                out.unlink()
        raise
    finally:
        if fd is not None:
            os.close(fd)
    token_id = bot_token_id(record.token_hash)
    if out is not None:
        console.say(f'Bot token {token_id} for "{name}" written to {out} (expires in {ttl}).')
    else:
        console.say(f'Bot token {token_id} for "{name}" (expires in {ttl}); keep it secret:')
        console.say(f"  {secret}")
    console.say(
        "The job runs: dtclient login --proxy HOST:PORT --bot-token FILE "
        "(then plain ssh with the config of dtclient config)"
    )


@app.command("tokens")
def tokens(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The bot whose tokens to list.")],
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """List a bot's tokens (their ids, never the secrets), live and expired."""
    from bastion.accounts import bot_token_id

    store = open_cluster(ctx, state).store
    get_bot(store, name)
    now = time.time()
    found = [t for t in store.list_tokens("bot") if t.subject == name]
    console.emit(
        fmt,
        [
            {
                "id": bot_token_id(t.token_hash),
                "bot": t.subject,
                "created": console.rfc3339(t.created),
                "expires": console.rfc3339(t.expires),
                "expired": t.expires <= now,
                "created_by": t.created_by,
            }
            for t in found
        ],
        ["Token", "Created", "Expires", "Status"],
        [
            (
                bot_token_id(t.token_hash),
                console.when(t.created),
                console.when(t.expires),
                "expired" if t.expires <= now else "live",
            )
            for t in found
        ],  # fmt: skip
        empty=f"(no tokens; mint one with: dtadmin bots token {name})",
    )


@app.command("token-rm")
def token_rm(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The bot whose token(s) to remove.")],
    token_id: Annotated[
        str | None,
        typer.Argument(help="The token's id (dtadmin bots tokens NAME); all of them if left out."),
    ] = None,
    state: StateOpt = None,
) -> None:
    """Remove (revoke) a bot token: its next use is refused, and a connection that
    authenticated with it is closed within a second. Certificates it already got stay
    valid until they expire (at most 4h); revoke them with dtadmin cert revoke --user."""
    from bastion.accounts import bot_token_id

    store = open_cluster(ctx, state).store
    with store.transaction():
        get_bot(store, name)
        mine = [t for t in store.list_tokens("bot") if t.subject == name]
        if token_id is not None:
            mine = [t for t in mine if bot_token_id(t.token_hash) == token_id]
            if not mine:
                raise NotFound(f'bot "{name}" has no token {token_id} (see: dtadmin bots tokens)')
        for t in mine:
            store.remove_tokens("bot", name, t.token_hash)
            audit.record(
                store, "token.delete", user=name, actor=actor(), kind="bot",
                message=f'bot token {bot_token_id(t.token_hash)} of "{name}" removed',
                token=bot_token_id(t.token_hash),
            )  # fmt: skip
    console.say(f'{len(mine)} token(s) of bot "{name}" removed.')


__all__ = ["BOT_MAX_TTL", "app", "get_bot"]
