"""Checklist #10: revocation by serial, by key id, by user and by whole CA, at the
bastion and at a stock sshd node (KRL), including empty and corrupt revocation lists.

Every case runs against the real parts: `dtadmin` as a console script, `dt-bastion
serve`, `ssh -J`, and an sshd whose RevokedKeys is the KRL `dtadmin ca krl` wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bastion.authz.records import User
from bastion.ca import keys
from bastion.ca.authority import USER_CA_SETTING
from bastion.ca.certs import load_public_key, sign_user_cert, user_cert_spec
from bastion.cluster import Cluster, init_cluster
from bastion.protocol.errors import StateError
from tests.audit_rows import messages_once
from tests.sshd import LOGIN, bastion_server, keygen, ssh, sshd_node, write_ssh_config

BIN = Path(sys.executable).parent


@pytest.fixture
def cluster(tmp_path):
    c = init_cluster(tmp_path / "state", "revocation")
    c.store.add_user(User("alice", ("access",), (LOGIN,)))
    c.store.add_user(User("bob", ("access",), (LOGIN,)))
    yield c
    c.close()


def dtadmin(cluster, *args, check=True):
    proc = subprocess.run(
        [BIN / "dtadmin", "--state", str(cluster.state_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def issue(cluster, directory: Path, user="alice", bastion_port=0):
    """A key, a certificate for it, and an ssh_config through the bastion."""
    directory.mkdir(parents=True, exist_ok=True)
    key = keygen(directory / "id", user)
    issued = cluster.ca.sign_user(user, load_public_key((directory / "id.pub").read_bytes()))
    (directory / "id-cert.pub").write_text(issued.openssh + "\n")
    config = write_ssh_config(
        directory / "ssh_config",
        bastion_port=bastion_port,
        key=key,
        cert=directory / "id-cert.pub",
        cluster=cluster,
    )
    return issued, config


# -- the records -----------------------------------------------------------------------------


def test_revoke_by_serial_key_id_and_user(cluster, tmp_path):
    a1, _ = issue(cluster, tmp_path / "a1")
    a2, _ = issue(cluster, tmp_path / "a2")
    b1, _ = issue(cluster, tmp_path / "b1", user="bob")
    store = cluster.store
    assert [c.serial for c in store.revoke_certs(time.time(), key_id=a1.record.key_id)] == [
        a1.record.serial
    ]
    assert [c.serial for c in store.revoke_certs(time.time(), user="alice")] == [a2.record.serial]
    assert [c.serial for c in store.revoke_certs(time.time(), serials=(b1.record.serial,))] == [
        b1.record.serial
    ]
    # revoking again changes nothing, and no selector means nothing, never "everything"
    assert store.revoke_certs(time.time(), user="alice", key_id=a1.record.key_id) == []
    assert store.revoke_certs(time.time()) == []
    assert all(c.revoked for c in store.list_certs())


def test_cert_cli_lists_revokes_and_refuses_bad_input(cluster, tmp_path):
    a1, _ = issue(cluster, tmp_path / "a1")
    listed = dtadmin(cluster, "cert", "ls", "--user", "alice", "--format", "json").stdout
    assert str(a1.record.serial) in listed and a1.record.key_id in listed
    out = dtadmin(cluster, "cert", "revoke", "--key-id", a1.record.key_id, "--reason", "lost")
    assert "revoked 1 certificate" in out.stdout
    event = cluster.store.list_audit(type="cert.revoke")[-1]
    assert event.user == "alice" and "lost" in event.message
    again = dtadmin(cluster, "cert", "revoke", "--key-id", a1.record.key_id)
    assert "already revoked" in again.stdout + again.stderr
    for args, message in [
        ((), "name what to revoke"),
        (("12345",), "no user certificate with serial 12345"),
        (("--key-id", "nobody-1"), "no user certificate with key id"),
        (("--user", "carol"), 'no user "carol"'),
        (("not-a-number",), "not a valid int"),
    ]:
        proc = dtadmin(cluster, "cert", "revoke", *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
    refused = dtadmin(cluster, "ca", "rotate", check=False)
    assert refused.returncode != 0 and "--yes" in refused.stderr


# -- at the bastion ------------------------------------------------------------------------------


def _hold_session(config):
    proc = subprocess.Popen(
        ["ssh", "-F", str(config), f"{LOGIN}@node-1", "echo", "up;", "sleep", "60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the node answered: the session is live
    assert line.strip() == "up", proc.stderr.read() if proc.poll() is not None else line
    return proc


def _ended(proc):
    try:
        proc.wait(timeout=10)  # a bound, not a measurement
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode != 0


@pytest.fixture
def live(cluster, tmp_path):
    from bastion.authz.records import Node

    with sshd_node(tmp_path / "node", cluster) as node, bastion_server(cluster.state_dir) as b:
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port, {"env": "test"}))
        yield type("Live", (), {"node": node, "bastion": b})


def test_revoked_key_id_is_refused_and_its_session_cut(cluster, tmp_path, live):
    issued, config = issue(cluster, tmp_path / "a", bastion_port=live.bastion.port)
    _, other = issue(cluster, tmp_path / "b", bastion_port=live.bastion.port)
    proc = _hold_session(config)
    dtadmin(cluster, "cert", "revoke", "--key-id", issued.record.key_id)
    assert _ended(proc)
    terminated = cluster.store.list_audit(type="session.terminated")[-1]
    assert "has been revoked" in terminated.message
    refused = ssh(config, f"{LOGIN}@node-1", "true")
    assert refused.returncode == 255
    assert any(
        "has been revoked" in m
        for m in messages_once(cluster.store, "auth.failed", "has been revoked")
    )
    # alice's other certificate was not named, so it still works
    assert ssh(other, f"{LOGIN}@node-1", "true").returncode == 0


def test_ca_rotation_revokes_everything_the_old_ca_signed(cluster, tmp_path, live):
    _, old_config = issue(cluster, tmp_path / "old", bastion_port=live.bastion.port)
    proc = _hold_session(old_config)
    out = dtadmin(cluster, "ca", "rotate", "--yes")
    assert "certificate(s) revoked" in out.stdout
    assert _ended(proc)
    assert ssh(old_config, "bastion").returncode == 255  # not even to the bastion itself
    # this test process still holds the old CA: it must not sign with it
    with pytest.raises(StateError, match="rotated"):
        issue(cluster, tmp_path / "stale", bastion_port=live.bastion.port)
    assert cluster.refresh_user_ca()
    _, new_config = issue(cluster, tmp_path / "new", bastion_port=live.bastion.port)
    # the running bastion switched to the new CA by itself: authentication passes
    result = ssh(new_config, "bastion")
    assert "offers no shell" in result.stderr, result.stderr
    rotated = cluster.store.list_audit(type="ca.rotate")[-1]
    assert rotated.success and "1 certificate(s) revoked" in rotated.message


# -- at the node: the KRL -----------------------------------------------------------------------


def direct(node, directory: Path, cluster):
    known = directory / "known_hosts"
    known.write_text(
        f"@cert-authority * {(cluster.state_dir / 'ca' / 'host_ca.pub').read_text().strip()}\n"
    )
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-p", str(node.port), "-i", str(directory / "id")]
        + ["-o", f"CertificateFile={directory / 'id-cert.pub'}", "-o", "IdentitiesOnly=yes"]
        + ["-o", f"UserKnownHostsFile={known}", "-o", "BatchMode=yes"]
        + [f"{LOGIN}@127.0.0.1", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_krl_at_the_node_empty_key_id_whole_ca_and_corrupt(cluster, tmp_path):
    krl = tmp_path / "revoked.krl"
    dtadmin(cluster, "ca", "krl", "--out", str(krl))  # nothing revoked yet: an empty list
    a, _ = issue(cluster, tmp_path / "a")
    b, _ = issue(cluster, tmp_path / "b")
    old_ca = cluster.ca.user_ca
    with sshd_node(tmp_path / "node", cluster, extra=f"RevokedKeys {krl}\n") as node:
        assert direct(node, tmp_path / "a", cluster).returncode == 0  # empty list revokes nothing

        dtadmin(cluster, "cert", "revoke", "--key-id", a.record.key_id)
        dtadmin(cluster, "ca", "krl", "--out", str(krl))
        assert direct(node, tmp_path / "a", cluster).returncode == 255
        assert direct(node, tmp_path / "b", cluster).returncode == 0

        # A certificate the old CA signs after the fact (a leaked key) was never
        # recorded, so no serial or key id names it: only revoking the CA stops it.
        forged = tmp_path / "forged"
        forged.mkdir()
        keygen(forged / "id")
        spec = user_cert_spec(
            user="alice",
            perms=cluster.ca.permissions(cluster.store.get_user("alice")),
            serial=777,
            now=int(time.time()),
            ttl=600,
        )
        pub = load_public_key((forged / "id.pub").read_bytes())
        (forged / "id-cert.pub").write_text(
            sign_user_cert(old_ca, pub, spec).public_bytes().decode() + "\n"
        )
        assert direct(node, forged, cluster).returncode == 0  # the node still trusts old CA
        dtadmin(cluster, "ca", "rotate", "--yes")
        dtadmin(cluster, "ca", "krl", "--out", str(krl))
        assert direct(node, forged, cluster).returncode == 255
        assert direct(node, tmp_path / "b", cluster).returncode == 255

        # A corrupt or truncated list must fail closed: sshd refuses every key it
        # cannot check. (An *empty* file is sshd's "no revoked keys", which is why
        # `dtadmin ca krl` writes through a temp file and a rename, never in place.)
        good = krl.read_bytes()
        cluster.refresh_user_ca()
        c, _ = issue(cluster, tmp_path / "c")
        (tmp_path / "node" / "user_ca.pub").write_text(
            (cluster.state_dir / "ca" / "user_ca.pub").read_text()
        )
        assert direct(node, tmp_path / "c", cluster).returncode == 0
        krl.write_bytes(b"SSHKRL\n\x00garbage" + os.urandom(64))
        assert direct(node, tmp_path / "c", cluster).returncode == 255
        krl.write_bytes(good[: len(good) // 2])
        assert direct(node, tmp_path / "c", cluster).returncode == 255
        dtadmin(cluster, "ca", "krl", "--out", str(krl))
        assert direct(node, tmp_path / "c", cluster).returncode == 0  # a good list again
    assert "revoked" in node.log().lower()


# -- rotation survives crashes ---------------------------------------------------------------------


def test_uncommitted_rotation_is_discarded_at_open(cluster):
    kdir = keys.ca_dir(cluster.state_dir)
    before = cluster.ca.user_ca_fingerprint
    keys.create_key(kdir, "user_ca.next", "crashed")  # written, never committed
    reopened = Cluster.open(cluster.state_dir)
    try:
        assert reopened.ca.user_ca_fingerprint == before
        assert not (kdir / "user_ca.next").exists()
    finally:
        reopened.close()


def test_committed_rotation_is_finished_at_open(cluster):
    kdir = keys.ca_dir(cluster.state_dir)
    pending = keys.create_key(kdir, "user_ca.next", "committed")
    cluster.store.set_setting(USER_CA_SETTING, keys.fingerprint(pending.public_key()))
    reopened = Cluster.open(cluster.state_dir)  # the crash came before the renames
    try:
        assert reopened.ca.user_ca_fingerprint == keys.fingerprint(pending.public_key())
        assert not (kdir / "user_ca.next").exists()
        assert list((kdir / "retired").glob("user_ca-*.pub"))
    finally:
        reopened.close()


def test_a_ca_file_the_database_does_not_name_is_refused(cluster):
    kdir = keys.ca_dir(cluster.state_dir)
    (kdir / "user_ca").unlink()
    (kdir / "user_ca.pub").unlink()
    keys.create_key(kdir, "user_ca", "swapped in by someone")
    with pytest.raises(StateError, match="not the CA the cluster database names"):
        Cluster.open(cluster.state_dir)
