"""Device posture: does a device's measured boot satisfy the policies that apply now?

Pure, like the rest of the core: the shells measure a quote and its event log
(``bastion.enroll.measured``), read the facts and pass ``now``; this module decides.

Policies come from two places: the cluster's (setting ``posture_policy``) and each of
the user's roles (``spec.options.posture``). Each is decided on its own; a failing one
costs what its ``on_failure`` says, and the strictest cost wins (deny > withhold >
warn). A cluster policy that cannot be read fails every device, with ``deny``: a
policy the bastion cannot read must not read as "no policy".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bastion.authz.facts import Facts
from bastion.authz.records import (
    POSTURE_ACTIONS,
    POSTURE_PCRS,
    RESETTABLE_PCRS,
    BootChain,
    Measurement,
    PosturePolicy,
)
from bastion.protocol.durations import format_duration, parse_duration
from bastion.protocol.errors import DeviceNotTrusted, UsageError

HEX64 = re.compile(r"^[0-9a-f]{64}$")
FIELDS = {
    "secure_boot",
    "boot_chains",
    "kernel_cmdline",
    "pcrs",
    "baseline",
    "baseline_pcrs",
    "on_failure",
    "attest_interval",
    "attest_grace",
}
CHAIN_FIELDS = ("shim", "bootloader", "kernel")
CHAIN_NAMES = {"shim": "shim", "bootloader": "boot loader", "kernel": "kernel"}
MIN_ATTEST_INTERVAL = 1
MAX_LINES = 3  # command lines named in one verdict's reasons
# What each PCR measures (TCG PC Client Platform Firmware Profile; shim and grub), for
# the reasons people read: "PCR 4 changed since enrollment: boot loader differs".
PCR_MEANING = {
    0: "firmware code",
    1: "firmware settings",
    2: "option ROM code",
    3: "option ROM settings",
    4: "boot loader",
    5: "boot loader settings or partition table",
    6: "platform state",
    7: "Secure Boot state or keys",
    8: "kernel command line",
    9: "kernel or initrd files",
    14: "shim's MOK list",
}
UNREADABLE = "the cluster's posture policy cannot be read (see: dtadmin posture show)"
ACTION_RANK = {action: rank for rank, action in enumerate(POSTURE_ACTIONS)}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a measurement means under the policies that apply: ``status`` is ``pass``,
    ``warn``, ``withhold``, ``deny`` or ``unchecked`` (no policy looks at the boot), with
    the reasons a person reads."""

    status: str
    reasons: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return self.status in ("withhold", "deny")

    @property
    def extension(self) -> str | None:
        """The certificate's posture extension value; None: no device extensions."""
        return None if self.failed else self.status

    @property
    def message(self) -> str:
        return "; ".join(self.reasons)


# -- the policy document --------------------------------------------------------------------


def policy_from_doc(doc: object, where: str = "posture") -> PosturePolicy:
    """A policy from its YAML/JSON mapping; UsageError naming the field for anything
    else. Every check is optional; an empty mapping is a policy that checks nothing."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise UsageError(f"{where} must be a mapping of posture checks")
    unknown = sorted(str(k) for k in doc if k not in FIELDS)
    if unknown:
        raise UsageError(
            f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(FIELDS))})"
        )
    on_failure = doc.get("on_failure", "withhold")
    if on_failure not in POSTURE_ACTIONS:
        raise UsageError(f"{where}.on_failure must be one of {', '.join(POSTURE_ACTIONS)}")
    cmdline = doc.get("kernel_cmdline")
    if cmdline is not None:
        if not isinstance(cmdline, str) or not cmdline:
            raise UsageError(f"{where}.kernel_cmdline must be a regular expression")
        try:
            re.compile(cmdline)
        except re.error as exc:
            raise UsageError(
                f"{where}.kernel_cmdline is not a valid regular expression: {exc}"
            ) from None
    interval = _seconds(f"{where}.attest_interval", doc.get("attest_interval"))
    grace = _seconds(f"{where}.attest_grace", doc.get("attest_grace"))
    if interval and interval < MIN_ATTEST_INTERVAL:
        raise UsageError(f"{where}.attest_interval must be at least {MIN_ATTEST_INTERVAL}s")
    if grace and not interval:
        raise UsageError(f"{where}.attest_grace needs attest_interval")
    return PosturePolicy(
        secure_boot=_flag(f"{where}.secure_boot", doc.get("secure_boot", False)),
        boot_chains=_chains(f"{where}.boot_chains", doc.get("boot_chains")),
        kernel_cmdline=cmdline,
        pcrs=_pcr_values(f"{where}.pcrs", doc.get("pcrs")),
        baseline=_flag(f"{where}.baseline", doc.get("baseline", False)),
        baseline_pcrs=_pcr_list(f"{where}.baseline_pcrs", doc.get("baseline_pcrs", POSTURE_PCRS)),
        on_failure=on_failure,
        attest_interval=interval,
        attest_grace=grace or (2 * interval if interval else 0),
    )


def policy_doc(policy: PosturePolicy) -> dict[str, Any]:
    """The mapping :func:`policy_from_doc` reads back to the same policy (only what
    is set, so a printed policy is short)."""
    doc: dict[str, Any] = {}
    if policy.secure_boot:
        doc["secure_boot"] = True
    if policy.boot_chains:
        doc["boot_chains"] = [
            {k: v for k, v in (("name", c.name), *((f, getattr(c, f)) for f in CHAIN_FIELDS)) if v}
            for c in policy.boot_chains
        ]
    if policy.kernel_cmdline is not None:
        doc["kernel_cmdline"] = policy.kernel_cmdline
    if policy.pcrs:
        doc["pcrs"] = {int(k): v for k, v in sorted(policy.pcrs.items())}
    if policy.baseline:
        doc["baseline"] = True
    if tuple(policy.baseline_pcrs) != POSTURE_PCRS:
        doc["baseline_pcrs"] = list(policy.baseline_pcrs)
    doc["on_failure"] = policy.on_failure
    if policy.attest_interval:
        doc["attest_interval"] = format_duration(policy.attest_interval)
        doc["attest_grace"] = format_duration(policy.attest_grace)
    return doc


def _flag(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{where} must be true or false")
    return value


def _seconds(where: str, value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, bool):
        raise UsageError(f"{where} must be a duration such as 30s")
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"{where} must not be negative")
        return value
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc.message}") from None
    raise UsageError(f"{where} must be a duration such as 30s")


def _digest(where: str, value: object) -> str:
    if not isinstance(value, str) or not HEX64.fullmatch(value.lower()):
        raise UsageError(f"{where} must be a SHA-256 digest (64 hex digits)")
    return value.lower()


def _pcr(where: str, value: object) -> int:
    try:
        index = int(value)  # type: ignore[call-overload]  # YAML keys may come as strings
    except (TypeError, ValueError):
        raise UsageError(f"{where}: {value!r} is not a PCR number") from None
    if isinstance(value, bool) or not 0 <= index <= 23:
        raise UsageError(f"{where}: PCR {value!r} is not between 0 and 23")
    if index in RESETTABLE_PCRS:
        raise UsageError(
            f"{where}: PCR {index} can be reset by software, so it proves nothing about the boot"
        )
    return index


def _pcr_values(where: str, value: object) -> dict[int, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where} must map PCR numbers to SHA-256 values")
    return {_pcr(where, k): _digest(f"{where}.{k}", v) for k, v in value.items()}


def _pcr_list(where: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise UsageError(f"{where} must be a list of PCR numbers")
    return tuple(sorted({_pcr(where, v) for v in value}))


def _chains(where: str, value: object) -> tuple[BootChain, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise UsageError(f"{where} must be a list of boot chains")
    chains = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise UsageError(f"{at} must be a mapping with shim, bootloader and/or kernel")
        unknown = sorted(str(k) for k in item if k not in ("name", *CHAIN_FIELDS))
        if unknown:
            raise UsageError(f"{at}: unknown field(s) {', '.join(unknown)}")
        parts = {f: _digest(f"{at}.{f}", item[f]) for f in CHAIN_FIELDS if item.get(f) is not None}
        if not parts:
            raise UsageError(f"{at} names no digest (shim, bootloader, kernel)")
        chains.append(BootChain(name=str(item.get("name") or ""), **parts))
    return tuple(chains)


# -- which policies apply ------------------------------------------------------------------


def _policies(facts: Facts) -> list[tuple[str, PosturePolicy | None]]:
    """The cluster's and the roles' policies; None for a cluster policy that does not
    parse. Roles that cannot be read grant nothing anyway (decide.known_roles)."""
    found: list[tuple[str, PosturePolicy | None]] = []
    raw = facts.cluster_posture
    if isinstance(raw, PosturePolicy):
        found.append(("cluster", raw))
    elif raw is not None:
        try:
            found.append(("cluster", policy_from_doc(raw, "posture_policy")))
        except UsageError:
            found.append(("cluster", None))
    for role in facts.roles:
        if role is not None and role.posture is not None:
            found.append((f"role {role.name}", role.posture))
    return found


def applicable(facts: Facts) -> list[tuple[str, PosturePolicy]]:
    """The policies that ask anything of a device (a check, or continuous attestation);
    an unreadable cluster policy comes back as one that denies every device."""
    out = []
    for name, policy in _policies(facts):
        if policy is None:
            out.append((name, _UNREADABLE_POLICY))
        elif policy.checks or policy.attest_interval:
            out.append((name, policy))
    return out


_UNREADABLE_POLICY = PosturePolicy(baseline=True, on_failure="deny")


def pcr_selection(facts: Facts) -> tuple[int, ...]:
    """The SHA-256 PCRs a device quotes: always the boot PCRs (so a baseline exists the
    day a policy starts to use it), plus any a policy names."""
    wanted = set(POSTURE_PCRS)
    for _, policy in applicable(facts):
        wanted.update(policy.pcrs)
        wanted.update(policy.baseline_pcrs if policy.baseline else ())
    return tuple(sorted(wanted))


def _needs_log(policy: PosturePolicy) -> bool:
    return bool(policy.secure_boot or policy.boot_chains or policy.kernel_cmdline)


def needs_log(facts: Facts) -> bool:
    """Ask the client for the boot event log? When a policy checks the boot at all:
    what the log says is only read for Secure Boot, boot chains and the command line,
    but it also lets a baseline's drift be explained event by event."""
    return any(policy.checks for _, policy in applicable(facts))


# -- the verdict -----------------------------------------------------------------------------


def evaluate(facts: Facts, measured: Measurement, baseline: Measurement | None) -> Verdict:
    """The verdict on ``measured``. ``baseline`` is the device's recorded baseline (None
    at enrollment, where the measurement becomes the baseline, so it cannot drift)."""
    return _evaluate(applicable(facts), measured, baseline)


def _evaluate(
    policies: list[tuple[str, PosturePolicy]], measured: Measurement, baseline: Measurement | None
) -> Verdict:
    worst: str | None = None
    reasons: list[str] = []
    any_check = False
    for name, policy in policies:
        if not policy.checks:
            continue
        any_check = True
        failures = (
            [UNREADABLE] if policy is _UNREADABLE_POLICY else _failures(policy, measured, baseline)
        )
        if not failures:
            continue
        reasons += [f"{r} ({name} posture policy)" for r in failures]
        if worst is None or ACTION_RANK[policy.on_failure] > ACTION_RANK[worst]:
            worst = policy.on_failure
    if not any_check:
        return Verdict("unchecked")
    return Verdict(worst or "pass", tuple(reasons))


def _failures(
    policy: PosturePolicy, measured: Measurement, baseline: Measurement | None
) -> list[str]:
    out: list[str] = []
    if _needs_log(policy) and not measured.trusted_log:
        what = [
            label
            for label, wanted in (
                ("Secure Boot", policy.secure_boot),
                ("the boot chain", bool(policy.boot_chains)),
                ("the kernel command line", bool(policy.kernel_cmdline)),
            )
            if wanted
        ]
        out.append(f"{' and '.join(what)} cannot be checked: {measured.log_note or 'no log'}")
    else:
        if policy.secure_boot and measured.secure_boot is not True:
            out.append(
                "Secure Boot is off"
                if measured.secure_boot is False
                else "the boot event log does not say whether Secure Boot was on"
            )
        if policy.boot_chains:
            out += _chain_failures(policy.boot_chains, measured)
        if policy.kernel_cmdline:
            out += _cmdline_failures(policy.kernel_cmdline, measured)
    for index, wanted in sorted(policy.pcrs.items()):
        have = measured.pcrs.get(index)
        if have != wanted:
            out.append(
                f"PCR {index} is not the value the policy requires: "
                f"{_differ(PCR_MEANING.get(index, 'its measurements'))}"
            )
    if policy.baseline and baseline is not None:
        # A PCR the baseline lacks (quoted as the client chose, before any policy named
        # a selection) is not "unchanged": an admin approves a baseline that has it.
        lacking = [i for i in policy.baseline_pcrs if i not in baseline.pcrs]
        if lacking:
            out.append(
                f"the baseline has no value for PCR {', '.join(map(str, lacking))} "
                "(an admin approves this boot as the baseline)"
            )
        out += drift(baseline, measured, policy.baseline_pcrs)
    return out


def _chain_failures(chains: tuple[BootChain, ...], measured: Measurement) -> list[str]:
    """None when some allowed chain matches; else which part differs from the closest
    one (shim, boot loader or kernel), with the measured digest's first hex digits.

    The kernel is judged by PCR 4 alone: every image started after the boot loader must
    be the chain's kernel. An image appended after boot (root on the device can extend
    PCR 4) is one more image that must match, so it cannot hide the one that booted. A
    kernel grub read itself is only a PCR 9 file measurement, whose name is not covered
    by its digest: any file there could be the kernel, so no kernel digest is matched
    there (pin PCR 9 with ``baseline`` or ``pcrs`` instead)."""
    chain = measured.boot_chain
    have = {
        "shim": chain[0] if len(chain) > 0 else None,
        "bootloader": chain[1] if len(chain) > 1 else None,
    }
    kernels = chain[2:]
    best: list[str] | None = None
    for allowed in chains:
        differs = []
        for part in CHAIN_FIELDS:
            wanted = getattr(allowed, part)
            if wanted is None:
                continue
            if part == "kernel":
                ok = bool(kernels) and all(k == wanted for k in kernels)
            else:
                ok = have[part] == wanted
            if not ok:
                differs.append(part)
        if not differs:
            return []
        if best is None or len(differs) < len(best):
            best = differs
    assert best is not None
    parts = []
    for part in best:
        if part == "kernel":
            if not kernels:
                return [
                    "the boot chain cannot be checked: the kernel was not started as a UEFI "
                    "application (PCR 4), and a kernel file grub read (PCR 9) is not bound "
                    "to its name; pin PCR 9 with baseline or pcrs instead"
                ]
            shown = ", ".join(k[:12] for k in kernels[:MAX_LINES])
            parts.append(f"kernel {shown}")
        else:
            value = have[part]
            parts.append(f"{CHAIN_NAMES[part]} {value[:12] if value else '(not measured)'}")
    return [f"the boot chain is not an allowed one: {', '.join(parts)} differs"]


def _cmdline_failures(pattern: str, measured: Measurement) -> list[str]:
    if not measured.cmdlines:
        return ["no kernel command line was measured (PCR 8), so kernel_cmdline cannot match"]
    regex = re.compile(pattern)
    bad = [line for line in measured.cmdlines if regex.fullmatch(line) is None]
    out = [f"kernel command line not allowed: {_clip(line)!r}" for line in bad[:MAX_LINES]]
    if len(bad) > MAX_LINES:  # a device's own extends must not make one login cost MBs
        out.append(f"and {len(bad) - MAX_LINES} more kernel command lines not allowed")
    return out


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def drift(
    baseline: Measurement,
    measured: Measurement,
    pcrs: tuple[int, ...] = POSTURE_PCRS,
    *,
    since: str = "since enrollment",
) -> list[str]:
    """Each PCR of ``pcrs`` that differs from the baseline, said the way a person reads
    it ("PCR 4 changed since enrollment: boot loader differs"), with what the two logs
    show when both replayed. A PCR either side lacks is not compared."""
    out = []
    for index in pcrs:
        was, now = baseline.pcrs.get(index), measured.pcrs.get(index)
        if was is None or now is None or was == now:
            continue
        detail = _detail(index, baseline, measured)
        meaning = PCR_MEANING.get(index, "its measurements")
        out.append(f"PCR {index} changed {since}: {detail or _differ(meaning)}")
    return out


def _detail(index: int, was: Measurement, now: Measurement) -> str:
    if not (was.trusted_log and now.trusted_log):
        return ""
    if index == 4:
        names = ("shim", "boot loader", "kernel")
        for i in range(max(len(was.boot_chain), len(now.boot_chain))):
            a = was.boot_chain[i] if i < len(was.boot_chain) else None
            b = now.boot_chain[i] if i < len(now.boot_chain) else None
            if a != b:
                name = names[i] if i < len(names) else f"boot application {i + 1}"
                return f"{name} differs (was {(a or 'none')[:12]}, now {(b or 'none')[:12]})"
    if index == 7 and was.secure_boot != now.secure_boot:
        return f"Secure Boot was {_on(was.secure_boot)}, now {_on(now.secure_boot)}"
    if index == 8 and was.cmdlines != now.cmdlines:
        line = now.cmdlines[0] if now.cmdlines else "(none)"
        return f"kernel command line differs (now {_clip(line, 80)!r})"
    if index == 9 and was.kernel_files != now.kernel_files:
        return "kernel differs"
    return ""


def _differ(meaning: str) -> str:
    """ "boot loader differs", "firmware settings differ"."""
    return f"{meaning} {'differ' if meaning.endswith('s') else 'differs'}"


def _on(state: bool | None) -> str:
    return "unknown" if state is None else ("on" if state else "off")


# -- continuous attestation and the certificate ----------------------------------------------


def continuous(facts: Facts) -> tuple[int, int] | None:
    """(interval, grace) in seconds when a policy that applies asks the device to keep
    attesting during its sessions: the shortest of each. None: nobody asks."""
    return _continuous(applicable(facts))


def _continuous(policies: list[tuple[str, PosturePolicy]]) -> tuple[int, int] | None:
    asked = [p for _, p in policies if p.attest_interval]
    if not asked:
        return None
    interval = min(p.attest_interval for p in asked)
    return interval, min(p.attest_grace or 2 * p.attest_interval for p in asked)


# Room beyond interval + grace for the bastion's own work between two good quotes (its
# re-check and the write of the next one): an agent that answers within its grace must
# never see its device's sessions end because the bastion was busy.
ATTEST_MARGIN = 1.0


def attested_until(now: float, interval: int, grace: int) -> float:
    """Until when a good attestation at ``now`` keeps the device's sessions standing:
    the next challenge comes ``interval`` later and may be answered within ``grace``."""
    return now + interval + grace + ATTEST_MARGIN


def attestation_deadline(facts: Facts) -> float | None:
    """Until when the named device's sessions stand on its last good attestation
    (None: no policy asks for continuous attestation; 0: never attested)."""
    return _deadline(applicable(facts), facts)


def _deadline(policies: list[tuple[str, PosturePolicy]], facts: Facts) -> float | None:
    if _continuous(policies) is None:
        return None
    posture = facts.device_posture
    return posture.attested_until if posture is not None else 0.0


def check_device_posture(claims_posture: str | None, facts: Facts, now: float) -> None:
    """A certificate that names a device stands only while that device's posture does:
    its last measurement did not fail; it was issued with a posture verdict where a
    policy checks the boot (a certificate from before the policy says nothing about the
    boot); and, where a policy asks for continuous attestation, the device attested
    recently enough. Raises DeviceNotTrusted with the reason.

    On every connection and every re-check of a live session: the policies are read
    from the facts once here, not once per rule."""
    policies = applicable(facts)
    device = facts.device
    tag = device.asset_tag if device is not None else "?"
    posture = facts.device_posture
    if posture is not None and posture.failed:
        why = "; ".join(posture.reasons) or "its boot does not satisfy the posture policy"
        raise DeviceNotTrusted(f'device "{tag}" failed its posture check: {why}')
    if posture is not None and posture.measured is not None:
        # Decided again under the policies that apply now: a policy made stricter, a
        # role gained, a policy that no longer reads reach certificates issued before.
        now_verdict = _evaluate(policies, posture.measured, posture.baseline)
        if now_verdict.failed:
            raise DeviceNotTrusted(
                f'device "{tag}" failed its posture check: {now_verdict.message}'
            )
    strict = [p for _, p in policies if p.checks and p.on_failure != "warn"]
    if strict and claims_posture not in ("pass", "warn"):
        raise DeviceNotTrusted(
            f'this certificate carries no posture verdict for device "{tag}" and a posture '
            "policy now applies (run: dtclient login)"
        )
    deadline = _deadline(policies, facts)
    if deadline is not None and deadline <= now:
        failure = posture.attest_failure if posture is not None else ""
        raise DeviceNotTrusted(
            f'device "{tag}" is no longer attested: '
            + (failure or "its agent stopped answering (dtclient agent; log in again)")
        )
