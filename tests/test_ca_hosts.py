"""CA keys on several hosts: each host's own copy of ``ca/``, checked against the keys
the cluster database names (docs/getting-started.md, "Several bastions").

With SQLite every bastion shares one state directory, so "another host" is a copy of
the state directory (its database names the same keys) whose ``ca/`` holds a foreign
key: `dt-bastion serve` must refuse to start and say which file and what to copy. A
rotation done elsewhere (the database names a user CA this host's files do not have)
leaves a running bastion refusing to sign, with the reason, audited, until the key
is copied in.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz.records import User
from bastion.ca import keys
from bastion.ca.authority import (
    AUDIT_KEY_SETTING,
    HOST_CA_SETTING,
    USER_CA_SETTING,
)
from bastion.ca.certs import load_public_key
from bastion.cluster import Cluster, init_cluster
from bastion.protocol.errors import StateError
from tests.sshd import free_port, keygen

BIN = Path(sys.executable).parent


@pytest.fixture
def cluster(tmp_path):
    c = init_cluster(tmp_path / "state", "hosts")
    c.store.add_user(User("alice", ("access",), ("root",)))
    yield c
    c.close()


def test_the_database_names_every_key_in_force(cluster):
    kdir = keys.ca_dir(cluster.state_dir)
    for setting, name in (
        (USER_CA_SETTING, keys.USER_CA),
        (HOST_CA_SETTING, keys.HOST_CA),
        (AUDIT_KEY_SETTING, keys.AUDIT_KEY),
    ):
        key = keys.load_private_key(kdir / name)
        assert cluster.store.get_setting(setting) == keys.fingerprint(key.public_key())


def test_a_cluster_from_before_gets_its_keys_named_at_the_next_open(cluster):
    with cluster.store.transaction():
        cluster.store.db.execute(
            "DELETE FROM settings WHERE key IN (?, ?)", (HOST_CA_SETTING, AUDIT_KEY_SETTING)
        )
    Cluster.open(cluster.state_dir).close()
    assert cluster.store.get_setting(HOST_CA_SETTING) == cluster.ca.host_ca_fingerprint


@pytest.mark.parametrize("name", [keys.USER_CA, keys.HOST_CA, keys.AUDIT_KEY])
def test_serve_on_a_host_whose_copy_holds_a_foreign_key_refuses_to_start(cluster, tmp_path, name):
    other = tmp_path / "other-host"
    cluster.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copytree(cluster.state_dir, other, symlinks=True)
    kdir = keys.ca_dir(other)
    (kdir / name).unlink()
    (kdir / f"{name}.pub").unlink()
    keys.create_key(kdir, name, "a key of another cluster")
    proc = subprocess.run(
        [str(BIN / "dt-bastion"), "serve", "--state", str(other), "--listen",
         f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0, said
    assert str(kdir / name) in said and "cluster database names" in said, said
    assert f"copy ca/{name}" in said and "Traceback" not in said, said


def test_a_rotation_this_host_has_no_key_for_refuses_to_sign_and_says_why(cluster):
    """What a bastion on host B sees after `dtadmin ca rotate` on host A: the database
    names a user CA whose key is not in B's ca/ (written here as A's rotation would)."""
    rotated = keys.fingerprint(ed25519.Ed25519PrivateKey.generate().public_key())
    with cluster.store.transaction():
        cluster.store.set_setting(USER_CA_SETTING, rotated)
    assert cluster.refresh_user_ca() is False  # the file here is not that key
    key = keygen(Path(cluster.state_dir).parent / "alice-id", "alice")
    with pytest.raises(StateError, match="not the one in force") as refused:
        cluster.ca.sign_user("alice", load_public_key(Path(f"{key}.pub").read_bytes()))
    assert rotated in refused.value.message and "ca/user_ca" in refused.value.message
    [row] = [e for e in cluster.store.list_audit(type="cert.create") if not e.success]
    assert row.user == "alice" and "not the one in force" in row.message
    assert not cluster.store.list_certs(user="alice")
