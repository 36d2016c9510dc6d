"""The bastion's event loop never waits for the database.

Attack (or an admin's long transaction, a backup tool, a stuck NFS server): another
process holds the cluster database's write lock for ~10 s. Meanwhile the bastion must
go on serving everything that does not need a write: a live forwarded session keeps
echoing, a new connection completes its handshake, and the requests that do need a
write (a new session's start, refusals to audit) are delayed or refused cleanly, never
by freezing everyone else. Once the lock is gone every audit row lands.

On the code before this change one audit write on the loop froze it for the whole
lock (an interactive echo took ~10 s).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bastion.authz.records import Node, User
from bastion.ca.certs import load_public_key, sign_user_cert, user_cert_spec
from tests.sshd import LOGIN, bastion_server, keygen, ssh, sshd_node, user_client, write_ssh_config

pytestmark = pytest.mark.integration
LOCK_SECONDS = 10.0
ECHO_BOUND = 2.0  # generous: an echo takes milliseconds


class Echo:
    """`ssh -J` to the node running `cat`: each line comes straight back."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            ["ssh", "-F", str(config), f"{LOGIN}@node-1", "cat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        self.n = 0

    def roundtrip(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.n += 1
        line = f"ping {self.n}\n".encode()
        start = time.monotonic()
        self.proc.stdin.write(line)
        answer = self.proc.stdout.readline()
        assert answer == line, (answer, self.proc.stderr.read() if self.proc.poll() else b"")
        return time.monotonic() - start

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def hold_write_lock(db: Path, seconds: float) -> subprocess.Popen:
    """Another process takes the write lock (BEGIN IMMEDIATE) and sits on it."""
    script = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "c.execute('ROLLBACK')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(db), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def forged_config(cluster, directory: Path, port: int) -> Path:
    """A certificate from the real CA whose serial the cluster never recorded: the
    refusal is an audit write."""
    directory.mkdir()
    key = keygen(directory / "id")
    spec = user_cert_spec(
        user="mallory",
        perms=cluster.ca.permissions(cluster.store.get_user("alice")),
        serial=4242,
        now=int(time.time()),
        ttl=600,
    )
    cert = sign_user_cert(
        cluster.ca.user_ca, load_public_key((directory / "id.pub").read_bytes()), spec
    )
    (directory / "id-cert.pub").write_text(cert.public_bytes().decode() + "\n")
    return write_ssh_config(
        directory / "ssh_config",
        bastion_port=port,
        key=key,
        cert=directory / "id-cert.pub",
        cluster=cluster,
    )


def test_a_locked_database_freezes_no_one(dt_cluster, tmp_path):
    cluster, store = dt_cluster, dt_cluster.store
    for name in ("alice", "bob", "carol"):
        store.add_user(User(name, ("access",), (LOGIN,)))
    with sshd_node(tmp_path / "node", cluster) as node, bastion_server(cluster.state_dir) as b:
        store.add_node(Node("node-1", "127.0.0.1", node.port))
        alice = user_client(cluster, tmp_path / "alice", "alice", bastion_port=b.port)
        bob = user_client(cluster, tmp_path / "bob", "bob", bastion_port=b.port)
        carol = user_client(cluster, tmp_path / "carol", "carol", bastion_port=b.port)
        forged = forged_config(cluster, tmp_path / "forged", b.port)
        echo = Echo(alice)
        try:
            echo.roundtrip()  # the session is live
            since = time.time()
            locker = hold_write_lock(cluster.state_dir / "cluster.db", LOCK_SECONDS)
            rtts: list[float] = []
            stop = threading.Event()

            def probe() -> None:
                while not stop.is_set():
                    rtts.append(echo.roundtrip())
                    time.sleep(0.1)

            prober = threading.Thread(target=probe)
            prober.start()
            try:
                # Things that need a write, all while the lock is held: a new session's
                # start, a refusal (auth.failed), a shell request (session.denied).
                jump = subprocess.Popen(
                    ["ssh", "-F", str(bob), f"{LOGIN}@node-1", "true"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                refused = ssh(forged, "bastion", "true")
                start = time.monotonic()
                shell = ssh(carol, "bastion", "id")
                handshake = time.monotonic() - start
                held = locker.poll() is None  # all of the above happened under the lock
                _, jump_err = jump.communicate(timeout=60)
                locker.wait(30)
                released = time.monotonic()
                time.sleep(0.5)
            finally:
                stop.set()
                prober.join(30)
            assert rtts and max(rtts) < ECHO_BOUND, f"echo froze: {max(rtts):.1f} s"
            assert handshake < 5.0, f"a new connection took {handshake:.1f} s"
            assert held, "the probes must have run while the lock was held"
            assert refused.returncode == 255
            assert shell.returncode == 1 and "offers no shell" in shell.stderr, shell.stderr
            # The new session either waited for the lock or was refused cleanly.
            if jump.returncode != 0:
                assert "cannot record this session" in jump_err, jump_err
            echo.roundtrip()  # still the same live session afterwards
            assert b.proc.poll() is None and "Traceback" not in b.log(), b.log()[-3000:]
            deadline = released + 15
            wanted = {
                ("auth.failed", "mallory"): "was not issued by this cluster",
                ("session.denied", "carol"): "refused: the bastion offers no shell",
            }
            while time.monotonic() < deadline:
                events = store.list_audit(since=since)
                landed = {
                    key
                    for key, text in wanted.items()
                    if any((e.type, e.user) == key and text in e.message for e in events)
                }
                bob_rows = [e for e in events if e.user == "bob" and e.type.startswith("session")]
                if landed == set(wanted) and bob_rows:
                    break
                time.sleep(0.1)
            assert landed == set(wanted), [(e.type, e.user, e.message) for e in events]
            assert bob_rows, "the new session's start or refusal was never audited"
        finally:
            echo.close()
    assert store.list_audit(type="session.end", user="alice")  # written at its close
