"""dtadmin device: the device inventory, enrollment tokens and EK trust roots."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from bastion import audit
from bastion.admin import posture_cmd
from bastion.admin.common import StateOpt, actor, audited, new_app, open_cluster
from bastion.authz.rbac import check_name
from bastion.authz.records import Device
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.durations import parse_duration
from bastion.protocol.errors import UsageError
from bastion.storage import StateStore

app = new_app("Manage the device inventory, enrollment tokens and EK trust roots.")
roots_app = new_app(
    "EK CA roots: a TPM whose EK certificate chains to one is trusted (tpm_ekcert_trusted). "
    "The TPM vendors' roots ship with dt-bastion; add your own (or a software TPM's CA, "
    "for tests) here."
)
_EK_HASH_RE = re.compile(r"[0-9a-fA-F]{64}")
app.add_typer(roots_app, name="trust-root")

OS_TYPES = ("linux", "macos", "windows")


def unenroll(store: StateStore, tag: str, who: str, reason: str = "") -> bool:
    """Mark a device not enrolled and drop its credential; False if it already was.

    Read and written in one transaction: an owner or profile change committing between
    a read outside it and this write would otherwise be reverted."""
    with store.transaction():
        device = store.get_device(tag)
        if device.enroll_status == "not_enrolled" and device.credential is None:
            return False
        store.update_device(replace(device, enroll_status="not_enrolled", credential=None))
        audit.record(
            store,
            "device.unenroll",
            message=f'Device "{tag}" unenrolled{reason}',
            device=tag,
            user=device.owner or None,
            actor=who,
        )
    return True


def _print_token(tag: str, token: str, ttl: str) -> None:
    console.say(f'Enrollment token for device "{tag}" (single use, expires in {ttl}):')
    console.say(f"  {token}")
    console.say("On the device, run this and paste the token when it asks:")
    console.say("  dtclient device enroll --token-file -")


@app.command("add")
def add(
    ctx: typer.Context,
    asset_tag: Annotated[str, typer.Option("--asset-tag", help="Serial number or asset tag.")],
    os: Annotated[str, typer.Option("--os", help="linux, macos or windows.")] = "linux",
    owner: Annotated[str | None, typer.Option("--owner", help="User the device is for.")] = None,
    enroll: Annotated[
        bool, typer.Option("--enroll", help="Also print an enrollment token.")
    ] = False,
    ttl: Annotated[str, typer.Option("--ttl", help="Token lifetime with --enroll.")] = "1h",
    ek_pub_hash: Annotated[
        str | None,
        typer.Option(
            "--ek-pub-hash",
            help="Vouch for this device's TPM: the SHA-256 (hex) of its EK public key, as a "
            "refused enrollment or `dtclient device collect` on the device shows it. "
            "Needed when its EK certificate chains to no trusted root.",
        ),
    ] = None,
    state: StateOpt = None,
) -> None:
    """Register a device in the inventory (and optionally make an enrollment token).

    Example: dtadmin device add --asset-tag PF2ABCDE --os linux --enroll
    """
    from bastion.enroll.tokens import issue_enroll_token

    check_name("asset tag", asset_tag)
    if os not in OS_TYPES:
        raise UsageError(f"invalid --os {os!r}: use one of {', '.join(OS_TYPES)}")
    if ek_pub_hash is not None and not _EK_HASH_RE.fullmatch(ek_pub_hash):
        raise UsageError("invalid --ek-pub-hash: give the 64 hex digits of the EK's SHA-256")
    store = open_cluster(ctx, state).store
    if owner:
        store.get_user(owner)
    who = actor()
    with audited(
        store,
        "device.create",
        message=f'Device "{asset_tag}"/{os} registered',
        device=asset_tag,
        actor=who,
    ):
        profile = {"ek_pub_hash": ek_pub_hash.lower()} if ek_pub_hash else {}
        store.add_device(Device("", asset_tag, os, owner=owner or "", profile=profile))
    console.say(f'Device "{asset_tag}"/{os} added to the inventory')
    if enroll:
        _print_token(
            asset_tag, issue_enroll_token(store, asset_tag, ttl=parse_duration(ttl), actor=who), ttl
        )


def read_inventory(path: Path) -> list[dict[str, str]]:
    """CSV (with a header row) or JSON (a list of objects) of devices to register."""
    import csv
    import io
    import json

    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".json" or text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
    except (ValueError, csv.Error) as exc:
        raise UsageError(f"{path} is neither valid CSV nor JSON: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UsageError(f"{path}: expected a list of devices")
    out = []
    for i, row in enumerate(rows, 1):
        row = {str(k).strip(): str(v).strip() for k, v in row.items() if v not in (None, "")}
        unknown = set(row) - {
            "asset_tag",
            "os",
            "os_type",
            "system_serial",
            "board_serial",
            "machine_id",
            "owner",
        }
        if unknown:
            raise UsageError(f"{path} row {i}: unknown column {sorted(unknown)[0]!r}")
        if "asset_tag" not in row:
            raise UsageError(f"{path} row {i}: asset_tag is required")
        check_name("asset tag", row["asset_tag"])
        row["os_type"] = row.pop("os", row.get("os_type", "linux"))
        if row["os_type"] not in OS_TYPES:
            raise UsageError(f"{path} row {i}: invalid os {row['os_type']!r}")
        out.append(row)
    return out


@app.command("import")
def import_(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV or JSON: asset_tag, os, system_serial, board_serial, machine_id, owner."
        ),
    ],
    state: StateOpt = None,
) -> None:
    """Register devices from an inventory, with a profile for auto-enrollment.

    With `dtadmin cluster set auto-enroll on`, such a device enrolls without a token
    when what it reports matches its profile. The whole file is applied or nothing.
    """
    rows = read_inventory(file)
    store = open_cluster(ctx, state).store
    who = actor()
    created = updated = 0
    with store.transaction():
        for row in rows:
            owner = row.get("owner", "")
            if owner:
                store.get_user(owner)
            profile = {k: v for k, v in row.items() if k != "asset_tag"}
            current = store.find_device(row["asset_tag"])
            if current is None:
                store.add_device(
                    Device("", row["asset_tag"], row["os_type"], owner=owner, profile=profile)
                )
                created += 1
            else:
                store.update_device(replace(current, profile=profile, owner=owner or current.owner))
                updated += 1
        audit.record(
            store,
            "device.create",
            message=f"inventory imported from {file.name}",
            actor=who,
            created=created,
            updated=updated,
        )
    console.say(f"imported {len(rows)} device(s): {created} new, {updated} updated")


@app.command("enroll-token")
def enroll_token(
    ctx: typer.Context,
    asset_tag: Annotated[str, typer.Argument(help="The device's asset tag.")],
    ttl: Annotated[str, typer.Option("--ttl", help="Token lifetime.")] = "1h",
    state: StateOpt = None,
) -> None:
    """Make a single-use enrollment token bound to one device."""
    from bastion.enroll.tokens import issue_enroll_token

    store = open_cluster(ctx, state).store
    _print_token(
        asset_tag, issue_enroll_token(store, asset_tag, ttl=parse_duration(ttl), actor=actor()), ttl
    )


@app.command("ls")
def ls(
    ctx: typer.Context,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """List devices."""
    from bastion.resources import device_doc

    devices = open_cluster(ctx, state).store.list_devices()
    console.emit(
        fmt,
        [device_doc(d) for d in devices],
        ["Asset tag", "OS", "Enroll status", "Owner", "Attestation", "Device ID"],
        [
            (
                d.asset_tag,
                d.os_type,
                d.enroll_status,
                d.owner,
                d.credential.attestation_type if d.credential else "",
                d.id,
            )
            for d in devices
        ],
        empty="(no devices)",
    )


@app.command("unenroll")
def unenroll_cmd(
    ctx: typer.Context,
    asset_tag: Annotated[str, typer.Argument(help="The device to unenroll.")],
    state: StateOpt = None,
) -> None:
    """Unenroll a device: its certificates stop working at once, live sessions are cut."""
    store = open_cluster(ctx, state).store
    if unenroll(store, asset_tag, actor()):
        console.say(f'Device "{asset_tag}" unenrolled')
    else:
        console.note(f'Device "{asset_tag}" was not enrolled; nothing changed')


@app.command("rm")
def rm(
    ctx: typer.Context,
    asset_tag: Annotated[str, typer.Argument(help="The device to remove.")],
    state: StateOpt = None,
) -> None:
    """Remove a device from the inventory (and with it its enrollment)."""
    store = open_cluster(ctx, state).store
    with audited(
        store,
        "device.delete",
        message=f'Device "{asset_tag}" removed',
        device=asset_tag,
        actor=actor(),
    ):
        store.remove_device(asset_tag)
    console.say(f'Device "{asset_tag}" removed')


# dtadmin device posture [show|approve] TAG (bastion.admin.posture_cmd)
app.command("posture")(posture_cmd.device_posture)


@roots_app.command("add")
def root_add(
    ctx: typer.Context,
    pem: Annotated[Path, typer.Argument(help="PEM file with one EK CA certificate.")],
    state: StateOpt = None,
) -> None:
    """Trust an EK CA root beside the shipped vendor roots (e.g. your fleet's own EK CA)."""
    from cryptography.hazmat.primitives import hashes

    from bastion.enroll.attest import parse_trust_root

    try:
        data = pem.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {pem}: {exc.strerror}") from None
    cert = parse_trust_root(data)
    fp = cert.fingerprint(hashes.SHA256()).hex()
    store = open_cluster(ctx, state).store
    with audited(
        store, "trustroot.create", message="EK trust root added", actor=actor(), fingerprint=fp
    ):
        store.add_trust_root(fp, cert.subject.rfc4514_string(), data.decode())
    console.say(f"trust root added: {cert.subject.rfc4514_string()} (sha256 {fp[:16]}...)")


@roots_app.command("ls")
def root_ls(
    ctx: typer.Context,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """List EK trust roots."""
    roots = open_cluster(ctx, state).store.list_trust_roots()
    console.emit(
        fmt,
        [{k: r[k] for k in ("fingerprint", "subject")} for r in roots],
        ["SHA-256", "Subject"],
        [(r["fingerprint"], r["subject"]) for r in roots],
        empty="(none added: only the TPM vendors' roots that ship with dt-bastion are trusted)",
    )


@roots_app.command("rm")
def root_rm(
    ctx: typer.Context,
    fingerprint: Annotated[str, typer.Argument(help="SHA-256 fingerprint from `trust-root ls`.")],
    state: StateOpt = None,
) -> None:
    """Stop trusting an EK CA root."""
    store = open_cluster(ctx, state).store
    with audited(
        store,
        "trustroot.delete",
        message="EK trust root removed",
        actor=actor(),
        fingerprint=fingerprint,
    ):
        store.remove_trust_root(fingerprint)
    console.say("trust root removed")
