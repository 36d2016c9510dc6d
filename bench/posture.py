"""The `posture` figure: what measured-boot posture costs (issue 15, item 5).

1. At login: whole `dtclient login` renewals with device authentication against the
   lab's bastion, run by run with and without a cluster posture policy that checks the
   boot (Secure Boot, the enrollment baseline, a kernel command-line pattern). The
   bench device is a fresh swtpm whose PCRs are a shipped real log's replay
   (tests/tpm_eventlog.replay_into_tpm) and dtclient sends that log (DT_EVENT_LOG).
   Every switch of the policy moves the device's verdict (unchecked <-> warn), which
   costs one write and bump that neither steady state pays, so each side gets one
   untimed login after the switch before its timed one.
2. The bastion's step alone, in process: decompress the wire's log, measure it
   against the quoted PCRs, evaluate the policy, on each shipped log.

No OpenSSH jump host checks a device's boot, so these rows have no ratio.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.forwarding import cpu_seconds
from bench.lab import Lab, enrolled_user

BIN = Path(sys.executable).parent
SHIPPED = Path(__file__).resolve().parents[2] / "shared" / "eventlogs"
LOGIN_LOG = "ubuntu_2104_shielded_vm_no_secure_boot_eventlog.bin"  # shim, grub, kernel, cmdline
USER, TAG = "posturebench", "BENCH-POSTURE"
# Secure Boot, the baseline and the command line: every check that reads the log and
# the quote. No shipped log has both Secure Boot on and a measured command line, so on
# the login's log (Secure Boot off) the verdict is "warn" and the login still succeeds;
# every check is evaluated either way (posture.evaluate does not stop at a failure).
POLICY: dict[str, Any] = {
    "secure_boot": True,
    "baseline": True,
    "kernel_cmdline": r"/boot/vmlinuz-\S+ root=PARTUUID=[0-9a-f-]+ ro( \S+)*",
    "on_failure": "warn",
}
NO_RATIO = "no OpenSSH equivalent (a jump host that checks a device's boot), so no ratio"


def p99(values: list[float]) -> float:
    """Nearest rank: with fewer than 100 samples, the slowest one."""
    import math

    return sorted(values)[max(0, math.ceil(len(values) * 0.99) - 1)]


def _p50_p99(values: list[float], scale: float, unit: str, digits: int = 0) -> str:
    return (
        f"p50 {statistics.median(values) * scale:.{digits}f} {unit}, "
        f"p99 {p99(values) * scale:.{digits}f} {unit}"
    )


def set_policy(lab: Lab, doc: dict[str, Any] | None) -> None:
    """The cluster's posture policy as `dtadmin posture set` stores it (None: cleared)."""
    from bastion.authz.posture import policy_doc, policy_from_doc

    value = None if doc is None else policy_doc(policy_from_doc(doc))
    lab.cluster.store.set_setting("posture_policy", value)


def posture(lab: Lab, quick: bool = False) -> dict:
    login_raw, login_rows = _login(lab, quick)
    step_raw, step_rows = _step(lab, quick)
    return {
        "raw": {"login": login_raw, "step": step_raw},
        "rows": login_rows + step_rows,
    }


# -- 1. at login ----------------------------------------------------------------------------


def _renew(env: dict[str, str], proxy: str, checked: bool) -> float:
    """One whole `dtclient login` renewal's wall time, checked for its posture verdict."""
    t0 = time.perf_counter()
    result = subprocess.run(
        [BIN / "dtclient", "login", "--proxy", proxy, "--user", USER],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - t0
    said = result.stdout + result.stderr
    if result.returncode != 0 or "device-asset-tag" not in result.stdout:
        raise RuntimeError(f"dtclient login failed: {result.stderr[-300:]}")
    # The policy was read and judged (or not): the user is told the verdict's warning.
    if checked != ("posture warning" in said and "Secure Boot is off" in said):
        raise RuntimeError(f"posture {'not ' if checked else ''}checked as expected: {said[-300:]}")
    return elapsed


def _login(lab: Lab, quick: bool) -> tuple[dict, list[dict]]:
    runs = 12 if quick else 40
    log = (SHIPPED / LOGIN_LOG).read_bytes()
    samples: dict[str, list[float]] = {"policy": [], "none": []}
    # CPU of the timed logins only, summed per side: the bastion's (/proc, in clock
    # ticks, so a total, not per login) and dtclient's (getrusage of reaped children).
    bastion_cpu = {"policy": 0.0, "none": 0.0}
    client_cpu = {"policy": 0.0, "none": 0.0}
    pid = lab.bastion.proc.pid
    with enrolled_user(lab, USER, TAG, boot_log=log) as (env, proxy):
        try:
            for i in range(runs):
                order = ("policy", "none") if i % 2 == 0 else ("none", "policy")
                for side in order:
                    set_policy(lab, POLICY if side == "policy" else None)
                    _renew(env, proxy, side == "policy")  # the verdict moved: not timed
                    b0, c0 = cpu_seconds(pid), _children_cpu()
                    samples[side].append(_renew(env, proxy, side == "policy"))
                    bastion_cpu[side] += cpu_seconds(pid) - b0
                    client_cpu[side] += _children_cpu() - c0
        finally:
            set_policy(lab, None)
    diff = [a - b for a, b in zip(samples["policy"], samples["none"], strict=True)]
    ms = 1000.0
    per = {k: {"bastion": bastion_cpu[k] / runs, "client": client_cpu[k] / runs} for k in samples}
    rows = [
        {
            "figure": "login with a boot-checking posture policy (dtclient, swtpm, real log)",
            "dt": f"with policy {_p50_p99(samples['policy'], ms, 'ms')}; "
            f"without {_p50_p99(samples['none'], ms, 'ms')}; "
            f"difference p50 {(statistics.median(samples['policy']) - statistics.median(samples['none'])) * ms:+.0f} ms, "
            f"p99 {(p99(samples['policy']) - p99(samples['none'])) * ms:+.0f} ms "
            f"(paired run by run: median {statistics.median(diff) * ms:+.0f} ms); CPU per "
            f"login, bastion {per['policy']['bastion'] * ms:.0f} vs {per['none']['bastion'] * ms:.0f} ms, "
            f"dtclient {per['policy']['client'] * ms:.0f} vs {per['none']['client'] * ms:.0f} ms",
            "openssh": "n/a",
            "ratio": "n/a",
            "method": f"{runs} `dtclient login` renewals with device auth each way, alternating "
            "run by run (each after one untimed login that moves the verdict); cluster policy "
            "secure_boot + baseline + kernel_cmdline, on_failure warn; the swtpm's PCRs replayed "
            f"from `{LOGIN_LOG}` (38 KB, Secure Boot off, so the verdict is warn), which dtclient "
            "sends zlib'd; wall time of the whole process incl. Python start, the 11-PCR quote, "
            "the log; CPU per login is the mean over the timed logins (bastion from /proc, "
            "dtclient from getrusage), steadier than wall time on a loaded machine; " + NO_RATIO,
        }
    ]
    raw = {**samples, "paired_difference": diff, "cpu_per_login": per}
    return {**raw, "log": LOGIN_LOG, "policy": POLICY}, rows


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- 2. the bastion's step alone ------------------------------------------------------------


def _step(lab: Lab, quick: bool) -> tuple[dict, list[dict]]:
    from bastion.enroll import boot_posture
    from bastion.protocol.eventlog import compress_log
    from tests.tpm_eventlog import expected_pcrs

    n = 300 if quick else 3000
    set_policy(lab, POLICY)
    try:
        facts = lab.cluster.store.facts(user=USER, asset_tag=TAG, now=time.time())
    finally:
        set_policy(lab, None)
    asked = boot_posture.asked(facts)
    assert asked.pcr_select is not None and asked.event_log
    select = list(asked.pcr_select)
    raw: dict[str, Any] = {}
    parts = []
    for path in sorted(SHIPPED.glob("*.bin")):
        log = path.read_bytes()
        replayed = expected_pcrs(log)
        values = [replayed.get(i, bytes(32)) for i in select]  # a fresh TPM's others are 0
        sent = compress_log(log)

        args = (select, values, sent, asked, facts)
        baseline, _ = _judge(*args, None, time.time())  # enrollment's record of this boot
        assert baseline.trusted_log, f"{path.name} does not replay to its own PCRs"
        samples, cpu = [], []
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.thread_time()
            measured, verdict = _judge(*args, baseline, time.time())
            samples.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
        assert measured.trusted_log and verdict.status in ("pass", "warn"), verdict
        raw[path.name] = {
            "bytes": len(log),
            "wire_bytes": len(sent),
            "verdict": verdict.status,
            "samples": samples,
            "cpu": cpu,
        }
        parts.append(
            f"{path.stem.removesuffix('_eventlog')} ({len(log) // 1024} KB): "
            f"{_p50_p99(samples, 1e6, 'µs')} (CPU {_p50_p99(cpu, 1e6, 'µs')})"
        )
    rows = [
        {
            "figure": "the bastion's posture step alone (decompress + measure + evaluate)",
            "dt": "; ".join(parts),
            "openssh": "n/a",
            "ratio": "n/a",
            "method": f"in process, {n} runs per shipped real log (../shared/eventlogs), wall "
            "time and this thread's CPU time (what preemption on a busy machine leaves out): "
            "boot_posture.measure_answer (zlib inflate, parse, SHA-256 replay against the 11 "
            "quoted PCRs, Secure Boot, boot chain, command lines) + posture.evaluate with the "
            "login row's policy against a baseline of the same boot; no quote signature (login "
            "checks that without a policy too) and no database write; " + NO_RATIO,
        }
    ]
    return raw, rows


def _judge(select, values, sent, asked, facts, baseline, now: float) -> tuple[Any, Any]:
    """What the bastion does with a verified quote's PCRs and the log sent with it."""
    from bastion.authz import posture as core
    from bastion.enroll import boot_posture

    measured = boot_posture.measure_answer(select, values, sent, None, asked, now)
    return measured, core.evaluate(facts, measured, baseline)
