"""dt-node-principals: the node-side device-trust decision, pure and via its CLI."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.admin.nodes import node_state
from bastion.authz import published
from bastion.authz.records import Device, DeviceCredential, Lock, Role, User
from bastion.ca.certs import parse_cert
from bastion.cluster import init_cluster
from bastion.node_principals import decide, main

CRED = DeviceCredential("cred-1", b"\x30", "tpm_ekcert", "ab" * 32)


@pytest.fixture
def cluster(tmp_path):
    c = init_cluster(tmp_path / "state", "test")
    c.store.add_user(User("alice", ("access",), ("root",)))
    yield c
    c.close()


def sign(cluster, device=None):
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return parse_cert(cluster.ca.sign_user("alice", key, device=device).openssh.encode())


def fps(cluster):
    return {cluster.ca.user_ca_fingerprint}


def publish(cluster, valid_for=3600.0, now=None):
    """What `dtadmin nodes publish` writes, as the node helper reads it."""
    doc = node_state(cluster, now=time.time() if now is None else now, valid_for=valid_for)
    return published.parse(json.dumps(doc).encode(), trusted(cluster))


def trusted(cluster):
    return {cluster.ca.user_ca_fingerprint: cluster.ca.user_ca.public_key()}


def test_device_cert_accepted_plain_refused(cluster):
    device = cluster.store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    good = decide("root", sign(cluster, device), ca_fingerprints=fps(cluster), require_device=True)
    assert good.principals == ("root",)
    plain = decide("root", sign(cluster), ca_fingerprints=fps(cluster), require_device=True)
    assert plain.principals == () and "no device extensions" in plain.reason
    optional = decide("root", sign(cluster), ca_fingerprints=fps(cluster), require_device=False)
    assert optional.principals == ("root",)


def test_wrong_login_and_wrong_ca(cluster):
    cert = sign(cluster)
    assert decide("bob", cert, ca_fingerprints=fps(cluster), require_device=False).principals == ()
    other = decide("root", cert, ca_fingerprints={"SHA256:other"}, require_device=False)
    assert "untrusted CA" in other.reason


def test_state_check_sees_unenrollment_and_locks(cluster):
    store = cluster.store
    device = store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    cert = sign(cluster, device)
    kw = dict(ca_fingerprints=fps(cluster), require_device=True)
    assert decide("root", cert, state=publish(cluster), **kw).principals == ("root",)
    store.add_lock(Lock("", "device", "SN1"))
    assert "locked" in decide("root", cert, state=publish(cluster), **kw).reason
    store.remove_locks_for("device", "SN1")
    store.update_device(
        Device(device.id, "SN1", "linux", "not_enrolled", "alice", None, created=device.created)
    )
    assert "not enrolled" in decide("root", cert, state=publish(cluster), **kw).reason


def test_state_check_sees_a_re_enrolled_device_as_the_bastion_does(cluster):
    """The helper's own copy of the device check had no credential-id check: a
    certificate for a device re-enrolled since (a new credential) was accepted here and
    refused at the bastion. Both now call the one rule in bastion.authz.decide."""
    from dataclasses import replace

    store = cluster.store
    device = store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    cert = sign(cluster, device)
    kw = dict(ca_fingerprints=fps(cluster), require_device=True)
    assert decide("root", cert, state=publish(cluster), **kw).principals == ("root",)
    store.update_device(replace(store.get_device("SN1"), credential=replace(CRED, id="cred-2")))
    refused = decide("root", cert, state=publish(cluster), **kw)
    assert refused.principals == () and "re-enrolled" in refused.reason


def test_cli_prints_login_or_nothing(cluster, capsys):
    ca_pub = cluster.state_dir / "ca" / "user_ca.pub"
    device = cluster.store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    for dev, expected in ((device, "root\n"), (None, "")):
        key = ed25519.Ed25519PrivateKey.generate().public_key()
        line = cluster.ca.sign_user("alice", key, device=dev).openssh.split()
        assert main(["--ca", str(ca_pub), "root", line[0], line[1]]) == 0
        assert capsys.readouterr().out == expected


@pytest.mark.parametrize(
    "args",
    [
        ["root", "ssh-ed25519", "AAAA"],
        ["root", "ssh-ed25519-cert-v01@openssh.com", "!!notbase64"],
        ["root", "ssh-ed25519-cert-v01@openssh.com", base64.b64encode(b"junk").decode()],
    ],
)
def test_cli_garbage_is_denied_without_traceback(cluster, args):
    ca_pub = cluster.state_dir / "ca" / "user_ca.pub"
    proc = subprocess.run(
        [sys.executable, "-m", "bastion.node_principals", "--ca", str(ca_pub), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout == ""
    assert "denied" in proc.stderr and "Traceback" not in proc.stderr


# -- the cluster's and the roles' modes, from the published state ------------------------------


def test_published_modes_decide_as_the_bastion_does(cluster):
    """The node followed neither the cluster's nor the roles' mode: every certificate
    without device extensions was refused, even in `optional` mode."""
    store, plain = cluster.store, sign(cluster)
    kw = dict(ca_fingerprints=fps(cluster), require_device=False)
    assert store.get_setting("device_trust_mode") == "optional"
    assert decide("root", plain, state=publish(cluster), **kw).principals == ("root",)
    store.set_setting("device_trust_mode", "off")
    assert decide("root", plain, state=publish(cluster), **kw).principals == ("root",)
    store.set_setting("device_trust_mode", "required")
    assert "trusted device is required" in decide("root", plain, state=publish(cluster), **kw).reason
    store.set_setting("device_trust_mode", "optional")
    store.set_user_roles("alice", ("access", "require-trusted-device"))
    assert decide("root", plain, state=publish(cluster), **kw).principals == ()
    store.put_role(Role("strict-ops", device_trust_mode="required"))
    store.set_user_roles("alice", ("access", "strict-ops"))
    assert decide("root", plain, state=publish(cluster), **kw).principals == ()
    # the node may be stricter than the cluster, never laxer
    store.set_user_roles("alice", ("access",))
    strict = dict(kw, require_device=True)
    assert decide("root", plain, state=publish(cluster), **strict).principals == ()


def test_published_state_refuses_unknown_users_locks_and_expired_copies(cluster):
    store, plain = cluster.store, sign(cluster)
    kw = dict(ca_fingerprints=fps(cluster), require_device=False)
    store.add_lock(Lock("", "user", "alice", message="laptop reported lost"))
    refused = decide("root", plain, state=publish(cluster), **kw)
    assert refused.principals == () and "laptop reported lost" in refused.reason
    store.remove_locks_for("user", "alice")
    store.remove_user("alice")
    assert "does not exist" in decide("root", plain, state=publish(cluster), **kw).reason
    store.add_user(User("alice", ("access",), ("root",)))
    old = publish(cluster, valid_for=60, now=time.time() - 120)
    stale = decide("root", plain, state=old, **kw)
    assert stale.principals == () and "expired" in stale.note


@pytest.mark.parametrize(
    "doc",
    [b"", b"[]", b'{"format": "other"}', b'{"format": "dt-node-state/1", "users": 1}'],
)
def test_malformed_published_state_is_refused(doc):
    with pytest.raises(published.StateError):
        published.parse(doc, {})


def test_published_state_must_be_signed_by_a_trusted_user_ca(cluster):
    """Whoever carries the file to the node cannot relax a mode or drop a lock."""
    cluster.store.set_setting("device_trust_mode", "required")
    doc = node_state(cluster, now=time.time(), valid_for=600)
    assert published.parse(json.dumps(doc).encode(), trusted(cluster)).cluster_mode == "required"
    relaxed = dict(doc, device_trust_mode="off")
    with pytest.raises(published.StateError, match="does not verify"):
        published.parse(json.dumps(relaxed).encode(), trusted(cluster))
    unsigned = {k: v for k, v in doc.items() if k != "signature"}
    with pytest.raises(published.StateError, match="not signed"):
        published.parse(json.dumps(unsigned).encode(), trusted(cluster))
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(published.StateError, match="not a user CA this node trusts"):
        published.parse(json.dumps(doc).encode(), {"SHA256:other": other})


def test_cli_with_the_published_state(cluster, tmp_path, capsys):
    ca_pub = cluster.state_dir / "ca" / "user_ca.pub"
    state = tmp_path / "dt_node_state.json"
    state.write_text(json.dumps(node_state(cluster, now=time.time(), valid_for=600)))
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    line = cluster.ca.sign_user("alice", key).openssh.split()
    argv = ["--ca", str(ca_pub), "--state", str(state), "root", line[0], line[1]]
    assert main(argv) == 0 and capsys.readouterr().out == "root\n"  # optional: in
    assert main(["--require-device", *argv]) == 0
    assert capsys.readouterr().out == ""  # the node asks for more than the cluster
    state.chmod(0o666)  # anyone could have relaxed it
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out == "" and "writable only by its owner" in out.err
    state.chmod(0o644)
    link = tmp_path / "link.json"
    link.symlink_to(state)
    assert main([*argv[:2], "--state", str(link), *argv[4:]]) == 0
    assert capsys.readouterr().out == ""


def test_an_expired_state_still_holds_its_locks_and_unenrollments(cluster):
    """Past its expiry the state's modes are not believed (a device is required), but
    what it denies still stands: a republish that stopped must not let a locked user
    back in (nothing in it can wrongly admit)."""
    store = cluster.store
    device = store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    cert = sign(cluster, device)
    kw = dict(ca_fingerprints=fps(cluster), require_device=False)
    store.add_lock(Lock("", "user", "alice", message="laptop reported lost"))
    old = publish(cluster, valid_for=60, now=time.time() - 120)
    locked = decide("root", cert, state=old, **kw)
    assert locked.principals == () and "laptop reported lost" in locked.reason
    assert "expired" in locked.note
    store.remove_locks_for("user", "alice")
    old = publish(cluster, valid_for=60, now=time.time() - 120)
    assert decide("root", cert, state=old, **kw).principals == ("root",)
    assert decide("root", sign(cluster), state=old, **kw).principals == ()
