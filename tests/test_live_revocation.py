"""A connection dies with its credential, within a second: the connection, not only
its channels.

Attack: keep an SSH connection to the bastion open (`ssh -N bastion`, no channel at
all; or a dt-api connection authenticated by password) and wait for the admin's
`dtadmin cert revoke`, `ca rotate`, `lock --user`, `users rm` or `users reset`. Before
this change only forwarded channels were cut: the connection stayed, ready to open
dt-api and ask for a new certificate. Now the bastion closes it, says why in the
disconnect message, and audits `connection.terminated`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bastion.authz.records import Node, User
from bastion.ca.certs import load_public_key
from bastion.cluster import init_cluster
from bastion.credentials import hash_password, new_totp_secret, totp_now
from client.api import Credentials, HostTrust, open_session
from tests.sshd import LOGIN, bastion_server, keygen, sshd_node, write_ssh_config

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
BOUND = 3.0  # generous: the watcher polls every 0.2 s and cuts well within a second


@pytest.fixture
def env(tmp_path):
    cluster = init_cluster(tmp_path / "state", "live")
    with sshd_node(tmp_path / "node", cluster) as node, bastion_server(cluster.state_dir) as b:
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port))
        yield type("Env", (), {"tmp": tmp_path, "cluster": cluster, "bastion": b})
    cluster.close()


def dtadmin(env, *args):
    proc = subprocess.run(
        [str(BIN / "dtadmin"), "--state", str(env.cluster.state_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc


def user_config(env, name):
    env.cluster.store.add_user(User(name, ("access",), (LOGIN,)))
    d = env.tmp / name
    d.mkdir()
    key = keygen(d / "id")
    issued = env.cluster.ca.sign_user(name, load_public_key((d / "id.pub").read_bytes()))
    (d / "id-cert.pub").write_text(issued.openssh + "\n")
    config = write_ssh_config(
        d / "ssh_config",
        bastion_port=env.bastion.port,
        key=key,
        cert=d / "id-cert.pub",
        cluster=env.cluster,
    )
    return config, issued.record.serial


def idle_connection(config, *args):
    """`ssh -N` to the bastion (or a jump), returned once it has authenticated."""
    proc = subprocess.Popen(
        ["ssh", "-v", "-F", str(config), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "Authenticated to" in line:
            return proc
    proc.wait()
    pytest.fail("never authenticated: " + "".join(seen[-20:]))


def ended_within(proc, bound):
    """Seconds until the ssh process ended (None if it did not within ``bound``), and
    what it printed."""
    start = time.monotonic()
    try:
        proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None, proc.stderr.read()
    return time.monotonic() - start, proc.stderr.read()


def terminated(env, user, bound=5.0):
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        events = env.cluster.store.list_audit(type="connection.terminated", user=user)
        if events:
            return events
        time.sleep(0.05)
    return []


@pytest.mark.parametrize(
    "action, reason",
    [
        (("cert", "revoke", "{serial}"), "has been revoked"),
        (("ca", "rotate", "--yes"), "the user CA was rotated"),
        (("lock", "--user", "alice", "--message", "left the company"), "left the company"),
        (("users", "rm", "alice"), 'user "alice" does not exist'),
    ],
    ids=["revoke", "ca-rotate", "lock", "users-rm"],
)
def test_an_idle_connection_is_closed_with_its_credential(env, action, reason):
    config, serial = user_config(env, "alice")
    bystander, _ = user_config(env, "bob")
    proc = idle_connection(config, "-N", "bastion")
    other = idle_connection(bystander, "-N", "bastion")
    try:
        dtadmin(env, *(a.format(serial=serial) for a in action))
        took, stderr = ended_within(proc, BOUND + 5)
        assert took is not None, "the connection stayed open"
        assert took < BOUND, f"closed only after {took:.1f} s"
        assert "dt-bastion closed this connection" in stderr and reason in stderr, stderr[-2000:]
        [event] = terminated(env, "alice")
        assert reason in event.message and event.fields["serial"] == str(serial)
        if action[0] != "ca":  # a rotation revokes bob's certificate too
            assert other.poll() is None, "an unrelated connection was closed"
    finally:
        for p in (proc, other):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_jump_and_its_connection_end_with_a_lock(env):
    config, _ = user_config(env, "alice")
    proc = subprocess.Popen(
        ["ssh", "-F", str(config), f"{LOGIN}@node-1", "echo", "up;", "sleep", "60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        dtadmin(env, "lock", "--user", "alice")
        took, _ = ended_within(proc, BOUND + 5)
        assert took is not None and took < BOUND
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert (
        'user "alice" is locked'
        in env.cluster.store.list_audit(type="session.terminated")[-1].message
    )
    assert terminated(env, "alice")


def test_a_password_connection_is_closed_by_a_reset(env):
    secret = new_totp_secret()
    env.cluster.store.add_user(
        User(
            "pat",
            ("access",),
            (LOGIN,),
            password_hash=hash_password("correct horse battery"),
            totp_secret=secret,
        )
    )
    host_ca = (env.cluster.state_dir / "ca" / "host_ca.pub").read_text().strip()

    async def scenario():
        creds = Credentials("pat", password="correct horse battery", totp_code=totp_now(secret))
        session = await open_session(
            "127.0.0.1", env.bastion.port, creds, HostTrust(trusted=(host_ca,))
        )
        try:
            await asyncio.to_thread(dtadmin, env, "users", "reset", "pat")
            start = time.monotonic()
            await asyncio.wait_for(session.conn.wait_closed(), BOUND + 5)
            return time.monotonic() - start
        finally:
            await session.close()

    took = asyncio.run(scenario())
    assert took < BOUND, f"closed only after {took:.1f} s"
    [event] = terminated(env, "pat")
    assert "was changed or reset" in event.message and event.fields["auth"] == "password"
