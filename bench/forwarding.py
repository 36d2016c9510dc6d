"""The forwarding path: CPU per GiB, and aggregate throughput of parallel transfers.

CPU is what the jump host's processes spent, read from /proc: for dt-bastion its
process (and, with workers, each worker's); for stock sshd the master's reaped
children (``cutime``/``cstime``: the per-connection processes that did the work,
counted once they exit). On a shared machine CPU seconds and ratios within one run
say more than MB/s.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import time
from pathlib import Path

from bench.lab import Lab

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return [int(x) for x in text.rsplit(")", 1)[1].split()[11:15]]  # utime stime cutime cstime


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def cpu_seconds(pid: int) -> float:
    """A process's CPU, its reaped children's and its live children's (recursively)."""
    total = sum(_stat(pid))
    for child in _children(pid):
        with contextlib.suppress(OSError):
            total += round(cpu_seconds(child) * TICK)
    return total / TICK


def _upload(config: Path, size: int, parallel: int = 1) -> float:
    """``parallel`` ssh transfers of ``size`` bytes each into /dev/null on the node;
    the wall time of the whole."""
    t0 = time.perf_counter()
    procs = []
    for _ in range(parallel):
        src = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        procs.append(
            (
                src,
                subprocess.Popen(
                    ["ssh", "-F", str(config), "node", "cat > /dev/null"],
                    stdin=src.stdout,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                ),
            )
        )
        assert src.stdout is not None
        src.stdout.close()
    for src, ssh in procs:
        _, err = ssh.communicate(timeout=900)
        src.wait()
        if ssh.returncode != 0:
            raise RuntimeError(f"ssh via {config.name} failed: {err.decode()[-300:]}")
    return time.perf_counter() - t0


def _measured(lab: Lab, system: str, size: int, parallel: int = 1) -> tuple[float, float]:
    """(seconds, CPU seconds of the jump host) for one run."""
    if system == "openssh":
        pid, config = lab.jump_proc.pid, lab.ossh_config
    elif system == "dt2":
        pid, config = lab.workers_bastion.proc.pid, lab.workers_config
    else:
        pid, config = lab.bastion.proc.pid, lab.dt_config
    before = cpu_seconds(pid)
    elapsed = _upload(config, size, parallel)
    time.sleep(0.3)  # sshd reaps its per-connection child, so its CPU is counted
    return elapsed, cpu_seconds(pid) - before


def cpu(lab: Lab, quick: bool = False) -> dict:
    size = (256 if quick else 1024) << 20
    runs = 3 if quick else 5
    samples: dict[str, dict[str, list[float]]] = {
        s: {"cpu_per_gib": [], "mb_s": []} for s in ("dt", "openssh")
    }
    for _ in range(runs):
        for system in ("dt", "openssh"):
            elapsed, used = _measured(lab, system, size)
            samples[system]["cpu_per_gib"].append(used / (size / (1 << 30)))
            samples[system]["mb_s"].append(size / elapsed / 1e6)
    dt_cpu = statistics.median(samples["dt"]["cpu_per_gib"])
    os_cpu = statistics.median(samples["openssh"]["cpu_per_gib"])
    dt_rate = statistics.median(samples["dt"]["mb_s"])
    os_rate = statistics.median(samples["openssh"]["mb_s"])
    method = (
        f"{runs} runs each, alternating; one {size >> 20} MiB `ssh -J` upload into "
        "/dev/null on the node, aes128-gcm on both legs"
    )
    return {
        "raw": samples,
        "rows": [
            {
                "figure": "forwarding: CPU seconds per GiB (jump host)",
                "dt": _fmt(samples["dt"]["cpu_per_gib"], "s"),
                "openssh": _fmt(samples["openssh"]["cpu_per_gib"], "s"),
                "ratio": f"{dt_cpu / os_cpu:.2f}",
                "method": method + "; user + system CPU of the jump host's processes "
                "(/proc); lower is better; target ≤ 1.0",
            },
            {
                "figure": "forwarding: single-transfer throughput",
                "dt": _fmt(samples["dt"]["mb_s"], "MB/s", digits=0),
                "openssh": _fmt(samples["openssh"]["mb_s"], "MB/s", digits=0),
                "ratio": f"{dt_rate / os_rate:.2f}",
                "method": method + "; target ≥ 1.0",
            },
        ],
    }


def parallel(lab: Lab, quick: bool = False) -> dict:
    n, size = 8, (128 if quick else 512) << 20
    runs = 2 if quick else 3
    lab.start_workers_bastion(2)
    systems = ("dt", "dt2", "openssh")
    samples: dict[str, dict[str, list[float]]] = {
        s: {"mb_s": [], "cpu_per_gib": []} for s in systems
    }
    for _ in range(runs):
        for system in systems:
            elapsed, used = _measured(lab, system, size, n)
            samples[system]["mb_s"].append(n * size / elapsed / 1e6)
            samples[system]["cpu_per_gib"].append(used / (n * size / (1 << 30)))
    med = {s: statistics.median(samples[s]["mb_s"]) for s in systems}
    cores = os.cpu_count() or 1
    method = (
        f"{runs} runs each, alternating; {n} `ssh -J` uploads of {size >> 20} MiB at once "
        f"into /dev/null on the node, aes128-gcm; {cores} cores shared with the clients, "
        "the node's sshd and the ssh processes; total bytes / wall time of the whole"
    )

    def text(system: str) -> str:
        cpu = statistics.median(samples[system]["cpu_per_gib"])
        return f"{_fmt(samples[system]['mb_s'], 'MB/s', digits=0)}, CPU {cpu:.2f} s/GiB"

    return {
        "raw": samples,
        "rows": [
            {
                "figure": f"forwarding: {n} parallel transfers, --workers 1",
                "dt": text("dt"),
                "openssh": text("openssh"),
                "ratio": f"{med['dt'] / med['openssh']:.2f}",
                "method": method,
            },
            {
                "figure": f"forwarding: {n} parallel transfers, --workers 2",
                "dt": text("dt2"),
                "openssh": text("openssh"),
                "ratio": f"{med['dt2'] / med['openssh']:.2f}",
                "method": method + f"; {med['dt2'] / med['dt']:.2f}x the rate of one worker",
            },
        ],
    }


def _fmt(values: list[float], unit: str, digits: int = 2) -> str:
    med = statistics.median(values)
    return f"{med:.{digits}f} {unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"
