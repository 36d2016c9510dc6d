"""Why: what a person running stock `ssh -J` sees when the bastion refuses or cuts them.

Before (57a5912): a locked user's certificate, an expired, revoked or rotated one all
read "Permission denied" after a `(dt@127.0.0.1) Password:` prompt no password could
pass; a lock, an unenrollment or a shutdown cutting a live session read
"client_loop: send disconnect: Broken pipe". Now the holder of a refused certificate
(only once it proved the key) reads the reason in an SSH auth banner and gets no
password prompt, a stranger with a certificate of some other CA still gets the prompt
for any user name (known or not, locked or not, all alike), and a cut arrives as an SSH
disconnect message that `ssh` prints: "Received disconnect from ...: dt-bastion closed
this connection: <reason>".

Real `dt-bastion serve`, real sshd node, real `ssh` in a real terminal (pexpect).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncssh
import pexpect
import pytest

from bastion.authz.records import Device, DeviceCredential, Node, User
from bastion.ca.certs import load_public_key
from bastion.cluster import init_cluster
from tests.sshd import (
    LOGIN,
    bastion_server,
    free_port,
    keygen,
    sshd_node,
    wait_for_port,
    write_ssh_config,
)

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
CRED = DeviceCredential("cred-1", b"\x30", "tpm_ekcert", "ab" * 32)


@pytest.fixture
def env(tmp_path):
    cluster = init_cluster(tmp_path / "state", "why")
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


def person(env, name, *, add=True, device=None, **sign):
    """A user (unless ``add`` is False), key, certificate and an ssh_config without
    BatchMode: ssh may prompt in the terminal, as it does for a person."""
    if add:
        env.cluster.store.add_user(User(name, ("access",), (LOGIN,)))
    d = env.tmp / name
    d.mkdir()
    key = keygen(d / "id")
    issued = env.cluster.ca.sign_user(
        name, load_public_key((d / "id.pub").read_bytes()), device=device, **sign
    )
    (d / "id-cert.pub").write_text(issued.openssh + "\n")
    config = write_ssh_config(
        d / "ssh_config",
        bastion_port=env.bastion.port,
        key=key,
        cert=d / "id-cert.pub",
        cluster=env.cluster,
    )
    config.write_text(config.read_text().replace("BatchMode yes", "BatchMode no"))
    return config, issued


def in_terminal(config, *args, timeout=30):
    """`ssh -F config LOGIN@node-1 ...` in a real terminal; all it printed, and whether
    it stopped at a password prompt (answered with Ctrl-C)."""
    term = pexpect.spawn(
        "ssh",
        ["-F", str(config), f"{LOGIN}@node-1", *args],
        encoding="utf-8",
        timeout=timeout,
        env={**os.environ, "LC_ALL": "C"},
    )
    try:
        prompted = term.expect(["Password:", pexpect.EOF]) == 0
        seen = term.before + (term.after if isinstance(term.after, str) else "")
        if prompted:
            term.sendcontrol("c")
            term.expect(pexpect.EOF)
            seen += term.before
        return seen, prompted
    finally:
        term.close(force=True)


def utc(ts):
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def audited(env, kind, text, user=None, bound=5.0):
    deadline = time.monotonic() + bound
    while True:
        found = [e for e in env.cluster.store.list_audit(type=kind, user=user) if text in e.message]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# -- a refused certificate says why, and asks for no password --------------------------------


@pytest.mark.parametrize(
    "case", ["locked", "expired", "revoked", "ca-rotated", "removed", "not-yet-valid"]
)
def test_a_refused_certificate_says_why_and_asks_no_password(env, case):
    now = time.time()
    sign = {}
    if case == "expired":
        sign = {"now": now - 7200, "ttl": 600}
    elif case == "not-yet-valid":
        sign = {"now": now + 7200, "ttl": 600}
    config, issued = person(env, "alice", **sign)
    cert = issued.record
    if case == "locked":
        dtadmin(env, "lock", "--user", "alice", "--message", "laptop reported lost")
        why = 'user "alice" is locked: laptop reported lost'
    elif case == "expired":
        why = f"certificate expired at {utc(cert.valid_before)} (run: dtclient login)"
    elif case == "revoked":
        dtadmin(env, "cert", "revoke", str(cert.serial))
        why = f"certificate serial {cert.serial} was revoked at "
    elif case == "ca-rotated":
        dtadmin(env, "ca", "rotate", "--yes")
        time.sleep(0.5)  # the running bastion picks the new CA up at its next poll
        why = "the cluster's user CA was rotated: this certificate is no longer trusted"
    elif case == "removed":
        dtadmin(env, "users", "rm", "alice")
        why = 'user "alice" does not exist'
    else:
        why = f"certificate is not valid before {utc(cert.valid_after)}"
    seen, prompted = in_terminal(config, "true")
    assert f"dt-bastion: certificate refused: {why}" in seen, seen
    assert not prompted and "Password" not in seen, seen
    assert "Permission denied (publickey)." in seen, seen
    assert audited(env, "auth.failed", "", user="alice"), "the refusal was not audited"


def test_a_stranger_hears_nothing_and_every_name_is_asked_for_a_password(env, tmp_path):
    """Certificates of some other CA naming a locked user, a user who is fine and a
    name that does not exist: all three get the same password prompt, no reason."""
    person(env, "carol")  # the real one: her certificate stays home
    dtadmin(env, "lock", "--user", "carol", "--message", "laptop reported lost")
    env.cluster.store.add_user(User("dave", ("access",), (LOGIN,)))
    ca = keygen(tmp_path / "rogue-ca")
    outputs = []
    for name in ("carol", "dave", "nobody"):
        d = tmp_path / f"rogue-{name}"
        d.mkdir()
        key = keygen(d / "id")
        subprocess.run(
            ["ssh-keygen", "-q", "-s", str(ca), "-I", name, "-n", "-dt-jump", "-V", "-5m:+1h"]
            + ["-O", f"extension:dt-user@dt-bastion={name}", str(d / "id.pub")],
            check=True,
        )
        config = write_ssh_config(
            d / "ssh_config",
            bastion_port=env.bastion.port,
            key=key,
            cert=d / "id-cert.pub",
            cluster=env.cluster,
        )
        config.write_text(config.read_text().replace("BatchMode yes", "BatchMode no"))
        seen, prompted = in_terminal(config, "true")
        assert prompted, seen
        assert "dt-bastion:" not in seen and "locked" not in seen, seen
        outputs.append(seen.replace(name, "NAME").split("Password:")[0].strip())
    assert outputs[0] == outputs[1] == outputs[2], outputs


@pytest.mark.parametrize("case", ["no device", "unenrolled"])
def test_a_certificate_no_node_takes_for_its_device_is_told_at_login(env, case):
    """Accepted (dt-api still works, e.g. to enroll), but told it reaches no node."""
    device = None
    if case == "no device":
        dtadmin(env, "cluster", "set", "device-trust-mode", "required")
        why = "a trusted device is required (run: dtclient device enroll"
    else:
        device = env.cluster.store.add_device(
            Device("", "SN-ERIN", "linux", "enrolled", "erin", CRED)
        )
        why = 'device "SN-ERIN" is not enrolled (run: dtclient device enroll'
    config, _ = person(env, "erin", device=device)
    if device is not None:
        dtadmin(env, "device", "unenroll", "SN-ERIN")
    seen, prompted = in_terminal(config, "true")
    assert f"dt-bastion: this certificate reaches no node: {why}" in seen, seen
    assert not prompted, seen


# -- a live session cut says why ---------------------------------------------------------


def running(config):
    proc = subprocess.Popen(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", f"{LOGIN}@node-1", "echo up; sleep 60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    return proc


def ended(proc, bound=15.0):
    try:
        proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the session was not cut")
    assert proc.stderr is not None
    return proc.stderr.read()


@pytest.mark.parametrize("case", ["lock", "revoke", "unenroll", "shutdown"])
def test_a_cut_session_says_why(env, case):
    device = None
    if case == "unenroll":
        device = env.cluster.store.add_device(
            Device("", "SN-FRANK", "linux", "enrolled", "frank", CRED)
        )
        dtadmin(env, "cluster", "set", "device-trust-mode", "required")
    config, issued = person(env, "frank", device=device)
    proc = running(config)
    try:
        if case == "lock":
            dtadmin(env, "lock", "--user", "frank", "--message", "laptop reported lost")
            why = 'user "frank" is locked: laptop reported lost'
        elif case == "revoke":
            dtadmin(env, "cert", "revoke", str(issued.record.serial))
            why = f"certificate serial {issued.record.serial} has been revoked"
        elif case == "unenroll":
            dtadmin(env, "device", "unenroll", "SN-FRANK")
            why = 'access denied to node-1: device "SN-FRANK" is not enrolled'
        else:
            env.bastion.proc.send_signal(signal.SIGTERM)
            why = "the bastion is shutting down"
        stderr = ended(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert "Received disconnect from 127.0.0.1 port" in stderr, stderr
    assert f"dt-bastion closed this connection: {why}" in stderr, stderr
    if case == "shutdown":
        env.bastion.proc.wait(15)
        ends = env.cluster.store.list_audit(type="session.end", user="frank")
        assert ends and ends[-1].message == "bastion shutting down"  # service.run.STOPPED
    else:
        assert audited(env, "session.terminated", why.removeprefix("access denied to node-1: "))


def test_a_dt_api_channel_hears_why_before_the_disconnect(env):
    """A certificate connection with dt-api open (what dtclient holds while it renews
    or enrolls): the lock reaches it as a stderr line and an exit-signal before the
    disconnect, not as a bare EOF."""
    config, _ = person(env, "gina")
    d = config.parent
    host_ca = (env.cluster.state_dir / "ca" / "host_ca.pub").read_text().strip()

    lost = []

    class Client(asyncssh.SSHClient):
        def connection_lost(self, exc):
            lost.append(exc)

    async def scenario():
        conn = await asyncssh.connect(
            "127.0.0.1",
            env.bastion.port,
            username="dt",
            client_factory=Client,
            client_keys=[(str(d / "id"), str(d / "id-cert.pub"))],
            known_hosts=([], [asyncssh.import_public_key(host_ca)], []),
            agent_path=None,
            config=None,
            kbdint_auth=False,
        )
        try:
            writer, _, stderr = await conn.open_session(subsystem="dt-api", encoding=None)
            await asyncio.to_thread(
                dtadmin, env, "lock", "--user", "gina", "--message", "laptop reported lost"
            )
            said = await asyncio.wait_for(stderr.read(), 15)
            await asyncio.wait_for(conn.wait_closed(), 15)
            return said, writer.channel.get_exit_signal()
        finally:
            conn.close()

    said, signal_ = asyncio.run(scenario())
    why = 'user "gina" is locked: laptop reported lost'
    assert said.decode() == f"dt-bastion: {why}\r\n"
    assert signal_[0] == "TERM" and why in signal_[2]
    # DISC_BY_APPLICATION: asyncssh reports it as a clean close (no exception), which
    # is why the channel is told first
    assert lost == [None]


def test_a_cut_channel_leaves_the_connections_other_channels_alone(env):
    """One connection forwarding to two nodes (`ssh -N -L ... -L ...`, or a
    ControlMaster): removing one node cuts only its channel; the connection and the
    other channel go on. Only a connection left with nothing open is closed."""
    with sshd_node(env.tmp / "node-2", env.cluster, names=("node-2",)) as node2:
        env.cluster.store.add_node(Node("node-2", "127.0.0.1", node2.port))
        two_forwards(env)


def two_forwards(env):
    config, _ = person(env, "hank")
    one, two = free_port(), free_port()
    proc = subprocess.Popen(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", "-N"]
        + ["-L", f"127.0.0.1:{one}:node-1:22", "-L", f"127.0.0.1:{two}:node-2:22", "bastion"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    socks = []
    try:
        wait_for_port(one, proc)
        wait_for_port(two, proc)
        for p in (one, two):
            sock = socket.create_connection(("127.0.0.1", p), timeout=10)
            socks.append(sock)
            assert sock.recv(64).startswith(b"SSH-2.0-"), "the forward works"
        dtadmin(env, "nodes", "rm", "node-2")
        socks[1].settimeout(15)
        while socks[1].recv(4096):  # the node's bytes, until the cut closes it
            pass
        socks[0].sendall(b"SSH-2.0-still-here\r\n")
        socks[0].settimeout(15)
        assert socks[0].recv(4096), "the other channel was closed too"  # node's KEXINIT
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert audited(env, "session.terminated", "node-2 was removed from the inventory")
        assert not audited(env, "connection.terminated", "", user="hank", bound=0.5)
    finally:
        for sock in socks:
            sock.close()
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("key_type", [["rsa", "-b", "3072"], ["ecdsa", "-b", "256"]])
def test_a_refused_rsa_or_ecdsa_certificate_is_proven_and_told_too(env, key_type):
    """The proof is checked by hand over RFC 4252's signed data: an RSA certificate
    (signed rsa-sha2-512 by OpenSSH) and an ECDSA one prove their key as Ed25519 does."""
    env.cluster.store.add_user(User("erin", ("access",), (LOGIN,)))
    d = env.tmp / "erin"
    d.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", *key_type, "-N", "", "-f", str(d / "id")], check=True
    )
    issued = env.cluster.ca.sign_user("erin", load_public_key((d / "id.pub").read_bytes()))
    (d / "id-cert.pub").write_text(issued.openssh + "\n")
    config = write_ssh_config(
        d / "ssh_config",
        bastion_port=env.bastion.port,
        key=d / "id",
        cert=d / "id-cert.pub",
        cluster=env.cluster,
    )
    config.write_text(config.read_text().replace("BatchMode yes", "BatchMode no"))
    dtadmin(env, "lock", "--user", "erin", "--message", "laptop reported lost")
    seen, prompted = in_terminal(config, "true")
    assert 'certificate refused: user "erin" is locked: laptop reported lost' in seen, seen
    assert not prompted, seen
