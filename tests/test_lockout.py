"""A password lockout blocks password logins only (issue 12, "Lockout semantics").

Anyone can lock an account's password by guessing: five wrong passwords for "alice"
sent unauthenticated used to cut her live certificate session and refuse her
certificate logins for 30 minutes. Real bastion, real `dtclient` and `ssh`.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.sshd import LOGIN
from tests.test_login import (  # noqa: F401  (env: the module's bastion fixture)
    PASSWORD,
    add_user,
    ca_pin,
    env,
    login,
    next_code,
    run,
    signup,
)

pytestmark = pytest.mark.integration


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_guessing_a_password_does_not_cut_or_refuse_certificate_sessions(env, tmp_path):  # noqa: F811
    name, token = add_user(env)
    home = tmp_path / "alice"
    secret = signup(env, home, token)
    assert login(env, home, name, PASSWORD, next_code(secret)).returncode == 0
    config = tmp_path / "ssh_config"
    config.write_text(run(env, home, "dtclient", "config").stdout)
    ssh = ["ssh", "-F", str(config), "-o", "BatchMode=yes"]
    live = subprocess.Popen(
        # it lasts until we end it (a line on its stdin), however long a loaded machine
        # takes over the six logins below: a `sleep` could end it first
        [*ssh, f"{LOGIN}@node-1", "echo started; read -r _; echo survived"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        assert live.stdout.readline().strip() == "started"
        # the attacker: no account, no certificate, just the user name
        attacker = tmp_path / "attacker"
        pin = ("--ca-pin", ca_pin(env))
        for _ in range(5):
            login(env, attacker, name, "a wrong guess", "000000", *pin)
        locked = login(env, attacker, name, PASSWORD, next_code(secret), *pin)
        assert locked.returncode == 6 and "locked" in locked.stderr
        assert wait_for(
            lambda: any(e.type == "lock.create" for e in env.cluster.store.list_audit(user=name))
        )
        time.sleep(1.0)  # five revision polls: a cut would have happened by now
        assert live.poll() is None, live.stderr.read()
        again = subprocess.run(
            [*ssh, f"{LOGIN}@node-1", "echo", "new-session"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert again.returncode == 0 and again.stdout.strip() == "new-session", again.stderr
        out, err = live.communicate("\n", timeout=30)
        assert out.strip() == "survived" and live.returncode == 0, err  # never cut
    finally:
        if live.poll() is None:
            live.kill()
            live.communicate(timeout=10)
    # ...while the password itself stays locked, and the lock says what it is
    refused = login(env, home, name, PASSWORD, next_code(secret), "--password")
    assert refused.returncode == 6 and "locked" in refused.stderr
    locks = json.loads(run(env, env.tmp, "dtadmin", "lock", "ls", "--format", "json").stdout)
    mine = [lk for lk in locks if lk["target"] == name]
    assert [lk["kind"] for lk in mine] == ["password"]
    assert not [e for e in env.cluster.store.list_audit(type="session.terminated", user=name)]
