"""Every name pattern is matched whole: a trailing newline passes none of them.

Python's ``$`` matches before a final newline, so ``re.match(r"^[a-z]+$", "alice\\n")``
succeeds: a device ``alice-laptop\\n`` once enrolled, printed like ``alice-laptop``,
and ``dtadmin lock --device alice-laptop`` missed it. Each check is tried with the
newline (and other trailing whitespace) that used to slip through.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bastion.admin.nodes import parse_addr
from bastion.authz import rbac
from bastion.enroll.ceremony import _asset_tag
from bastion.protocol.certs import valid_extension_value
from bastion.protocol.errors import DTError
from bastion.protocol.tokens import check_token_format
from client.device import TAG_RE

TOKEN = "A" * 43
CHECKS = {
    "user/role/cluster name": lambda v: rbac.check_name("user", v),
    "login": lambda v: rbac.check_logins([v]),
    "certificate extension value": lambda v: valid_extension_value(v) or _refuse(),
    "asset tag (enrollment)": lambda v: _asset_tag({"asset_tag": v, "os_type": "linux"}),
    "asset tag (client)": lambda v: TAG_RE.fullmatch(v) or _refuse(),
    "node address": lambda v: parse_addr(v),
}
GOOD = {
    "user/role/cluster name": "alice-laptop",
    "login": "root",
    "certificate extension value": "alice-laptop",
    "asset tag (enrollment)": "alice-laptop",
    "asset tag (client)": "alice-laptop",
    "node address": "node-1.example.com:22",
}


def _refuse():
    raise ValueError("refused")


@pytest.mark.parametrize("what", sorted(CHECKS))
@pytest.mark.parametrize("tail", ["\n", "\r\n", "\n\n"])
def test_a_trailing_newline_passes_no_name_check(what, tail):
    CHECKS[what](GOOD[what])  # the control: the name itself passes
    with pytest.raises((DTError, ValueError)):
        CHECKS[what](GOOD[what] + tail)


def test_token_format_is_checked_whole():
    assert check_token_format(TOKEN) == TOKEN
    with pytest.raises(DTError):
        check_token_format(TOKEN + "\nA")
    with pytest.raises(DTError):
        check_token_format(TOKEN[:-1] + "\n")


@pytest.mark.integration
def test_dtadmin_refuses_a_device_name_with_a_newline(tmp_path):
    dtadmin = str(Path(os.sys.executable).with_name("dtadmin"))
    env = {**os.environ, "DT_STATE": str(tmp_path / "state")}

    def run(*args):
        return subprocess.run([dtadmin, *args], capture_output=True, text=True, env=env, timeout=60)

    assert run("init", "--cluster", "names").returncode == 0
    refused = run("device", "add", "--asset-tag", "alice-laptop\n", "--os", "linux")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "invalid" in refused.stderr.lower()
    assert run("device", "ls", "--format", "json").stdout.count("alice-laptop") == 0
