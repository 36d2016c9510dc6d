"""dtadmin get / edit: resources as YAML, edited in $EDITOR like the seed's tctl."""

from __future__ import annotations

import os
import shlex
import subprocess  # nosec B404  # runs the admin's editor, argv as a list
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from bastion import audit, resources
from bastion.admin.common import StateOpt, actor, audited, open_cluster
from bastion.admin.devices import unenroll
from bastion.authz.records import Device
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.errors import DTError, StateError, UsageError
from bastion.storage import StateStore

KINDS = {
    "users": "user",
    "user": "user",
    "roles": "role",
    "role": "role",
    "device": "device",
    "devices": "device",
    "nodes": "node",
    "node": "node",
}

RefArg = Annotated[str, typer.Argument(help="KIND/NAME: users/alice, roles/access, device/TAG")]
GetRefArg = Annotated[
    str,
    typer.Argument(
        help="KIND/NAME (users/alice, roles/access, devices/TAG, nodes/node-1), "
        "or KIND alone for all of them (roles)."
    ),
]


def _parse_ref(ref: str) -> tuple[str, str]:
    kind, sep, name = ref.partition("/")
    if not sep or kind not in KINDS or not name:
        raise UsageError(
            f"invalid resource {ref!r}: use users/NAME, roles/NAME, devices/TAG or nodes/NAME, "
            "or the kind alone for all (roles)"
        )
    return KINDS[kind], name


def _document(store: StateStore, kind: str, name: str) -> dict:
    if kind == "user":
        locked = store.active_lock("user", name, time.time()) is not None
        return resources.user_doc(store.get_user(name), locked)
    if kind == "role":
        return resources.role_doc(store.get_role(name))
    if kind == "device":
        return resources.device_doc(store.get_device(name))
    node = store.find_node(name)
    if node is None:
        from bastion.protocol.errors import NotFound

        raise NotFound(f'node "{name}" not found')
    return resources.node_doc(node)


def _all_names(store: StateStore, kind: str) -> list[str]:
    if kind == "user":
        return [u.name for u in store.list_users()]
    if kind == "role":
        return [r.name for r in store.list_roles()]
    if kind == "device":
        return [d.asset_tag for d in store.list_devices()]
    return [n.name for n in store.list_nodes()]


def get(
    ctx: typer.Context,
    ref: GetRefArg,
    fmt: Annotated[Format, typer.Option("--format", help="yaml (text) or json.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """Print a resource as YAML, or every resource of a kind.

    Examples: dtadmin get users/alice; dtadmin get roles (all roles, as a YAML stream
    of documents separated by ---, or with --format json a JSON array)
    """
    store = open_cluster(ctx, state).store
    if "/" not in ref.rstrip("/") and ref.rstrip("/") in KINDS:
        kind = KINDS[ref.rstrip("/")]
        with store.read_transaction():
            docs = [_document(store, kind, name) for name in _all_names(store, kind)]
        if fmt is Format.json:
            console.print_json(docs)
        elif docs:
            console.say("\n".join(f"---\n{resources.dump(d).rstrip()}" for d in docs))
        return
    kind, name = _parse_ref(ref)
    doc = _document(store, kind, name)
    if fmt is Format.json:
        console.print_json(doc)
    else:
        console.say(resources.dump(doc).rstrip())


def _run_editor(path: Path) -> None:
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    try:
        argv = [*shlex.split(editor), str(path)]
        # $VISUAL/$EDITOR is the admin's own choice, as for crontab -e; no shell.
        rc = subprocess.call(argv)  # nosec B603
    except OSError as exc:
        raise UsageError(f"cannot run the editor {editor!r}: {exc.strerror}") from None
    if rc != 0:
        raise UsageError(f"the editor {editor!r} exited with {rc}; nothing was changed")


def edit(ctx: typer.Context, ref: RefArg, state: StateOpt = None) -> None:
    """Edit a resource in $EDITOR; it is applied on save if valid, else nothing changes.

    Example: EDITOR=nano dtadmin edit users/alice   (add "- require-trusted-device" under roles)
    """
    kind, name = _parse_ref(ref)
    if kind == "node":
        raise UsageError("nodes are changed with `dtadmin nodes rm` and `nodes add`")
    store = open_cluster(ctx, state).store
    original = resources.dump(_document(store, kind, name))
    fd, tmp = tempfile.mkstemp(prefix=f"dtadmin-{kind}-", suffix=".yaml")
    path = Path(tmp)
    with os.fdopen(fd, "w") as fh:
        fh.write(original)
    try:
        _run_editor(path)
        edited = path.read_text()
        if edited == original:
            console.say("No changes.")
            path.unlink()
            return
        with store.transaction():
            # Compare-and-set: the editor was open for as long as the admin liked; a
            # change someone else made meanwhile (a role removed, an unenroll) must
            # not be written over with the copy shown before it.
            if resources.dump(_document(store, kind, name)) != original:
                raise StateError(
                    f'{kind} "{name}" was changed by someone else while you edited it; '
                    "run dtadmin edit again to start from the current version"
                )
            _apply(store, kind, name, resources.load(edited))
    except DTError as exc:
        raise type(exc)(
            f"{exc.message}; nothing was changed (your edit is kept in {path})"
        ) from None
    path.unlink()
    console.say(f'{kind} "{name}" has been updated')


def _apply(store: StateStore, kind: str, name: str, doc: dict) -> None:
    who = actor()
    if kind == "user":
        roles = {r.name for r in store.list_roles()}
        user = resources.user_from_doc(doc, store.get_user(name), roles)
        with audited(
            store,
            "user.update",
            message=f'user "{name}" edited',
            user=name,
            actor=who,
            roles=list(user.roles),
        ):
            # only what the document holds: never the secrets, read a moment before
            store.set_user_roles(name, user.roles)
            store.set_user_logins(name, user.logins)
    elif kind == "role":
        if store.get_role(name).preset:
            raise UsageError(f'role "{name}" is a preset role and cannot be edited')
        role = resources.role_from_doc(doc, name)
        with audited(store, "role.update", message=f'role "{name}" edited', actor=who):
            store.put_role(role)
    else:
        current = store.get_device(name)
        users = {u.name for u in store.list_users()}
        device = resources.device_from_doc(doc, current, users)
        with store.transaction():
            if current.enrolled and not device.enrolled:
                unenroll(store, name, who, " (edited)")
                current = store.get_device(name)
            store.update_device(_merge(current, device))
            audit.record(
                store, "device.update", message=f'Device "{name}" edited', device=name, actor=who
            )


def _merge(current: Device, device: Device) -> Device:
    """Apply the editable fields onto the record as it is now (after any unenroll)."""
    return replace(
        current,
        owner=device.owner,
        profile=device.profile,
        enroll_status=device.enroll_status,
        credential=device.credential,
    )
