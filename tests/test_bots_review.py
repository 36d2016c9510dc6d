"""Attacks on the bots change (issue 13, "Bots and CI"): each test failed on the code
as it landed (39d79ed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz.records import User
from bastion.ca.authority import UserCertRequest
from bastion.cluster import init_cluster

HUMANS = "required-for-humans"


@pytest.fixture
def cluster(tmp_path):
    c = init_cluster(tmp_path / "state", "test")
    c.store.set_setting("device_trust_mode", HUMANS)
    c.store.add_user(User("ci", ("access",), ("deploy",), bot=True))
    yield c
    c.close()


def _helper(cluster, cert_line: str, login: str, *flags: str) -> subprocess.CompletedProcess:
    kind, blob = cert_line.split()[:2]
    return subprocess.run(
        [sys.executable, "-m", "bastion.node_principals",
         "--ca", str(cluster.state_dir / "ca" / "user_ca.pub"), *flags, login, kind, blob],
        capture_output=True, text=True,
    )  # fmt: skip


def test_require_device_on_a_node_is_not_undone_by_its_device_trust_mode(cluster):
    """--require-device says "a trusted device on this node whatever the cluster's modes
    say"; adding --device-trust-mode required-for-humans (or optional) must not let a
    certificate without device extensions in. It did: the mode replaced the flag."""
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    bot = cluster.ca.sign(UserCertRequest("ci", key, bot_only=True)).openssh
    assert _helper(cluster, bot, "deploy", "--device-trust-mode", HUMANS).stdout == "deploy\n"
    for mode in (HUMANS, "optional", "off"):
        proc = _helper(cluster, bot, "deploy", "--require-device", "--device-trust-mode", mode)
        assert proc.returncode == 0 and proc.stdout == "", (mode, proc.stdout)
        assert "device" in proc.stderr


@pytest.mark.parametrize("name", ["-dt-bot", "-dt-signup", "-dt-jump"])
@pytest.mark.parametrize("noun", ["users", "bots"])
def test_the_bastions_own_ssh_user_names_are_no_ones_name(tmp_path, noun, name):
    """A person called "-dt-bot" could sign up but never log in: the bastion takes that
    SSH user name for a bot token and asks for one instead of a password ("-dt-signup"
    likewise for a signup token). Such names are refused when the user is added."""
    dtadmin = str(Path(sys.executable).parent / "dtadmin")
    env = {**os.environ, "DT_STATE": str(tmp_path / "state")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([dtadmin, *args], capture_output=True, text=True, env=env)

    assert run("init", "--cluster", "names").returncode == 0
    proc = run(noun, "add", "--roles", "access", "--", name)
    assert proc.returncode == 2 and "reserved" in proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert name not in run("users", "ls").stdout
