"""dtadmin posture: the cluster's posture policy; dtadmin device posture: one device's.

The cluster policy is the setting ``posture_policy``, stored in its document form
(``bastion.authz.posture.policy_doc``) and read back by ``StateStore.facts`` for every
decision. A device's posture (``bastion.storage.posture``) is what its last quote and
boot log showed, the baseline that is compared with, the verdict and, where a role asks
for it, until when its continuous attestation holds.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion import audit, resources
from bastion.admin.common import StateOpt, actor, audited, new_app, open_cluster
from bastion.authz import posture
from bastion.authz.records import POSTURE_PCRS, Device, DevicePosture, Measurement, PosturePolicy
from bastion.protocol import console
from bastion.protocol.console import Format
from bastion.protocol.errors import Conflict, StateError, UsageError
from bastion.storage import StateStore

app = new_app(
    "The cluster's posture policy: what a device's measured boot must show "
    "(Secure Boot, boot chains, kernel command line, PCR values, the enrollment baseline)."
)

SETTING = "posture_policy"


def cluster_policy(store: StateStore) -> PosturePolicy | None:
    """The cluster's policy as stored; None when none is set. StateError for one the
    database holds but that does not read (every device is denied until it is fixed)."""
    fix = "set a new one (dtadmin posture set -f FILE) or remove it (dtadmin posture clear)"
    try:
        raw = store.get_setting(SETTING)
    except StateError:
        raise StateError(
            f"the cluster's posture policy is corrupt in the database; {fix}"
        ) from None
    if raw is None:
        return None
    try:
        return posture.policy_from_doc(raw, SETTING)
    except UsageError as exc:
        raise StateError(
            f"the cluster's posture policy does not read ({exc.message}); {fix}"
        ) from None


@app.command("show")
def show(
    ctx: typer.Context,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """Print the cluster's posture policy as a `kind: posture` document.

    What it prints, `dtadmin posture set -f` reads back. spec is null when no policy
    is set (then only the roles' own posture policies apply).
    """
    policy = cluster_policy(open_cluster(ctx, state).store)
    doc = resources.posture_doc(policy)
    if policy is None:
        console.note("no cluster posture policy is set (dtadmin posture set -f FILE)")
    if fmt is Format.json:
        console.print_json(doc)
    else:
        console.say(resources.dump(doc).rstrip("\n"))


@app.command("set")
def set_(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Option("-f", "--file", help="Policy YAML (kind: posture); - for stdin.")
    ],
    state: StateOpt = None,
) -> None:
    """Set the cluster's posture policy from a YAML (or JSON) document.

    Every device login and enrollment is then checked against it (and against the
    posture policies of the user's roles, spec.options.posture). Example:

    \b
      kind: posture
      version: v1
      spec:
        secure_boot: true
        baseline: true
        on_failure: withhold    # deny | withhold | warn

    docs/posture.md lists every field.
    """
    policy = resources.posture_from_doc(resources.load(_read(file)))
    doc = posture.policy_doc(policy)
    store = open_cluster(ctx, state).store
    with audited(
        store, "posture.policy", message="cluster posture policy set", actor=actor(), policy=doc
    ):
        store.set_setting(SETTING, doc)
    console.say("cluster posture policy set:")
    console.say(resources.dump(doc).rstrip("\n"))
    if not (policy.checks or policy.attest_interval):
        console.note("this policy checks nothing: every device passes it")


@app.command("clear")
def clear(ctx: typer.Context, state: StateOpt = None) -> None:
    """Remove the cluster's posture policy (roles' own posture policies still apply)."""
    store = open_cluster(ctx, state).store
    try:
        was = store.get_setting(SETTING)
    except StateError:
        was = "corrupt"  # removing a policy that does not read is the fix
    if was is None:
        console.note("no cluster posture policy was set; nothing changed")
        return
    with audited(store, "posture.policy", message="cluster posture policy removed", actor=actor()):
        store.set_setting(SETTING, None)
    console.say("cluster posture policy removed")


def _read(file: Path) -> str:
    import sys

    if str(file) == "-":
        return sys.stdin.read()
    try:
        return file.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{file} is not a text (YAML) file") from None


# -- one device: dtadmin device posture [show|approve] TAG ---------------------------------------

ACTIONS = ("show", "approve")


def device_posture(
    ctx: typer.Context,
    action_or_tag: Annotated[
        str | None,
        typer.Argument(
            metavar="show|approve",
            help="What to do: show (the default, may be left out) or approve.",
            show_default=False,
        ),
    ] = None,
    tag: Annotated[
        str | None,
        typer.Argument(metavar="TAG", help="The device's asset tag.", show_default=False),
    ] = None,
    expect: Annotated[
        str | None,
        typer.Option(
            "--expect",
            metavar="FINGERPRINT",
            help="approve: only the measurement with this fingerprint (the one "
            "`dtadmin device posture TAG` showed); refused if the device measured "
            "anything else since.",
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.text,
    state: StateOpt = None,
) -> None:
    """Show a device's measured boot posture, or approve its new baseline.

    \b
      dtadmin device posture TAG           measured state, baseline, drift, verdict
                                           and continuous attestation
      dtadmin device posture show TAG      the same
      dtadmin device posture approve TAG --expect FINGERPRINT
                                           accept the measurement you reviewed as
                                           its new baseline (after a legitimate
                                           firmware, boot loader or kernel update)

    show prints the fingerprint of the last measurement and the approve command for
    it: with --expect, approve refuses (exit 4) if the device has measured a different
    boot since (a tampered login between your review and the approval). Without
    --expect it approves whatever was measured last.

    Approving is audited (posture.approve) and makes the verdict pass until the
    device's next login measures it again.
    """
    if action_or_tag is None:
        raise UsageError("give the device's asset tag: dtadmin device posture [show|approve] TAG")
    if tag is None:
        if action_or_tag in ACTIONS:
            raise UsageError(
                f"give the device: dtadmin device posture {action_or_tag} TAG "
                f"(for a device tagged {action_or_tag!r}: dtadmin device posture show "
                f"{action_or_tag})"
            )
        action, tag = "show", action_or_tag
    elif action_or_tag in ACTIONS:
        action = action_or_tag
    else:
        raise UsageError(
            f"unknown action {action_or_tag!r}: use dtadmin device posture [show|approve] TAG"
        )
    if expect is not None and action != "approve":
        raise UsageError("--expect is for approve: dtadmin device posture approve TAG --expect FP")
    store = open_cluster(ctx, state).store
    if action == "approve":
        device, approved = approve(store, tag, actor(), expect=expect)
        if fmt is Format.json:
            console.print_json(posture_report(device, approved, time.time()))
        else:
            fp = measurement_fingerprint(approved.measured) if approved.measured else "?"
            console.say(
                f'device "{tag}": its last measurement ({fp}) is now its baseline (verdict pass)'
            )
        return
    with store.read_transaction():
        device = store.get_device(tag)
        record = store.find_device_posture(device.id)
    report = posture_report(device, record, time.time())
    if fmt is Format.json:
        console.print_json(report)
    else:
        _print_report(report)


def measurement_fingerprint(m: Measurement) -> str:
    """A short name for what a measurement shows (its PCRs and what the log proved),
    for ``approve --expect``: the same boot measured again has the same one; when it
    was measured, and notes about the log, do not count."""
    body = {
        "pcrs": {str(i): v.lower() for i, v in sorted(m.pcrs.items())},
        "log": m.log,
        "secure_boot": m.secure_boot,
        "boot_chain": list(m.boot_chain),
        "cmdlines": list(m.cmdlines),
        "kernel_files": list(m.kernel_files),
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(b"dt-bastion measurement\0" + canonical).hexdigest()[:FINGERPRINT_HEX]


FINGERPRINT_HEX = 32  # 128 bits: a boot crafted to share a reviewed one's is out of reach


def approve_command(tag: str, m: Measurement) -> str:
    return (
        f"dtadmin device posture approve {shlex.quote(tag)} --expect {measurement_fingerprint(m)}"
    )


def approve(
    store: StateStore, tag: str, who: str, *, expect: str | None = None
) -> tuple[Device, DevicePosture]:
    """Baseline := the last measurement, verdict pass, in one transaction with its
    audit event. Conflict when the device has measured nothing yet, or (``expect``)
    when the last measurement is not the one with that fingerprint: checked in the
    transaction that writes, so a login measuring a different boot meanwhile is not
    approved unseen."""
    now = time.time()
    with store.transaction():
        device = store.get_device(tag)
        record = store.find_device_posture(device.id)
        if record is None or record.measured is None:
            raise Conflict(
                f'device "{tag}" has no measured boot yet: it is measured at enrollment and '
                "at each device login (dtclient login); approve after that"
            )
        fingerprint = measurement_fingerprint(record.measured)
        if expect is not None and expect.strip().lower() != fingerprint:
            raise Conflict(
                f'device "{tag}" last measured a boot with fingerprint {fingerprint}, not '
                f"{expect.strip()[:80]}: it measured again since you reviewed it; review it "
                f"again (dtadmin device posture {shlex.quote(tag)}) before approving"
            )
        changed = _drift(record)
        new = replace(
            record,
            baseline=record.measured,
            baseline_time=now,
            baseline_by=who,
            verdict="pass",
            reasons=(),
        )
        store.put_device_posture(new)
        audit.record(
            store,
            "posture.approve",
            message=f'Device "{tag}": new posture baseline approved',
            device=tag,
            user=device.owner or None,
            actor=who,
            previous=record.verdict,
            drift=changed,
            fingerprint=fingerprint,
            expected=expect is not None,
            now=now,
        )
    return device, new


def _drift(record: DevicePosture) -> list[str]:
    if record.baseline is None or record.measured is None:
        return []
    pcrs = tuple(sorted(set(POSTURE_PCRS) | set(record.baseline.pcrs) | set(record.measured.pcrs)))
    by = record.baseline_by
    since = "since enrollment" if by in ("", "enrollment") else f"since {by} approved the baseline"
    return posture.drift(record.baseline, record.measured, pcrs, since=since)


def _measurement(m: Measurement | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {
        "time": console.rfc3339(m.time or None),
        "log": m.log,
        "log_note": m.log_note or None,
        "secure_boot": m.secure_boot,
        "boot_chain": list(m.boot_chain),
        "kernel_files": list(m.kernel_files),
        "cmdlines": list(m.cmdlines),
        "pcrs": {str(i): v for i, v in sorted(m.pcrs.items())},
        "fingerprint": measurement_fingerprint(m),
    }


def posture_report(device: Device, record: DevicePosture | None, now: float) -> dict[str, Any]:
    """What `dtadmin device posture TAG --format json` prints."""
    record = record or DevicePosture(device.id)
    baseline = _measurement(record.baseline)
    if baseline is not None:
        baseline["approved"] = console.rfc3339(record.baseline_time or None)
        baseline["by"] = record.baseline_by or None
    until = record.attested_until
    return {
        "asset_tag": device.asset_tag,
        "device_id": device.id,
        "enroll_status": device.enroll_status,
        "owner": device.owner or None,
        "verdict": record.verdict,
        "failed": record.failed,
        "reasons": list(record.reasons),
        "measured": _measurement(record.measured),
        "approve_command": None
        if record.measured is None
        else approve_command(device.asset_tag, record.measured),
        "baseline": baseline,
        "drift": _drift(record),
        "attestation": {
            "attested_until": console.rfc3339(until) if until else None,
            "current": bool(until and until > now),
            "failure": record.attest_failure or None,
        },
    }


def _on(value: bool | None) -> str:
    return "unknown (the log does not say)" if value is None else ("on" if value else "off")


def _print_report(r: dict[str, Any]) -> None:
    m, b, att = r["measured"], r["baseline"], r["attestation"]
    rows: list[tuple[str, str]] = [
        ("Device", f"{r['asset_tag']} ({r['enroll_status']})"),
        ("Device ID", r["device_id"]),
        ("Verdict", r["verdict"]),
    ]
    rows += [("Reason", reason) for reason in r["reasons"]]
    if m is None:
        rows.append(("Measured", "never (measured at enrollment and at each device login)"))
    else:
        log = m["log"] + (f": {m['log_note']}" if m["log_note"] else "")
        rows += [("Measured", m["time"] or "?"), ("Fingerprint", m["fingerprint"])]
        rows.append(("Event log", log))
        rows.append(("Secure Boot", _on(m["secure_boot"]) if m["log"] == "replayed" else "-"))
    if b is None:
        rows.append(("Baseline", "none recorded"))
    else:
        rows.append(("Baseline", f"{b['approved'] or '?'} by {b['by'] or '?'}"))
    rows += [("Drift", line) for line in r["drift"]] or [("Drift", "none" if b and m else "-")]
    if att["failure"]:
        rows.append(("Attestation", f"failed: {att['failure']}"))
    elif att["attested_until"]:
        state = "until" if att["current"] else "expired at"
        rows.append(("Attestation", f"attested {state} {att['attested_until']}"))
    else:
        rows.append(("Attestation", "not attesting"))
    console.print_table(["", "Posture"], rows, title=f"Device {r['asset_tag']}")
    if m is None and b is None:
        return
    _print_boot(m, b)
    if r["approve_command"]:
        console.say(f"To make this measurement the baseline: {r['approve_command']}")


def _print_boot(m: dict[str, Any] | None, b: dict[str, Any] | None) -> None:
    measured = m or {}
    base = b or {}
    names = ("shim", "boot loader", "kernel")
    chain_m, chain_b = measured.get("boot_chain", []), base.get("boot_chain", [])
    rows = [
        (
            str(i + 1),
            names[i] if i < len(names) else "",
            chain_m[i] if i < len(chain_m) else "",
            _same(
                chain_m[i] if i < len(chain_m) else None,
                chain_b[i] if i < len(chain_b) else None,
            ),
        )
        for i in range(max(len(chain_m), len(chain_b)))
    ]
    files_b = base.get("kernel_files", [])
    rows += [
        ("", "kernel file (PCR 9)", f, "same" if f in files_b else "")
        for f in measured.get("kernel_files", [])
    ]
    console.print_table(
        ["#", "Boot application", "Measured (SHA-256)", "Baseline"],
        rows,
        title="Boot chain (PCR 4; kernel files PCR 9)",
        empty="(no boot chain: the event log was not replayed)",
    )
    lines = [("measured", line) for line in measured.get("cmdlines", [])]
    lines += [
        ("baseline", line)
        for line in base.get("cmdlines", [])
        if line not in measured.get("cmdlines", [])
    ]
    console.print_table(
        ["", "Kernel command line (PCR 8)"], lines, empty="(no kernel command line measured)"
    )
    pcrs_m, pcrs_b = measured.get("pcrs", {}), base.get("pcrs", {})
    keys = sorted({*pcrs_m, *pcrs_b}, key=int)
    console.print_table(
        ["PCR", "Measures", "Measured (SHA-256)", "Baseline"],
        [
            (
                k,
                posture.PCR_MEANING.get(int(k), ""),
                pcrs_m.get(k, ""),
                _same(pcrs_m.get(k), pcrs_b.get(k)),
            )
            for k in keys
        ],
        title="PCR values",
        empty="(no PCRs quoted)",
    )


def _same(now: str | None, was: str | None) -> str:
    """The baseline column: "same", the baseline's value where it differs, or blank."""
    if was is None:
        return ""
    return "same" if now == was else was
