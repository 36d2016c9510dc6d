"""Checklist #31 as a figure: keystroke echo round trip while a bulk transfer shares the jump.

Two separate `ssh -J` processes through the same jump host to the same node: one runs
`cat` and is typed at (a line every 10 ms, each one timed from write to echo), the other
moves 1 GiB (quick: 128 MiB) down (`head -c` on the node into /dev/null here) or up
(`head -c` here into `cat > /dev/null` on the node). Only round trips sent after the bulk
command has started on the node (it announces itself on stderr) and before the bulk ssh
has exited count as "during", however late their echo comes back (a stall behind the
transfer must show, not be dropped). The same session, typed at with no transfer
running, gives the idle baseline. dt-bastion and stock OpenSSH sshd alternate run by run.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from pathlib import Path

from bench.lab import Lab

KEY_INTERVAL = 0.010  # seconds between keystrokes: a fast typist
IDLE_KEYS = 100
BULK_TIMEOUT = 600.0
ECHO_TIMEOUT = 60.0


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]


class Typist:
    """`cat` on the node through the jump; type() sends one line and times its echo."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            ["ssh", "-F", str(config), "-T", "node", "cat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.count = 0
        self.type()  # the session is up before anything is measured

    def type(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        line = b"key-%07d\n" % self.count
        self.count += 1
        t0 = time.perf_counter()
        self.proc.stdin.write(line)
        self.proc.stdin.flush()
        echo = self.proc.stdout.readline()
        rtt = time.perf_counter() - t0
        if echo != line:
            raise RuntimeError(f"keystroke {line!r} echoed as {echo!r}")
        return rtt

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _idle(typist: Typist, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        samples.append(typist.type())
        time.sleep(KEY_INTERVAL)
    return samples


def _one_run(config: Path, direction: str, size: int) -> dict:
    typist = Typist(config)
    try:
        idle = _idle(typist, IDLE_KEYS)
        if direction == "down":
            src = None
            remote = f"echo started >&2; head -c {size} /dev/zero"
            stdin, stdout = subprocess.DEVNULL, subprocess.DEVNULL
        else:
            src = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
            remote = "echo started >&2; cat > /dev/null"
            stdin, stdout = src.stdout, subprocess.DEVNULL
        during: list[float] = []
        stop = threading.Event()
        error: list[BaseException] = []

        def type_during() -> None:
            try:
                while not stop.is_set():  # typed while the bulk ssh is still running
                    during.append(typist.type())  # however late its echo comes back
                    time.sleep(KEY_INTERVAL)
            except BaseException as exc:  # reported by the main thread
                error.append(exc)

        t_spawn = time.perf_counter()
        bulk = subprocess.Popen(
            ["ssh", "-F", str(config), "-T", "node", remote],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
        )
        if src is not None:
            assert src.stdout is not None
            src.stdout.close()
        assert bulk.stderr is not None
        first = bulk.stderr.readline()
        t_start = time.perf_counter()
        if first.strip() != b"started":
            bulk.kill()
            raise RuntimeError(f"bulk ssh via {config.name}: {first + bulk.stderr.read()!r}")
        thread = threading.Thread(target=type_during, daemon=True)
        thread.start()
        try:
            rc = bulk.wait(BULK_TIMEOUT)
        finally:
            t_end = time.perf_counter()
            stop.set()
            thread.join(ECHO_TIMEOUT)
            if src is not None:
                src.wait()
        err = bulk.stderr.read()
        if rc != 0:
            raise RuntimeError(f"bulk ssh via {config.name} exited {rc}: {err[-300:]!r}")
        if error:
            raise error[0]
        if thread.is_alive():
            raise RuntimeError(f"an echo via {config.name} took over {ECHO_TIMEOUT} s")
        return {
            "idle": idle,
            "during": during,
            "bulk_s": t_end - t_start,
            "connect_s": t_start - t_spawn,
            "bulk_mb_s": size / (t_end - t_start) / 1e6,
        }
    finally:
        typist.close()


def interactive(lab: Lab, quick: bool = False) -> dict:
    size = (128 if quick else 1024) * 1024 * 1024
    runs = 2 if quick else 3
    systems = (("dt", lab.dt_config), ("openssh", lab.ossh_config))
    rows, raw = [], {"size": size, "key_interval_s": KEY_INTERVAL}
    for direction in ("down", "up"):
        per: dict[str, list[dict]] = {"dt": [], "openssh": []}
        for _ in range(runs):  # alternate run by run
            for system, config in systems:
                per[system].append(_one_run(config, direction, size))
        raw[direction] = per
        stats = {}
        for system in per:
            during = [x for r in per[system] for x in r["during"]]
            idle = [x for r in per[system] for x in r["idle"]]
            if not during:
                raise RuntimeError(f"{system}: no keystroke echoed during the {direction} transfer")
            stats[system] = {
                "p50": statistics.median(during),
                "p99": _pct(during, 0.99),
                "max": max(during),
                "n": len(during),
                "idle_p50": statistics.median(idle),
                "idle_p99": _pct(idle, 0.99),
                "mb_s": statistics.median(r["bulk_mb_s"] for r in per[system]),
            }
        raw[f"{direction}_summary"] = stats
        dt, ossh = stats["dt"], stats["openssh"]
        what = (
            "`head -c` on the node to /dev/null here"
            if direction == "down"
            else "`head -c` here into `cat > /dev/null` on the node"
        )
        rows.append(
            {
                "figure": f"keystroke echo beside a {size >> 20} MiB transfer {direction}",
                "dt": _text(dt),
                "openssh": _text(ossh),
                "ratio": f"{dt['p50'] / ossh['p50']:.2f} (p50), {dt['p99'] / ossh['p99']:.2f} (p99)",
                "method": f"{runs} runs each, alternating; two `ssh -J` processes: `cat` on the "
                f"node typed at every {KEY_INTERVAL * 1000:.0f} ms, each line timed to its echo, "
                f"only while the bulk ssh ({what}) is moving data; lower is better",
                "note": f"idle echo baseline (same session, no transfer, {IDLE_KEYS} keys a run): "
                f"dt-bastion p50 {dt['idle_p50'] * 1000:.2f} ms, p99 {dt['idle_p99'] * 1000:.2f} ms; "
                f"OpenSSH p50 {ossh['idle_p50'] * 1000:.2f} ms, p99 {ossh['idle_p99'] * 1000:.2f} ms. "
                f"Bulk rate meanwhile: dt-bastion {dt['mb_s']:.0f} MB/s, "
                f"OpenSSH {ossh['mb_s']:.0f} MB/s; worst echo during transfer: dt-bastion "
                f"{dt['max'] * 1000:.0f} ms, OpenSSH {ossh['max'] * 1000:.0f} ms",
            }
        )
    return {"raw": raw, "rows": rows}


def _text(s: dict) -> str:
    return f"p50 {s['p50'] * 1000:.2f} ms, p99 {s['p99'] * 1000:.2f} ms ({s['n']} keys)"
