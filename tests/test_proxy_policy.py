"""The bastion's decisions with no sockets: certificate admission, device trust, nodes.

Certificates are built here with pyca/cryptography and the cluster's own CA key, so each
defect can be made on purpose (our CA would refuse to sign most of them), then read back
with ``parse_cert`` exactly as the server reads the blob a client presents.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import ssh as cssh

from bastion.authz.records import (
    Device,
    DeviceCredential,
    IssuedCert,
    Lock,
    Node,
    Role,
    User,
)
from bastion.ca.certs import parse_cert
from bastion.cluster import init_cluster
from bastion.protocol.certs import JUMP_PRINCIPAL, fingerprint
from bastion.protocol.errors import AccessDenied, DeviceNotTrusted
from bastion.proxy import policy
from bastion.proxy.sessions import LiveSession, Registry

CRED = DeviceCredential("cred-1", b"\x30", "tpm_ekcert", "ab" * 32)


@pytest.fixture
def cluster(tmp_path):
    c = init_cluster(tmp_path / "state", "policy")
    c.store.add_user(User("alice", ("access",), ("root",)))
    c.store.add_user(User("bob", ("access",), ("root",)))
    c.store.add_node(Node("node-1", "10.0.0.5", 2222, {"env": "prod"}))
    c.store.add_node(Node("node-6", "fd00::6", 22, {"env": "dev"}))
    yield c
    c.close()


def make_cert(
    cluster,
    *,
    user="alice",
    ca=None,
    serial=None,
    principals=("root", JUMP_PRINCIPAL),
    valid=(-60, 600),
    extensions=None,
    critical=None,
    cert_type=cssh.SSHCertificateType.USER,
    record=True,
    record_user=None,
):
    """A certificate as a client would present it; recorded as issued unless told not to."""
    serial = serial if serial is not None else int(time.time_ns() % 2**62)
    now = int(time.time())
    valid = (now + valid[0], now + valid[1])  # offsets from now, in seconds
    exts = {"permit-port-forwarding": ""} if extensions is None else dict(extensions)
    if user is not None:
        exts["dt-user@dt-bastion"] = user
    public_key = ed25519.Ed25519PrivateKey.generate().public_key()
    builder = (
        cssh.SSHCertificateBuilder()
        .public_key(public_key)
        .type(cert_type)
        .serial(serial)
        .key_id(b"test")
        .valid_after(int(valid[0]))
        .valid_before(int(valid[1]))
    )
    if principals:
        builder = builder.valid_principals([p.encode() for p in principals])
    else:  # an empty list: OpenSSH reads it as "any principal"; it must never mean anyone
        builder = builder.valid_for_all_principals()
    for name, value in sorted(exts.items()):
        builder = builder.add_extension(name.encode(), value.encode())
    for name, value in sorted((critical or {}).items()):
        builder = builder.add_critical_option(name.encode(), value.encode())
    cert = builder.sign(ca or cluster.ca.user_ca)
    if record:
        cluster.store.record_cert(
            IssuedCert(
                serial,
                "test",
                record_user or user or "?",
                "user",
                tuple(principals),
                int(valid[0]),
                int(valid[1]),
                fingerprint(public_key),
                device_id=exts.get("device-id@dt-bastion"),
            )
        )
    return parse_cert(cert.public_bytes())


def admit(cluster, cert, now=None):
    now = time.time() if now is None else now
    return policy.check_certificate(cert, cluster.store, cluster.ca.user_ca_fingerprint, now)


def device_exts(device, credential_id="cred-1"):
    return {
        "permit-port-forwarding": "",
        "device-id@dt-bastion": device.id,
        "device-asset-tag@dt-bastion": device.asset_tag,
        "device-credential-id@dt-bastion": credential_id,
    }


# -- may this certificate connect at all ------------------------------------------------------


def test_a_certificate_from_our_ca_admits_its_user(cluster):
    identity = admit(cluster, make_cert(cluster))
    assert identity.user == "alice" and identity.permit_port_forwarding
    assert not identity.has_device


def test_a_real_certificate_from_our_ca_is_admitted(cluster):
    issued = cluster.ca.sign_user("alice", ed25519.Ed25519PrivateKey.generate().public_key())
    identity = admit(cluster, parse_cert(issued.openssh.encode()))
    assert identity.user == "alice" and identity.serial == issued.record.serial


@pytest.mark.parametrize(
    "defect, kwargs, reason",
    [
        ("another CA", {"ca": ed25519.Ed25519PrivateKey.generate()}, "unknown CA"),
        ("host cert", {"cert_type": cssh.SSHCertificateType.HOST}, "host certificate"),
        ("expired", {"valid": (-7200, -3600)}, "expired"),
        ("not yet valid", {"valid": (300, 3600)}, "not yet valid"),
        ("ends now", {"valid": (-60, 0)}, "expired"),
        ("no jump principal", {"principals": ("root",)}, "not issued for this bastion"),
        ("empty principals", {"principals": ()}, "not issued for this bastion"),
        ("no dt-user", {"user": None}, "names no dt-bastion user"),
        ("odd dt-user", {"user": "alice\nbob"}, "names no dt-bastion user"),
        ("serial not issued", {"record": False}, "was not issued by this cluster"),
        ("serial of bob", {"record_user": "bob"}, "was not issued by this cluster"),
        ("unknown user", {"user": "mallory"}, 'user "mallory" does not exist'),
        ("critical option", {"critical": {"dt-evil@x": "1"}}, "unknown critical option"),
    ],
)
def test_certificates_refused_with_a_reason(cluster, defect, kwargs, reason):
    with pytest.raises(AccessDenied, match=reason):
        admit(cluster, make_cert(cluster, **kwargs))


def test_revoked_serial_is_refused(cluster):
    cert = make_cert(cluster)
    cluster.store.revoke_cert(cert.serial, time.time())
    with pytest.raises(AccessDenied, match="has been revoked"):
        admit(cluster, cert)


def test_locked_user_is_refused_with_the_lock_message(cluster):
    cluster.store.add_lock(Lock("", "user", "alice", "on holiday"))
    with pytest.raises(AccessDenied, match='user "alice" is locked: on holiday'):
        admit(cluster, make_cert(cluster))


def test_an_expired_lock_no_longer_refuses(cluster):
    cluster.store.add_lock(Lock("", "user", "alice", "", expires=time.time() - 1))
    assert admit(cluster, make_cert(cluster)).user == "alice"


def test_known_critical_options_are_read(cluster):
    cert = make_cert(cluster, critical={"force-command": "/bin/true"})
    assert admit(cluster, cert).force_command == "/bin/true"


# -- device trust -------------------------------------------------------------------------------


def enrolled(cluster, owner="alice", tag="SN1"):
    return cluster.store.add_device(Device("", tag, "linux", "enrolled", owner, CRED))


@pytest.mark.parametrize(
    "cluster_mode, roles, expected",
    [
        ("optional", ("access",), "optional"),
        ("off", ("access",), "off"),
        ("required", ("access",), "required"),
        ("off", ("access", "require-trusted-device"), "required"),
        ("bogus", ("access",), "required"),
        (None, ("access",), "required"),
    ],
)
def test_effective_mode_is_the_strictest(cluster, cluster_mode, roles, expected):
    if cluster_mode is None:
        cluster.store.set_setting("device_trust_mode", None)
    else:
        cluster.store.set_setting("device_trust_mode", cluster_mode)
    cluster.store.update_user(replace(cluster.store.get_user("alice"), roles=roles))
    assert policy.trust_mode(cluster.store, "alice") == expected


def test_a_role_that_cannot_be_read_means_required(cluster):
    cluster.store.put_role(Role("temp", logins=("root",), node_labels={"*": ("*",)}))
    cluster.store.update_user(replace(cluster.store.get_user("alice"), roles=("temp",)))
    cluster.store.remove_role("temp")
    assert policy.trust_mode(cluster.store, "alice") == "required"
    assert policy.trust_mode(cluster.store, "nobody-at-all") == "required"


def test_required_mode_without_device_extensions(cluster):
    cluster.store.set_setting("device_trust_mode", "required")
    identity = admit(cluster, make_cert(cluster))
    with pytest.raises(DeviceNotTrusted, match=r"a trusted device is required \(run: dtclient"):
        policy.check_device(cluster.store, identity, time.time())


def test_required_mode_with_the_users_enrolled_device(cluster):
    cluster.store.set_setting("device_trust_mode", "required")
    device = enrolled(cluster)
    identity = admit(cluster, make_cert(cluster, extensions=device_exts(device)))
    assert identity.asset_tag == "SN1"
    assert policy.check_device(cluster.store, identity, time.time()) == "required"


def _device_case(cluster, case):
    if case == "unknown":
        ghost = Device("dev-ghost", "GHOST", "linux")
        return device_exts(ghost), "is not in the inventory"
    if case == "unenrolled":
        dev = cluster.store.add_device(Device("", "UN1", "linux", "not_enrolled", "alice"))
        return device_exts(dev), "is not enrolled"
    if case == "other user":
        return device_exts(enrolled(cluster, owner="bob")), "is enrolled by another user"
    if case == "id of another device":
        enrolled(cluster, tag="SN1")
        other = enrolled(cluster, tag="SN2")
        exts = device_exts(other)
        exts["device-asset-tag@dt-bastion"] = "SN1"
        return exts, "is not in the inventory"
    if case == "re-enrolled":
        return device_exts(enrolled(cluster), credential_id="cred-old"), "was re-enrolled"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["unknown", "unenrolled", "other user", "id of another device", "re-enrolled"]
)
def test_required_mode_refuses_a_bad_device(cluster, case):
    cluster.store.set_setting("device_trust_mode", "required")
    exts, reason = _device_case(cluster, case)
    identity = admit(cluster, make_cert(cluster, extensions=exts))
    with pytest.raises(DeviceNotTrusted, match=reason):
        policy.check_device(cluster.store, identity, time.time())


def test_device_unenrolled_after_signing_is_refused_from_then_on(cluster):
    cluster.store.set_setting("device_trust_mode", "required")
    device = enrolled(cluster)
    identity = admit(cluster, make_cert(cluster, extensions=device_exts(device)))
    policy.check_device(cluster.store, identity, time.time())
    cluster.store.update_device(replace(device, enroll_status="not_enrolled", credential=None))
    with pytest.raises(DeviceNotTrusted, match="is not enrolled"):
        policy.check_device(cluster.store, identity, time.time())


def test_a_locked_device_is_refused_even_when_trust_is_optional(cluster):
    device = enrolled(cluster)
    identity = admit(cluster, make_cert(cluster, extensions=device_exts(device)))
    cluster.store.add_lock(Lock("", "device", "SN1"))
    with pytest.raises(DeviceNotTrusted, match='device "SN1" is locked'):
        policy.check_device(cluster.store, identity, time.time())


def test_optional_mode_admits_without_a_device(cluster):
    identity = admit(cluster, make_cert(cluster))
    assert policy.check_device(cluster.store, identity, time.time()) == "optional"


# -- which node a direct-tcpip request means: no open relay -----------------------------------------


@pytest.mark.parametrize(
    "host, port, node",
    [
        ("node-1", 22, "node-1"),  # what ssh -J sends: the inventory port is used
        ("node-1", 2222, "node-1"),
        ("10.0.0.5", 2222, "node-1"),
        ("fd00::6", 22, "node-6"),
        ("[fd00::6]", 22, "node-6"),
        ("fd00:0::6", 22, "node-6"),
    ],
)
def test_inventory_nodes_resolve(cluster, host, port, node):
    assert policy.resolve_node(cluster.store, host, port).name == node


@pytest.mark.parametrize(
    "host, port",
    [
        ("node-1", 23),
        ("10.0.0.5", 22),  # another port of a listed address
        ("10.0.0.6", 2222),
        ("127.0.0.1", 25),
        ("localhost", 22),
        ("NODE-1.", 22),
        ("", 22),
        ("node-1\x00", 22),
    ],
)
def test_anything_else_is_refused(cluster, host, port):
    with pytest.raises(AccessDenied, match="not a node in the inventory"):
        policy.resolve_node(cluster.store, host, port)


# -- the whole decision for one forward, phrased for the user ---------------------------------------


def test_node_access_reason_names_the_node(cluster):
    cluster.store.set_setting("device_trust_mode", "required")
    identity = admit(cluster, make_cert(cluster))
    node = cluster.store.find_node("node-1")
    with pytest.raises(AccessDenied) as info:
        policy.check_node_access(cluster.store, identity, node, time.time())
    assert info.value.message == (
        "access denied to node-1: a trusted device is required "
        "(run: dtclient device enroll, then dtclient login)"
    )


def test_labels_decide_which_nodes(cluster):
    cluster.store.put_role(Role("dev-only", logins=("root",), node_labels={"env": ("dev",)}))
    cluster.store.update_user(replace(cluster.store.get_user("alice"), roles=("dev-only",)))
    identity = admit(cluster, make_cert(cluster))
    policy.check_node_access(
        cluster.store, identity, cluster.store.find_node("node-6"), time.time()
    )
    with pytest.raises(AccessDenied, match="node-1: your roles do not allow this node"):
        policy.check_node_access(
            cluster.store, identity, cluster.store.find_node("node-1"), time.time()
        )


def test_certificate_without_permit_port_forwarding_cannot_jump(cluster):
    identity = admit(cluster, make_cert(cluster, extensions={}))
    with pytest.raises(AccessDenied, match="does not permit port forwarding"):
        policy.check_node_access(
            cluster.store, identity, cluster.store.find_node("node-1"), time.time()
        )


@pytest.mark.parametrize("change", ["lock", "remove", "revoke"])
def test_user_changes_after_login_refuse_the_next_forward(cluster, change):
    cert = make_cert(cluster)
    identity = admit(cluster, cert)
    if change == "lock":
        cluster.store.add_lock(Lock("", "user", "alice"))
    elif change == "remove":
        cluster.store.remove_user("alice")
    else:
        cluster.store.revoke_cert(cert.serial, time.time())
    with pytest.raises(AccessDenied, match="access denied to node-1"):
        policy.check_node_access(
            cluster.store, identity, cluster.store.find_node("node-1"), time.time()
        )


# -- live sessions, re-decided when the state moves --------------------------------------------------


def _live(cluster, identity, node="node-1"):
    closed = []
    session = LiveSession(
        identity, cluster.store.find_node(node), "192.0.2.7", lambda: closed.append(True)
    )
    return session, closed


def test_a_session_ending_as_its_bastion_stops_removes_its_own_row(cluster):
    """A drain: a session ends on its own and the bastion stops at once. Its end is
    queued on the shared writer and may run after the registry let go of its claim;
    it must still remove the session's live_sessions row (under the instance it was
    filed under), or a sibling would later end it again as "killed or crashed"."""
    from bastion.proxy.workers import Workers

    async def drain_and_stop():
        workers = Workers(cluster.store)
        registry = Registry(cluster.store, workers=workers)
        registry.start()
        name = registry.instance
        session, _ = _live(cluster, admit(cluster, make_cert(cluster)))
        registry.add(session)
        workers.write_soon(lambda _store: time.sleep(1.5))  # the writer is busy
        registry.end(session)  # queued behind it
        await registry.stop()
        await asyncio.to_thread(workers.close)
        return name

    name = asyncio.run(drain_and_stop())
    assert cluster.store.list_open_sessions() == []
    end = cluster.store.list_audit(type="session.end")[-1]
    assert end.message == "session closed" and end.fields["bastion"] == name


def test_recheck_closes_only_sessions_no_longer_allowed(cluster):
    registry = Registry(cluster.store)
    device = enrolled(cluster)
    alice = admit(cluster, make_cert(cluster, extensions=device_exts(device)))
    bob = admit(cluster, make_cert(cluster, user="bob"))
    s_alice, closed_alice = _live(cluster, alice)
    s_bob, closed_bob = _live(cluster, bob)
    registry.add(s_alice)
    registry.add(s_bob)
    assert registry.recheck() == 0
    cluster.store.add_lock(Lock("", "device", "SN1", "stolen"))
    assert registry.recheck() == 1
    assert closed_alice and not closed_bob and set(registry.live) == {s_bob.id}
    terminated = cluster.store.list_audit(type="session.terminated")[-1]
    assert terminated.user == "alice" and terminated.device == "SN1" and not terminated.success
    assert 'device "SN1" is locked' in terminated.message
    assert terminated.remote_addr == "192.0.2.7"
    end = cluster.store.list_audit(type="session.end")[-1]
    assert end.user == "alice" and {"bytes_up", "bytes_down", "duration"} <= set(end.fields)


@pytest.mark.parametrize("change", ["mode", "node removed", "node moved", "role changed"])
def test_recheck_follows_mode_inventory_and_roles(cluster, change):
    registry = Registry(cluster.store)
    identity = admit(cluster, make_cert(cluster))
    session, closed = _live(cluster, identity)
    registry.add(session)
    store = cluster.store
    if change == "mode":
        store.set_setting("device_trust_mode", "required")
        reason = "a trusted device is required"
    elif change == "node removed":
        store.remove_node("node-1")
        reason = "was removed from the inventory"
    elif change == "node moved":
        store.remove_node("node-1")
        store.add_node(Node("node-1", "10.9.9.9", 22, {"env": "prod"}))
        reason = "was removed from the inventory"
    else:
        store.put_role(Role("dev-only", logins=("root",), node_labels={"env": ("dev",)}))
        store.update_user(replace(store.get_user("alice"), roles=("dev-only",)))
        reason = "your roles do not allow this node"
    assert registry.recheck() == 1 and closed
    assert reason in store.list_audit(type="session.terminated")[-1].message


def test_the_watcher_sees_a_revision_change_within_a_poll(cluster):
    registry = Registry(cluster.store, poll_interval=0.02)
    session, closed = _live(cluster, admit(cluster, make_cert(cluster)))

    async def scenario():
        registry.start()
        registry.add(session)
        await asyncio.sleep(0.05)
        assert not closed  # audit rows do not move the revision
        cluster.store.add_lock(Lock("", "user", "alice"))
        for _ in range(50):
            if closed:
                break
            await asyncio.sleep(0.01)
        await registry.stop()

    asyncio.run(scenario())
    assert closed and not registry.live
    assert "is locked" in cluster.store.list_audit(type="session.terminated")[-1].message


def test_stop_ends_every_session_with_an_end_event(cluster):
    registry = Registry(cluster.store, poll_interval=0.01)
    session, closed = _live(cluster, admit(cluster, make_cert(cluster)))

    async def scenario():
        registry.start()
        registry.add(session)
        await registry.stop("bastion shutting down")

    asyncio.run(scenario())
    assert closed and not registry.live
    end = cluster.store.list_audit(type="session.end")[-1]
    assert end.message == "bastion shutting down"
    assert not cluster.store.list_audit(type="session.terminated")


def test_a_failing_sweep_never_stops_revocation(cluster, monkeypatch):
    """The watcher also sweeps sessions of killed bastions; an I/O error there (a
    read-only or failing disk under run/) once killed the whole watcher, and with it
    the cutting of revoked sessions. The error is injected: it is the fault under test."""
    import errno

    from bastion.authz.records import OpenSession
    from bastion.proxy import instances

    def failing(state_dir, name):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(instances, "claim_if_dead", failing)
    cluster.store.add_open_session(OpenSession("abcdefabcdef", 1, time.time(), user="bob"))
    registry = Registry(cluster.store, poll_interval=0.01, sweep_interval=0.01)
    session, closed = _live(cluster, admit(cluster, make_cert(cluster)))

    async def scenario():
        registry.start()  # its start-up sweep fails too, and start goes on
        registry.add(session)
        await asyncio.sleep(0.05)  # several failing sweeps
        cluster.store.add_lock(Lock("", "user", "alice"))
        for _ in range(200):
            if closed:
                break
            await asyncio.sleep(0.01)
        await registry.stop()

    asyncio.run(scenario())
    assert closed and not registry.live
    assert "is locked" in cluster.store.list_audit(type="session.terminated")[-1].message
    assert [s.user for s in cluster.store.list_open_sessions()] == ["bob"]  # retried later


def test_a_session_whose_start_cannot_be_recorded_is_not_held(cluster):
    """No session goes unrecorded: when the start's audit row cannot be written (here
    another process holds the database), add() raises and keeps nothing, so no later
    session.end is written for a start that never was."""
    import sqlite3

    from bastion.protocol.errors import StorageUnavailable

    registry = Registry(cluster.store)
    session, closed = _live(cluster, admit(cluster, make_cert(cluster)))
    cluster.store.db.execute("PRAGMA busy_timeout = 50")  # fail fast, not after 10 s
    other = sqlite3.connect(cluster.store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StorageUnavailable):
            registry.add(session)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not registry.live and not closed
    assert registry.recheck() == 0
    assert not cluster.store.list_audit(type="session.start")
    assert not cluster.store.list_audit(type="session.end")
