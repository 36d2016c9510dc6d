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
from bastion.authz import posture, published
from bastion.authz.records import (
    Device,
    DeviceCredential,
    DevicePosture,
    Lock,
    Measurement,
    Role,
    User,
)
from bastion.ca.authority import UserCertRequest
from bastion.ca.certs import parse_cert
from bastion.cluster import init_cluster
from bastion.node_principals import decide, main
from bastion.protocol.errors import StateError

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
    assert (
        "trusted device is required" in decide("root", plain, state=publish(cluster), **kw).reason
    )
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


# -- measured-boot posture reaches nodes (bastion.authz.posture) --------------------------------

CHECKING = {"secure_boot": True, "on_failure": "withhold"}


def sign_with_posture(cluster, device, verdict):
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    issued = cluster.ca.sign(UserCertRequest("alice", key, device=device, posture=verdict))
    return parse_cert(issued.openssh.encode())


def test_a_certificate_from_before_a_checking_policy_is_refused_at_the_node(cluster):
    """The bastion refuses a certificate without a posture verdict once a policy checks
    the boot; a node reached directly admitted it (its state had no posture policy)."""
    store = cluster.store
    device = store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    before, kw = sign(cluster, device), dict(ca_fingerprints=fps(cluster), require_device=True)
    assert decide("root", before, state=publish(cluster), **kw).principals == ("root",)
    store.set_setting("posture_policy", posture.policy_doc(posture.policy_from_doc(CHECKING)))
    doc = node_state(cluster, now=time.time(), valid_for=60)
    assert doc["posture_policy"] == CHECKING
    refused = decide("root", before, state=publish(cluster), **kw)
    assert refused.principals == () and "carries no posture verdict" in refused.reason
    good = sign_with_posture(cluster, device, "pass")
    assert decide("root", good, state=publish(cluster), **kw).principals == ("root",)
    # a policy the bastion cannot read denies every measured device; so it does at the node
    boot = Measurement(pcrs={7: "bb" * 32}, log="replayed", secure_boot=True)
    store.put_device_posture(DevicePosture(device.id, baseline=boot, measured=boot, verdict="pass"))
    assert decide("root", good, state=publish(cluster), **kw).principals == ("root",)
    store.set_setting("posture_policy", {"secure_boot": "maybe"})
    assert node_state(cluster, now=time.time(), valid_for=60)["posture_policy"] == "unreadable"
    assert decide("root", good, state=publish(cluster), **kw).principals == ()


def test_a_roles_posture_policy_is_published_and_holds_at_the_node(cluster):
    """Exact PCR values too: their keys are numbers that JSON makes strings (14 sorts
    before 4 then), and the signature still verifies at the node."""
    store = cluster.store
    device = store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    pcrs = {"secure_boot": True, "pcrs": {"4": "aa" * 32, "14": "bb" * 32}}
    store.put_role(Role("booted", posture=posture.policy_from_doc(CHECKING)))
    store.put_role(Role("pinned", posture=posture.policy_from_doc(pcrs)))
    store.set_setting("posture_policy", pcrs)
    store.update_user(User("alice", ("access", "booted", "pinned"), ("root",)))
    doc = node_state(cluster, now=time.time(), valid_for=60)
    assert doc["roles"]["booted"]["posture"] == CHECKING
    assert (
        doc["roles"]["pinned"]["posture"]["pcrs"] == pcrs["pcrs"] == doc["posture_policy"]["pcrs"]
    )
    kw = dict(ca_fingerprints=fps(cluster), require_device=True, state=publish(cluster))
    assert decide("root", sign(cluster, device), **kw).principals == ()
    assert decide("root", sign_with_posture(cluster, device, "pass"), **kw).principals == ("root",)


def test_a_devices_failed_posture_is_published_without_its_measurements(cluster):
    """The stored verdict decides at the node (no baseline or PCRs travel); a stored
    boot that passed then but fails the policy of now is published as failing."""
    store = cluster.store
    device = store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    cert = sign_with_posture(cluster, device, "pass")
    kw = dict(ca_fingerprints=fps(cluster), require_device=True)
    boot = Measurement(pcrs={0: "aa" * 32, 7: "bb" * 32}, log="replayed", secure_boot=False)
    store.put_device_posture(DevicePosture(device.id, baseline=boot, measured=boot, verdict="pass"))
    assert decide("root", cert, state=publish(cluster), **kw).principals == ("root",)
    store.set_setting("posture_policy", CHECKING)  # stricter since the login
    doc = node_state(cluster, now=time.time(), valid_for=60)
    entry = doc["devices"]["SN1"]["posture"]
    assert entry["verdict"] == "withhold" and "Secure Boot" in entry["reasons"][0]
    assert set(entry) == {"verdict", "reasons"} and "aa" * 32 not in json.dumps(doc)
    refused = decide("root", cert, state=publish(cluster), **kw)
    assert refused.principals == () and "failed its posture check" in refused.reason
    store.set_setting("posture_policy", None)
    store.put_device_posture(
        DevicePosture(device.id, verdict="deny", reasons=("PCR 4 changed since enrollment",))
    )
    refused = decide("root", cert, state=publish(cluster), **kw)
    assert "PCR 4 changed since enrollment" in refused.reason


def test_continuous_attestation_at_the_node_goes_by_the_published_deadline(cluster):
    store = cluster.store
    device = store.add_device(Device("", "SN1", "linux", "enrolled", "alice", CRED))
    store.set_setting("posture_policy", {"attest_interval": "60s", "on_failure": "withhold"})
    store.put_device_posture(DevicePosture(device.id, attested_until=time.time() + 300))
    cert, kw = sign(cluster, device), dict(ca_fingerprints=fps(cluster), require_device=True)
    assert decide("root", cert, state=publish(cluster), **kw).principals == ("root",)
    store.set_attestation(device.id, 0, "PCR 4 changed during the session")
    refused = decide("root", cert, state=publish(cluster), **kw)
    assert refused.principals == () and "PCR 4 changed during the session" in refused.reason


def test_a_state_without_posture_fields_still_reads():
    """Documents published before posture existed carry none of its fields: they read
    (and decide) as before; unknown verdicts are refused, not guessed."""
    key = ed25519.Ed25519PrivateKey.generate()
    doc = published.build(
        cluster="c",
        user_ca_fingerprint="SHA256:x",
        cluster_mode="optional",
        users=[],
        roles=[],
        devices=[],
        locks=[],
        published=0.0,
        expires=60.0,
    )
    assert "posture_policy" not in doc
    published.sign(doc, "SHA256:x", key.sign)
    state = published.parse(json.dumps(doc).encode(), {"SHA256:x": key.public_key()})
    assert state.cluster_posture is None and state.postures == {}
    doc = published.build(
        cluster="c",
        user_ca_fingerprint="SHA256:x",
        cluster_mode="optional",
        users=[],
        roles=[],
        devices=[Device("d1", "SN1", "linux", "enrolled", "alice", CRED)],
        locks=[],
        published=0.0,
        expires=60.0,
        postures={"d1": DevicePosture("d1", verdict="pass")},
    )
    doc["devices"]["SN1"]["posture"]["verdict"] = "fine"
    published.sign(doc, "SHA256:x", key.sign)
    with pytest.raises(StateError, match="verdict"):
        published.parse(json.dumps(doc).encode(), {"SHA256:x": key.public_key()})
