"""dtadmin users: add, ls, rm, update, reset."""

from __future__ import annotations

from typing import Annotated

import typer

from bastion import audit
from bastion.admin.common import StateOpt, actor, audited, new_app, open_cluster, split_csv
from bastion.authz.rbac import check_logins, check_user_name
from bastion.authz.records import User
from bastion.cluster import Cluster
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.errors import NotFound, UsageError
from bastion.storage import StateStore

app = new_app("Manage users: who may log in, with which roles and Unix logins.")


def check_roles(store: StateStore, roles: list[str]) -> tuple[str, ...]:
    for role in roles:
        if store.find_role(role) is None:
            raise NotFound(f'role "{role}" not found (see: dtadmin roles ls)')
    return tuple(dict.fromkeys(roles))


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The user name.")],
    roles: Annotated[
        str, typer.Option("--roles", help="Comma-separated roles, e.g. access,editor.")
    ],
    logins: Annotated[
        str, typer.Option("--logins", help="Comma-separated Unix logins, e.g. root,ubuntu.")
    ] = "",
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime of the signup token.")] = "1h",
    state: StateOpt = None,
) -> None:
    """Add a user and print a one-time signup token to share with them.

    Example: dtadmin users add alice --roles access,editor --logins root,ubuntu
    """
    from bastion.accounts import issue_signup_token
    from bastion.protocol.durations import parse_duration

    cluster = open_cluster(ctx, state)
    store = cluster.store
    check_user_name("user", name)
    role_list = check_roles(store, split_csv(roles))
    if not role_list:
        raise UsageError("give at least one role with --roles")
    who = actor()
    ttl_seconds = parse_duration(ttl)
    with store.transaction():  # the user and their signup token exist together or not at all
        with audited(
            store,
            "user.create",
            message=f'user "{name}" created',
            user=name,
            actor=who,
            roles=list(role_list),
        ):
            store.add_user(User(name, role_list, check_logins(split_csv(logins)), created_by=who))
        token = issue_signup_token(store, name, ttl=ttl_seconds, actor=who)
    console.say(f'User "{name}" has been created with roles {", ".join(role_list)}.')
    _print_signup(cluster, token, f"it works once and expires in {ttl}")


@app.command("reset")
def reset(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The user whose password and code to reset.")],
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime of the signup token.")] = "1h",
    state: StateOpt = None,
) -> None:
    """Clear a user's password and one-time-code app and issue a new signup token."""
    from bastion.accounts import issue_signup_token
    from bastion.protocol.durations import parse_duration

    cluster = open_cluster(ctx, state)
    store = cluster.store
    who = actor()
    with store.transaction():
        # Only the secrets: roles and logins someone changes meanwhile stay as they set them.
        store.set_user_secrets(name, None, None, None)
        token = issue_signup_token(store, name, ttl=parse_duration(ttl), actor=who)
        audit.record(store, "user.update", message=f'user "{name}" reset', user=name, actor=who)
    console.say(f'Password and one-time code of "{name}" cleared.')
    _print_signup(cluster, token, f"it works once and expires in {ttl}")


def _print_signup(cluster: Cluster, token: str, validity: str) -> None:
    """The token on a line of its own, and the command that asks for it: a token on a
    command line can be read by every local user while the command runs. The command
    names the bastion's public address and pins its host CA, so the first contact
    cannot be answered by another server."""
    from bastion.admin.cluster_cmd import public_addr

    addr = public_addr(cluster.store)
    console.say(f"Their signup token ({validity}); give it to them privately:")
    console.say(f"  {token}")
    console.say("They run this and paste the token when it asks:")
    console.say(
        f"  dtclient signup --proxy {addr or 'BASTION-HOST:3022'} "
        f"--ca-pin {cluster.ca.host_ca_fingerprint}"
    )
    if addr is None:
        console.note(
            "The bastion's public address is not set; replace BASTION-HOST:3022 above, "
            "and set it once with: dtadmin cluster set public-addr bastion.example.com:3022"
        )


@app.command("ls")
def ls(
    ctx: typer.Context,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """List users with their roles and logins."""
    store = open_cluster(ctx, state).store
    users = store.list_users()
    console.emit(
        fmt,
        [
            {
                "name": u.name,
                "roles": list(u.roles),
                "logins": list(u.logins),
                "signed_up": u.signed_up,
            }
            for u in users
        ],
        ["User", "Roles", "Logins", "Signed up"],
        [
            (u.name, ",".join(u.roles), ",".join(u.logins), "yes" if u.signed_up else "no")
            for u in users
        ],
        empty="(no users; add one with: dtadmin users add NAME --roles access)",
    )


@app.command("rm")
def rm(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The user to remove.")],
    state: StateOpt = None,
) -> None:
    """Remove a user; their live sessions are closed by the bastion within a second."""
    store = open_cluster(ctx, state).store
    with audited(store, "user.delete", message=f'user "{name}" removed', user=name, actor=actor()):
        store.remove_user(name)
    console.say(f'User "{name}" has been deleted.')


@app.command("update")
def update(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The user to change.")],
    set_roles: Annotated[str | None, typer.Option("--set-roles", help="Replace all roles.")] = None,
    add_roles: Annotated[str | None, typer.Option("--add-roles", help="Roles to add.")] = None,
    remove_roles: Annotated[
        str | None, typer.Option("--remove-roles", help="Roles to remove.")
    ] = None,
    logins: Annotated[str | None, typer.Option("--logins", help="Replace the Unix logins.")] = None,
    state: StateOpt = None,
) -> None:
    """Change a user's roles or logins.

    Example: dtadmin users update alice --add-roles require-trusted-device
    """
    store = open_cluster(ctx, state).store
    # Read and write in one write transaction, and write only the fields asked for:
    # --add-roles on a copy read earlier would undo another admin's change.
    with store.transaction(bump=False):  # the writes below bump; "No changes." does not
        user = store.get_user(name)
        roles = list(user.roles) if set_roles is None else split_csv(set_roles)
        roles += [r for r in split_csv(add_roles) if r not in roles]
        roles = [r for r in roles if r not in split_csv(remove_roles)]
        new_roles = check_roles(store, roles)
        new_logins = user.logins if logins is None else check_logins(split_csv(logins))
        if (new_roles, new_logins) == (user.roles, user.logins):
            console.say("No changes.")
            return
        with audited(
            store,
            "user.update",
            message=f'user "{name}" updated',
            user=name,
            actor=actor(),
            roles=list(new_roles),
            logins=list(new_logins),
        ):
            if new_roles != user.roles:
                store.set_user_roles(name, new_roles)
            if new_logins != user.logins:
                store.set_user_logins(name, new_logins)
    console.say(
        f'User "{name}" has been updated: roles {",".join(new_roles)}; '
        f"logins {','.join(new_logins) or '(none)'}."
    )
