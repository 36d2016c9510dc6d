"""`make bench`: dt-bastion against stock OpenSSH sshd as the jump host, in one run.

Writes docs/benchmarks.md (figure, dt-bastion, OpenSSH, ratio, method) and
docs/benchmarks-raw.json (every sample); a partial (--only) or --quick run writes
to bench/results/ instead, leaving the published table whole. Each figure
alternates the two systems run by run and reports the median and min-max.
Everything runs on 127.0.0.1.

    python -m bench [--quick] [--only connect,throughput,...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import figures  # noqa: E402
from bench.client import client  # noqa: E402
from bench.forwarding import cpu, parallel  # noqa: E402
from bench.ha import ha  # noqa: E402
from bench.interactive import interactive  # noqa: E402
from bench.lab import Lab  # noqa: E402
from bench.posture import posture  # noqa: E402

FIGURES = (
    "connect",
    "throughput",
    "cpu",
    "parallel",
    "interactive",
    "ca",
    "revocation",
    "login",
    "client",
    "concurrency",
    "ha",  # several bastions: PostgreSQL, HAProxy (bench/ha.py)
    "posture",  # measured-boot posture at login, continuous attestation (bench/posture.py)
)

FIGURE_FUNCTIONS = {name: getattr(figures, name, None) for name in FIGURES}
FIGURE_FUNCTIONS["interactive"] = interactive
FIGURE_FUNCTIONS["client"] = client
FIGURE_FUNCTIONS["ha"] = ha
FIGURE_FUNCTIONS["cpu"] = cpu
FIGURE_FUNCTIONS["parallel"] = parallel
FIGURE_FUNCTIONS["posture"] = posture


def summarise(samples: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, smaller sizes")
    parser.add_argument("--only", default=",".join(FIGURES), help="comma-separated figures")
    args = parser.parse_args()
    wanted = [f for f in args.only.split(",") if f]
    unknown = [f for f in wanted if f not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    rows: list[dict] = []
    raw: dict[str, object] = {
        "started": time.time(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "quick": args.quick,
    }
    with Lab(ROOT / "bench" / "results" / "lab") as lab:
        for name in wanted:
            print(f"== {name}", flush=True)
            result = FIGURE_FUNCTIONS[name](lab, quick=args.quick)
            raw[name] = result["raw"]
            rows.extend(result["rows"])
            for row in result["rows"]:
                print(
                    f"   {row['figure']}: dt-bastion {row['dt']}  OpenSSH {row['openssh']}  "
                    f"ratio {row['ratio']}",
                    flush=True,
                )
    # Only a full run publishes: a partial or quick one must not replace the table in
    # docs/ with a few rows (or smaller sizes) measured on their own.
    publish = set(wanted) == set(FIGURES) and not args.quick
    out = ROOT / "docs" if publish else ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks-raw.json").write_text(json.dumps(raw, indent=2, default=str))
    write_markdown(rows, raw, out / "benchmarks.md")
    print(f"wrote {out / 'benchmarks.md'}" + ("" if publish else " (partial run: docs/ untouched)"))
    return 0


def write_markdown(rows: list[dict], raw: dict, target: Path) -> None:
    lines = [
        "# Benchmarks: dt-bastion vs stock OpenSSH as the jump host",
        "",
        f"Measured with `make bench` on {raw['machine']}, Python {raw['python']}"
        + (" (quick mode)" if raw.get("quick") else "")
        + ". "
        "Both systems run on 127.0.0.1 in the same run, alternating run by run; "
        "medians with min-max. Raw samples: `docs/benchmarks-raw.json`.",
        "",
        "| figure | dt-bastion | OpenSSH | ratio | method |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['figure']} | {row['dt']} | {row['openssh']} | {row['ratio']} | "
            f"{row['method']} |"
        )
    notes = [r for r in rows if r.get("note")]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- **{r['figure']}**: {r['note']}" for r in notes]
    target.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
