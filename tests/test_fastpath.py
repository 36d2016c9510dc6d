"""bastion/proxy/fastpath.py: asyncssh's per-packet work cut, with the same results.

The AES-GCM shim must produce byte for byte what asyncssh's own does (same nonces, same
tags) and refuse what it refuses; the lazily re-armed keepalive timer must still end a
client that stops answering, and never one that is moving data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from asyncssh.crypto.cipher import GCMCipher

from bastion.authz.records import User
from bastion.proxy import fastpath
from tests.sshd import LOGIN, bastion_server, user_client


@pytest.mark.parametrize("name,key_size", [("aes128-gcm", 16), ("aes256-gcm", 32)])
def test_gcm_shim_seals_and_opens_exactly_as_asyncssh(name, key_size):
    key, iv = os.urandom(key_size), os.urandom(4) + (2**64 - 3).to_bytes(8, "big")  # wraps
    theirs, ours = GCMCipher(name, key, iv), fastpath.FastGCMCipher(name, key, iv)
    opener = fastpath.FastGCMCipher(name, key, iv)
    for size in (16, 32, 32768, 48, 16):  # past the 64-bit counter's wrap
        header, data = os.urandom(4), os.urandom(size)
        sealed = theirs.encrypt_and_sign(header, data)
        assert ours.encrypt_and_sign(header, data) == sealed
        body, tag = sealed
        assert opener.verify_and_decrypt(header, body[4:], tag) == data
    bad = fastpath.FastGCMCipher(name, key, iv)
    header, data = os.urandom(4), os.urandom(64)
    body, tag = GCMCipher(name, key, iv).encrypt_and_sign(header, data)
    assert bad.verify_and_decrypt(header, body[4:], bytes(16)) is None


def test_install_is_idempotent_and_replaces_the_gcm_cipher():
    import asyncssh.encryption

    assert fastpath.install() and fastpath.install()
    assert asyncssh.encryption.GCMCipher is fastpath.FastGCMCipher


@pytest.mark.integration
def test_keepalive_still_ends_a_silent_client(dt_cluster, dt_node, tmp_path):
    """Keepalives every 0.5 s, two unanswered end it: an `ssh -J` client (both of its
    processes: the ProxyJump one holds the bastion connection) stopped with SIGSTOP
    after moving data is cut within seconds."""
    store = dt_cluster.store
    args = ("--set", "keepalive_interval=0.5", "--set", "keepalive_count_max=2")
    with bastion_server(dt_cluster.state_dir, extra_args=args) as bastion:
        store.add_user(User("quiet", ("access",), (LOGIN,)))
        config = user_client(dt_cluster, tmp_path / "quiet", "quiet", bastion_port=bastion.port)
        proc = subprocess.Popen(
            ["ssh", "-F", str(config), f"{LOGIN}@node-1", "head -c 5000000 /dev/zero; sleep 60"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not store.list_audit(type="session.start"):
                assert time.monotonic() < deadline, bastion.log()
                time.sleep(0.05)
            time.sleep(1)  # the data has moved: the timer was re-armed lazily meanwhile
            os.killpg(proc.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            while not store.list_audit(type="session.end"):
                assert time.monotonic() < stopped + 20, "a silent client was never cut"
                time.sleep(0.1)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGCONT)
            proc.wait()
