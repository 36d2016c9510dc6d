"""The `client` figure: how long dtclient takes to start, and a whole-process renewal with
device authentication, against stock OpenSSH's own start-up in the same run.

Each sample is one whole process (Python start, imports, work, exit), run alternately
with its OpenSSH counterpart (`ssh -V`, `ssh -G host`) so both see the same machine load.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.lab import Lab, enrolled_user

BIN = Path(sys.executable).parent


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(argv: list[str], env: dict[str, str], cpu: list[float]) -> float:
    """Wall time of one whole process; its CPU time (user + system) appended to ``cpu``,
    which a loaded machine inflates far less than the wall time."""
    c0, t0 = _cpu(), time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    cpu.append(_cpu() - c0)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-300:]}")
    return elapsed


def _ms(values: list[float], cpu: list[float]) -> str:
    wall = f"{statistics.median(values) * 1000:.0f} ms ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})"
    return f"{wall}, CPU {statistics.median(cpu) * 1000:.0f} ms"


def _ratio(dt: list[float], ossh: list[float]) -> str:
    return f"{statistics.median(dt) / statistics.median(ossh):.1f}"


def client(lab: Lab, quick: bool = False) -> dict:
    runs = 10 if quick else 30
    dtclient = str(BIN / "dtclient")
    pairs = {
        "version": ([dtclient, "--version"], ["ssh", "-V"]),
        "help": ([dtclient, "--help"], ["ssh", "-G", "bench-host"]),
    }
    samples: dict[str, list[float]] = {}
    with enrolled_user(lab, "clientbench", "BENCH-2") as (env, proxy):
        renew = [dtclient, "login", "--proxy", proxy, "--user", "clientbench"]
        pairs["renewal"] = (renew, ["ssh", "-G", "bench-host"])
        for _ in range(runs):
            for key, (dt_argv, ossh_argv) in pairs.items():
                for name, argv in ((key, dt_argv), (key + "_openssh", ossh_argv)):
                    cpu = samples.setdefault(name + "_cpu", [])
                    samples.setdefault(name, []).append(_timed(argv, env, cpu))
    method = (
        f"{runs} runs each, alternating with the OpenSSH command; whole process wall time "
        "(median, min-max) and CPU time (user + system, median); ratio of the wall medians"
    )
    rows = [
        {
            "figure": "client start-up: `dtclient --version` (vs `ssh -V`)",
            "dt": _ms(samples["version"], samples["version_cpu"]),
            "openssh": _ms(samples["version_openssh"], samples["version_openssh_cpu"]),
            "ratio": _ratio(samples["version"], samples["version_openssh"]),
            "method": method + "; Python's own start is about 20 ms of it",
        },
        {
            "figure": "client start-up: `dtclient --help` (vs `ssh -G host`)",
            "dt": _ms(samples["help"], samples["help_cpu"]),
            "openssh": _ms(samples["help_openssh"], samples["help_openssh_cpu"]),
            "ratio": _ratio(samples["help"], samples["help_openssh"]),
            "method": method + "; builds every command's parameters (Typer)",
        },
        {
            "figure": "client renewal with device authentication (vs `ssh -G host`)",
            "dt": _ms(samples["renewal"], samples["renewal_cpu"]),
            "openssh": _ms(samples["renewal_openssh"], samples["renewal_openssh_cpu"]),
            "ratio": _ratio(samples["renewal"], samples["renewal_openssh"]),
            "method": method + "; `dtclient login` renewing through its valid certificate: "
            "SSH handshake to the bastion, TPM quote on swtpm, new key and certificate written; "
            "target well under 300 ms",
        },
    ]
    return {"raw": samples, "rows": rows}
