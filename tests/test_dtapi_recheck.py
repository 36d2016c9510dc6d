"""Every dt-api request re-checks the credential its connection authenticated with.

Attack: open a dt-api connection (with a certificate, or with password and one-time
code), let an admin revoke what it authenticated with (`dtadmin cert revoke`, `cert
revoke --user`, `ca rotate`, `users reset`, `lock --user`), then send `cert_request`
on the SAME connection. Before this change it got a fresh certificate (from the new CA
after a rotation) and could jump again. Now the request is refused with the reason,
the connection is closed, and `connection.terminated` is audited.

The bastion here polls the revision only every 30 s, so what refuses is the request's
own re-check, not the watcher that also closes such connections within a second
(tests/test_live_revocation.py).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import pytest

from bastion.authz.records import User
from bastion.ca.certs import load_public_key
from bastion.cluster import init_cluster
from bastion.credentials import hash_password, new_totp_secret, totp_now
from bastion.protocol import wire
from bastion.protocol.errors import DTError
from client.api import Credentials, HostTrust, open_session
from tests.sshd import LOGIN, bastion_server, keygen

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
PASSWORD = "correct horse battery"


@pytest.fixture
def env(tmp_path):
    cluster = init_cluster(tmp_path / "state", "recheck")
    host_ca = (cluster.state_dir / "ca" / "host_ca.pub").read_text().strip()
    slow_watch = ("--set", "revision_poll_interval=30")
    with bastion_server(cluster.state_dir, extra_args=slow_watch) as bastion:
        yield type(
            "Env", (), {"tmp": tmp_path, "cluster": cluster, "bastion": bastion, "ca": host_ca}
        )
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


def certificate_user(env, name="alice"):
    env.cluster.store.add_user(User(name, ("access",), (LOGIN,)))
    keygen(env.tmp / name)
    pub = (env.tmp / f"{name}.pub").read_text()
    issued = env.cluster.ca.sign_user(name, load_public_key(pub.encode()))
    (env.tmp / f"{name}-cert.pub").write_text(issued.openssh + "\n")
    creds = Credentials(
        name,
        client_key=asyncssh.read_private_key(str(env.tmp / name)),
        certificate=asyncssh.read_certificate(str(env.tmp / f"{name}-cert.pub")),
    )
    return creds, pub, issued.record.serial


def password_user(env, name="pat"):
    secret = new_totp_secret()
    user = User(
        name, ("access",), (LOGIN,), password_hash=hash_password(PASSWORD), totp_secret=secret
    )
    env.cluster.store.add_user(user)
    keygen(env.tmp / name)
    creds = Credentials(name, password=PASSWORD, totp_code=totp_now(secret))
    return creds, (env.tmp / f"{name}.pub").read_text()


async def renew_after(env, creds, pub, *action):
    """A certificate on a connection, the admin's action, then a second request on it."""
    session = await open_session("127.0.0.1", env.bastion.port, creds, HostTrust(trusted=(env.ca,)))
    try:
        first = await session.call(wire.CertRequest(public_key=pub), wire.CertIssued)
        assert first.certificate
        await asyncio.to_thread(dtadmin, env, *action)
        try:
            second = await session.call(wire.CertRequest(public_key=pub), wire.CertIssued, 10)
        except DTError as exc:
            refusal = exc
        else:
            pytest.fail(f"a certificate was issued after `dtadmin {' '.join(action)}`: {second}")
        await asyncio.wait_for(session.conn.wait_closed(), 5)  # the connection, not a channel
    finally:
        await session.close()
    return refusal


def terminated(env, user):
    deadline = time.monotonic() + 5
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
        (("cert", "revoke", "--user", "alice"), "has been revoked"),
        (("ca", "rotate", "--yes"), "the user CA was rotated"),
        (("lock", "--user", "alice", "--message", "laptop stolen"), "laptop stolen"),
    ],
    ids=["revoke-serial", "revoke-user", "ca-rotate", "lock"],
)
def test_a_certificate_connection_gets_nothing_once_revoked(env, action, reason):
    creds, pub, serial = certificate_user(env)
    action = tuple(a.format(serial=serial) for a in action)
    refusal = asyncio.run(renew_after(env, creds, pub, *action))
    assert reason in refusal.message, refusal.message
    assert refusal.code == "access_denied"
    [event] = terminated(env, "alice")
    assert reason in event.message and not event.success
    assert event.fields["auth"] == "certificate" and event.fields["serial"] == str(serial)
    # and nothing was signed after the action
    issued = [e for e in env.cluster.store.list_audit(type="cert.create") if e.user == "alice"]
    assert len([e for e in issued if e.success]) == 2  # the test's own and the first renewal


@pytest.mark.parametrize(
    "action, reason",
    [
        (("users", "reset", "pat"), "was changed or reset"),
        (("lock", "--user", "pat"), 'user "pat" is locked'),
    ],
    ids=["users-reset", "lock"],
)
def test_a_password_connection_gets_nothing_once_reset_or_locked(env, action, reason):
    creds, pub = password_user(env)
    refusal = asyncio.run(renew_after(env, creds, pub, *action))
    assert reason in refusal.message, refusal.message
    [event] = terminated(env, "pat")
    assert reason in event.message and event.fields["auth"] == "password"


def test_a_connection_whose_credential_stands_keeps_working(env):
    """Someone else's revocation (here bob's) changes nothing for alice's connection."""
    creds, pub, _ = certificate_user(env)
    certificate_user(env, "bob")

    async def scenario():
        session = await open_session(
            "127.0.0.1", env.bastion.port, creds, HostTrust(trusted=(env.ca,))
        )
        try:
            await session.call(wire.CertRequest(public_key=pub), wire.CertIssued)
            await asyncio.to_thread(dtadmin, env, "cert", "revoke", "--user", "bob")
            again = await session.call(wire.CertRequest(public_key=pub), wire.CertIssued)
            return again
        finally:
            await session.close()

    assert asyncio.run(scenario()).certificate
    assert not env.cluster.store.list_audit(type="connection.terminated")
