"""The shipped unit passes systemd-analyze verify and scores ≤ 2.0 exposure offline."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "dt-bastion.service"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def test_unit_verifies(tmp_path):
    # verify checks that ExecStart exists: point it at this checkout's dt-bastion
    unit = tmp_path / "dt-bastion.service"
    binary = Path(sys.executable).parent / "dt-bastion"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/dt-bastion", str(binary)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in result.stderr.splitlines() if "dt-bastion.service" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_exposure_is_at_most_two():
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for dt-bastion.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


def unit_settings() -> dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings[key.strip()] = value.strip()
    return settings


def test_unit_waits_for_readiness_reloads_and_leaves_time_to_drain():
    from bastion.config import BastionConfig

    s = unit_settings()
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    stop = float(s["TimeoutStopSec"].removesuffix("s"))
    assert stop >= BastionConfig().drain_timeout + 10, "systemd would SIGKILL a draining bastion"
