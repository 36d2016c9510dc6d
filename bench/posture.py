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
3. Continuous attestation: N real `dtclient agent` processes (started by `dtclient
   login`, as for a user), each with its own swtpm, answer a quote every few seconds;
   the bastion process's CPU time (/proc) over a window once all of them attest, less
   its idle CPU over a window as long, is the cost per device-hour. Each good quote
   moves its device's attested_until, so sampling those counts the turns served.

No OpenSSH jump host checks a device's boot, so these rows have no ratio.
"""

from __future__ import annotations

import contextlib
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
    attest_raw, attest_rows = _attestation(lab, quick)
    return {
        "raw": {"login": login_raw, "step": step_raw, "attestation": attest_raw},
        "rows": login_rows + step_rows + attest_rows,
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
    # CPU of each timed login: the bastion's (its threads' run time, ns) and dtclient's
    # (getrusage of reaped children).
    bastion_cpu: dict[str, list[float]] = {"policy": [], "none": []}
    client_cpu: dict[str, list[float]] = {"policy": [], "none": []}
    pid = lab.bastion.proc.pid
    with enrolled_user(lab, USER, TAG, boot_log=log) as (env, proxy):
        try:
            for i in range(runs):
                order = ("policy", "none") if i % 2 == 0 else ("none", "policy")
                for side in order:
                    set_policy(lab, POLICY if side == "policy" else None)
                    _renew(env, proxy, side == "policy")  # the verdict moved: not timed
                    b0, c0 = ThreadsCPU(pid), _children_cpu()
                    samples[side].append(_renew(env, proxy, side == "policy"))
                    bastion_cpu[side].append(b0.since())
                    client_cpu[side].append(_children_cpu() - c0)
        finally:
            set_policy(lab, None)
    diff = [a - b for a, b in zip(samples["policy"], samples["none"], strict=True)]
    cpu_diff = [a - b for a, b in zip(bastion_cpu["policy"], bastion_cpu["none"], strict=True)]
    ms = 1000.0
    per = {
        k: {"bastion": statistics.mean(bastion_cpu[k]), "client": statistics.mean(client_cpu[k])}
        for k in samples
    }
    rows = [
        {
            "figure": "login with a boot-checking posture policy (dtclient, swtpm, real log)",
            "dt": f"with policy {_p50_p99(samples['policy'], ms, 'ms')}; "
            f"without {_p50_p99(samples['none'], ms, 'ms')}; "
            f"difference p50 {(statistics.median(samples['policy']) - statistics.median(samples['none'])) * ms:+.0f} ms, "
            f"p99 {(p99(samples['policy']) - p99(samples['none'])) * ms:+.0f} ms "
            f"(paired run by run: median {statistics.median(diff) * ms:+.0f} ms); CPU per "
            f"login, bastion {per['policy']['bastion'] * ms:.1f} vs {per['none']['bastion'] * ms:.1f} ms "
            f"(paired median {statistics.median(cpu_diff) * ms:+.1f} ms), "
            f"dtclient {per['policy']['client'] * ms:.0f} vs {per['none']['client'] * ms:.0f} ms",
            "openssh": "n/a",
            "ratio": "n/a",
            "method": f"{runs} `dtclient login` renewals with device auth each way, alternating "
            "run by run (each after one untimed login that moves the verdict); cluster policy "
            "secure_boot + baseline + kernel_cmdline, on_failure warn; the swtpm's PCRs replayed "
            f"from `{LOGIN_LOG}` (38 KB, Secure Boot off, so the verdict is warn), which dtclient "
            "sends zlib'd; wall time of the whole process incl. Python start, the 11-PCR quote, "
            "the log; CPU per login is the mean over the timed logins, and the median of the "
            "run-by-run differences (the bastion's threads' run "
            "time from /proc/PID/task/*/schedstat, "
            "dtclient from getrusage), steadier than wall time on a loaded machine; " + NO_RATIO,
        }
    ]
    raw = {
        **samples,
        "paired_difference": diff,
        "bastion_cpu": bastion_cpu,
        "client_cpu": client_cpu,
        "cpu_per_login_mean": per,
    }
    return {**raw, "log": LOGIN_LOG, "policy": POLICY}, rows


class ThreadsCPU:
    """A process's CPU time from now on, to the nanosecond: the sum of its threads' run
    time (/proc/PID/task/*/schedstat). A thread that ends meanwhile takes its time with
    it, so then the tick-grained total of /proc/PID/stat is used instead."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ticks = cpu_seconds(pid)
        self.threads = self._threads()

    def _threads(self) -> dict[str, int]:
        out = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                out[task.name] = int((task / "schedstat").read_text().split()[0])
        return out

    def since(self) -> float:
        now = self._threads()
        if not set(self.threads) <= set(now):
            return cpu_seconds(self.pid) - self.ticks
        return sum(now[t] - self.threads.get(t, 0) for t in now) / 1e9


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


# -- 3. continuous attestation ----------------------------------------------------------------

ATTEST_INTERVAL = 2  # seconds: short, so a window sees many turns; scaled to 30 s below
ATTEST_POLICY: dict[str, Any] = {"baseline": True, "attest_interval": ATTEST_INTERVAL}


def _attestation(lab: Lab, quick: bool) -> tuple[dict, list[dict]]:
    from client import attest_agent
    from client.profile import Home

    n, window = (5, 30.0) if quick else (20, 120.0)
    store, pid = lab.cluster.store, lab.bastion.proc.pid
    with contextlib.ExitStack() as stack:
        homes, devices = [], []
        for i in range(n):
            name, tag = f"attestbench{i}", f"BENCH-ATTEST-{i}"
            env, proxy = stack.enter_context(enrolled_user(lab, name, tag))
            homes.append((name, env, proxy))
            devices.append(store.get_device(tag).id)
        set_policy(lab, ATTEST_POLICY)
        stack.callback(set_policy, lab, None)
        for name, env, proxy in homes:  # the certificate that asks for the agent starts it
            login = [BIN / "dtclient", "login", "--proxy", proxy, "--user", name]
            out = subprocess.run(login, env=env, capture_output=True, text=True, timeout=120)
            stack.callback(
                subprocess.run, [BIN / "dtclient", "logout"], env=env, capture_output=True
            )
            if out.returncode != 0 or "agent started" not in out.stdout + out.stderr:
                raise RuntimeError(f"no attestation agent for {name}: {out.stderr[-300:]}")
        agents = [Home.open(Path(env["DT_HOME"])) for _, env, _ in homes]
        _wait_attesting(agents, attest_agent.read_state)
        time.sleep(2 * ATTEST_INTERVAL)  # every agent past its handshake and first turns
        failed_before = _failures(store)
        turns, cpu, elapsed = _watch(store, pid, devices, window)
        failed = _failures(store) - failed_before
        still = [attest_agent.read_state(h).get("state") for h in agents]
        if failed or any(s != "attesting" for s in still):
            raise RuntimeError(f"attestation failed during the window: {failed} failures, {still}")
        stack.close()  # agents stopped (logout), policy cleared, swtpms stopped
    idle_cpu, idle_elapsed = _idle(pid, window / 2)
    idle_rate = idle_cpu / idle_elapsed
    busy = max(0.0, cpu - idle_rate * elapsed)
    device_hours = n * elapsed / 3600
    per_device_hour = busy / device_hours
    per_turn = busy / turns if turns else float("nan")
    expected = n * elapsed / ATTEST_INTERVAL
    at_30 = per_turn * 3600 / 30
    rows = [
        {
            "figure": "bastion CPU per continuously attested device-hour",
            "dt": f"{per_device_hour:.2f} CPU s per device-hour at a quote every "
            f"{ATTEST_INTERVAL} s; {at_30:.3f} CPU s per device-hour at every 30 s, i.e. "
            f"one core for ~{3600 / at_30:,.0f} devices ({per_turn * 1000:.1f} ms per quote, "
            f"{turns} quotes from {n} agents in {elapsed:.0f} s)",
            "openssh": "n/a",
            "ratio": "n/a",
            "method": f"{n} real `dtclient agent` processes (started by `dtclient login`), each "
            f"with its own swtpm, cluster policy baseline + attest_interval {ATTEST_INTERVAL} s; "
            f"the bastion process's CPU (/proc utime+stime) over {elapsed:.0f} s once all attest, "
            f"less its idle CPU rate measured after the agents stopped "
            f"({idle_rate * 100:.2f}% of a core); quotes counted as changes of each device's "
            f"attested_until (expected {expected:.0f}), none failed; 30 s figure = CPU per "
            "quote x 120 quotes per hour (the held connection's own idle cost taken as "
            "negligible); " + NO_RATIO,
        }
    ]
    raw = {
        "agents": n,
        "interval": ATTEST_INTERVAL,
        "window": elapsed,
        "bastion_cpu": cpu,
        "idle_cpu": idle_cpu,
        "idle_window": idle_elapsed,
        "quotes": turns,
        "expected_quotes": expected,
        "cpu_per_device_hour": per_device_hour,
        "cpu_per_quote": per_turn,
        "cpu_per_device_hour_at_30s": at_30,
    }
    return raw, rows


def _wait_attesting(agents: list[Any], read_state: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = [read_state(h).get("state") for h in agents]
        if all(s == "attesting" for s in states):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the attestation agents never all attested: {states}")
        time.sleep(0.2)


def _failures(store: Any) -> int:
    return sum(1 for e in store.list_audit(type="device.attest") if not e.success)


def _watch(store: Any, pid: int, devices: list[str], window: float) -> tuple[int, float, float]:
    """The bastion's CPU over ``window`` and the good quotes it served meanwhile (each
    moves its device's attested_until; sampled well inside one interval)."""
    last = {d: store.find_device_posture(d).attested_until for d in devices}
    turns = 0
    c0, t0 = cpu_seconds(pid), time.monotonic()
    while time.monotonic() - t0 < window:
        time.sleep(ATTEST_INTERVAL / 8)
        for d in devices:
            until = store.find_device_posture(d).attested_until
            if until != last[d]:
                turns, last[d] = turns + 1, until
    return turns, cpu_seconds(pid) - c0, time.monotonic() - t0


def _idle(pid: int, window: float) -> tuple[float, float]:
    time.sleep(2.0)  # the agents' connections closed
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(window)
    return cpu_seconds(pid) - c0, time.monotonic() - t0
