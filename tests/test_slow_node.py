"""A forwarded session is registered before its node connect starts.

Attack: a jump to a node whose TCP connect takes seconds (a far or overloaded node;
here a loopback relay whose listen queue is full, so the kernel drops the bastion's
SYNs until the relay makes room) and `dtadmin lock --user` committing while that
connect is still in flight. Before this change the session was registered only once
connected, after the watcher's re-check had run, and then never looked at again: it
forwarded for good (7.7 s past the lock in the report). Now the watcher sees the
session while it connects, the connect is abandoned, and nothing is forwarded.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.authz.records import Node, User
from tests.sshd import LOGIN, bastion_server, sshd_node, user_client

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
SYN_SENT = "02"


class SlowRelay:
    """A TCP relay to ``upstream`` on loopback that lets nobody connect until
    :meth:`release`: its one-slot listen queue is held by a connection of its own, so a
    connect to it waits in SYN-SENT, retransmitting, as to a node slow to answer."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self._filler = socket.create_connection(("127.0.0.1", self.port))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []

    def release(self) -> None:
        filler, _ = self.listener.accept()
        filler.close()
        self._filler.close()
        self.listener.settimeout(0.1)
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            node = socket.create_connection(("127.0.0.1", self.upstream))
            self._socks += [client, node]
            self._spawn(self._pump, client, node)
            self._spawn(self._pump, node, client)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        for sock in (self._filler, self.listener, *self._socks):
            sock.close()
        for thread in self._threads:
            thread.join(5)


def connecting_to(port: int) -> bool:
    """Whether some socket on this host is in SYN-SENT towards 127.0.0.1:``port``."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == want and fields[3] == SYN_SENT:
            return True
    return False


@pytest.fixture
def slow(dt_cluster, tmp_path) -> Iterator:
    with sshd_node(tmp_path / "node", dt_cluster) as node:
        relay = SlowRelay(node.port)
        try:
            dt_cluster.store.add_node(Node("node-1", "127.0.0.1", relay.port))
            with bastion_server(dt_cluster.state_dir) as bastion:
                yield type("Slow", (), {"relay": relay, "bastion": bastion})
        finally:
            relay.close()


def jump_while_connecting(dt_cluster, slow, tmp_path):
    """An `ssh -J` session, returned once the bastion's connect to the node hangs."""
    dt_cluster.store.add_user(User("alice", ("access",), (LOGIN,)))
    config = user_client(dt_cluster, tmp_path / "alice", "alice", bastion_port=slow.bastion.port)
    proc = subprocess.Popen(
        ["ssh", "-F", str(config), f"{LOGIN}@node-1", "echo", "up;", "sleep", "30"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not connecting_to(slow.relay.port):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the bastion never started connecting"
        time.sleep(0.02)
    return proc


def test_a_lock_during_the_node_connect_stops_the_session(dt_cluster, slow, tmp_path):
    proc = jump_while_connecting(dt_cluster, slow, tmp_path)
    try:
        lock = subprocess.run(
            [BIN / "dtadmin", "--state", str(dt_cluster.state_dir), "lock", "--user", "alice"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ},
        )
        assert lock.returncode == 0, lock.stderr
        time.sleep(0.5)  # the watcher's turn; the node is still not answering
        slow.relay.release()  # now the node answers
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("the session ran on after the lock (its node connect outlived the check)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "up" not in out, "the session forwarded after the lock"
    assert proc.returncode == 255, err
    assert 'user "alice" is locked' in err, err
    store = dt_cluster.store
    assert not store.list_audit(type="session.start", user="alice")
    denied = store.list_audit(type="session.denied", user="alice")
    assert any('user "alice" is locked' in e.message for e in denied), denied


def test_a_slow_node_still_works(dt_cluster, slow, tmp_path):
    """The control: the same slow connect, nothing changed meanwhile, forwards."""
    proc = jump_while_connecting(dt_cluster, slow, tmp_path)
    try:
        slow.relay.release()
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    finally:
        proc.kill()
        proc.wait()
    assert dt_cluster.store.list_audit(type="session.start", user="alice")
