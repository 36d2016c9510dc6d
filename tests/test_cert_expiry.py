"""An expired certificate opens nothing new, and ends its sessions where a role asks.

The rule (``authz.decide``): once a connection's certificate expires it opens no new
channel (a forward or a dt-api session), decided at each open; its live sessions go on
unless one of the user's roles says ``disconnect_expired_cert`` (as Teleport calls it).
A role that does not say is on where it requires a trusted device, off elsewhere, so a
long transfer is not cut without being asked for.

Attack tested with real ssh: a short-lived certificate, a connection opened while it
was valid, and after its expiry new forwards over that same connection (``ssh -L``)
and a running ``ssh -J`` session. Before this change both went on.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bastion import resources
from bastion.authz import decide, rbac
from bastion.authz.decide import CertClaims
from bastion.authz.facts import Facts
from bastion.authz.records import Device, DeviceCredential, IssuedCert, Node, Role, User
from bastion.protocol.errors import AccessDenied, UsageError
from bastion.storage import role_from_spec, role_to_spec
from tests.sshd import LOGIN, free_port, ssh, user_client, wait_for_port

NOW = 1_800_000_000.0
NODE = Node("node-1", "10.0.0.5", 22, {"env": "prod"})
ACCESS = Role("access", logins=("root",), node_labels={"*": ("*",)})
CRED = DeviceCredential("cred-x", b"\x30", "tpm_ekcert", "ef" * 32)


# -- the rule, with plain values ----------------------------------------------------------


@pytest.mark.parametrize(
    "roles, ends",
    [
        ((ACCESS,), False),  # says nothing, requires no device: a transfer goes on
        ((ACCESS, Role("rtd", device_trust_mode="required")), True),
        ((ACCESS, Role("opt", device_trust_mode="optional")), False),
        ((ACCESS, Role("say", disconnect_expired_cert=True)), True),
        ((Role("no", device_trust_mode="required", disconnect_expired_cert=False),), False),
        ((ACCESS, Role("odd", device_trust_mode="garbage")), True),  # unreadable: strictest
        ((ACCESS, None), True),  # a role that cannot be read
    ],
)
def test_who_ends_at_expiry(roles, ends):
    facts = Facts(cluster_mode="optional", user=User("alice", ()), roles=roles)
    assert decide.disconnect_expired_cert(facts) is ends
    assert rbac.disconnect_expired_cert([r for r in roles if r is not None]) is (
        ends and None not in roles
    )


def _claims_and_facts(roles, valid_before=NOW + 60):
    claims = CertClaims(
        "alice",
        7,
        "alice-7",
        "SHA256:k",
        "SHA256:ca",
        int(valid_before),
        permit_port_forwarding=True,
    )
    issued = IssuedCert(7, "alice-7", "alice", "user", ("root",), 0, int(valid_before), "SHA256:k")
    facts = Facts(
        "optional", "SHA256:ca", User("alice", tuple(r.name for r in roles)), roles, None, issued
    )
    return claims, facts


def test_expired_opens_nothing_and_ends_only_where_asked():
    for roles, ends in [
        ((ACCESS,), False),
        ((ACCESS, Role("s", disconnect_expired_cert=True)), True),
    ]:
        claims, facts = _claims_and_facts(roles)
        decide.check_channel_open(claims, facts, NODE, NOW)  # valid: all fine
        decide.check_live_session(claims, facts, NODE, NOW)
        later = NOW + 61
        with pytest.raises(
            AccessDenied, match="access denied to node-1: the certificate has expired"
        ):
            decide.check_channel_open(claims, facts, NODE, later)
        with pytest.raises(AccessDenied, match="has expired"):
            decide.check_not_expired(claims, later)
        if ends:
            with pytest.raises(AccessDenied, match="disconnect_expired_cert"):
                decide.check_live_session(claims, facts, NODE, later)
            with pytest.raises(AccessDenied, match="disconnect_expired_cert"):
                decide.check_live_connection(claims, facts, later)
        else:
            decide.check_live_session(claims, facts, NODE, later)
            decide.check_live_connection(claims, facts, later)


def test_role_yaml_and_storage_carry_the_option():
    doc = resources.load(
        "kind: role\nmetadata: {name: ops}\n"
        "spec:\n  options: {disconnect_expired_cert: true}\n  allow: {logins: [root]}\n"
    )
    role = resources.role_from_doc(doc)
    assert role.disconnect_expired_cert is True
    assert resources.role_doc(role)["spec"]["options"]["disconnect_expired_cert"] is True
    assert resources.role_from_doc(resources.role_doc(role)) == role
    unsaid = resources.role_from_doc(resources.load("kind: role\nmetadata: {name: r}\nspec: {}\n"))
    assert unsaid.disconnect_expired_cert is None
    assert "disconnect_expired_cert" not in resources.role_doc(unsaid)["spec"]["options"]
    with pytest.raises(UsageError, match="disconnect_expired_cert must be true or false"):
        resources.role_from_doc(
            resources.load(
                "kind: role\nmetadata: {name: r}\nspec:\n  options: {disconnect_expired_cert: 1}\n"
            )
        )
    # a role stored before the option existed reads as "not said"
    spec = role_to_spec(role)
    del spec["disconnect_expired_cert"]
    assert role_from_spec(spec).disconnect_expired_cert is None
    assert role_from_spec(role_to_spec(role)) == role


# -- with real ssh ------------------------------------------------------------------------------

BIN = Path(sys.executable).parent
TTL = 6  # seconds: enough to connect, short enough to wait for


def banner(port: int) -> bytes:
    """What comes back through a local forward: the node's SSH banner, or nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(10)
        try:
            return sock.recv(64)
        except (TimeoutError, ConnectionResetError):
            return b""


def stop_client(proc: subprocess.Popen) -> None:
    """Teardown only: an ssh client asked to stop is killed if it lingers (it once
    outlived SIGTERM by 10 s on a loaded CI machine, after every assertion held)."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.time()))


def short_lived(cluster, tmp: Path, name: str, port: int, roles=("access",), device=False):
    cluster.store.add_user(User(name, roles, (LOGIN,)))
    dev = None
    if device:
        dev = cluster.store.add_device(Device("", f"SN-{name}", "linux", "enrolled", name, CRED))
    config = user_client(cluster, tmp / name, name, bastion_port=port, device=dev, ttl=TTL)
    expires = time.time() + TTL
    return config, expires


def test_no_new_channel_on_an_expired_certificate(dt_cluster, dt_node, dt_bastion, tmp_path):
    config, expires = short_lived(dt_cluster, tmp_path, "alice", dt_bastion.port)
    local = free_port()
    proc = subprocess.Popen(
        ["ssh", "-F", str(config), "-N", "-L", f"127.0.0.1:{local}:node-1:22", "bastion"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(local, proc)
        assert banner(local).startswith(b"SSH-2.0-"), "the forward works while valid"
        assert time.time() < expires, "too slow to test before the certificate expired"
        until(expires + 1)
        assert banner(local) == b"", "a new channel opened on an expired certificate"
        assert proc.poll() is None  # the connection itself lives on (no role ends it)
    finally:
        stop_client(proc)
    denied = dt_cluster.store.list_audit(type="session.denied", user="alice")
    assert any("the certificate has expired" in e.message for e in denied), denied


@pytest.mark.parametrize("how", ["trusted-device role", "role yaml", "no role asks"])
def test_a_live_session_ends_at_expiry_where_a_role_asks(
    dt_cluster, dt_node, dt_bastion, tmp_path, how
):
    roles, device = ("access",), False
    if how == "trusted-device role":
        roles, device = ("access", "require-trusted-device"), True
    elif how == "role yaml":
        (tmp_path / "role.yaml").write_text(
            "kind: role\nmetadata: {name: strict}\n"
            "spec:\n  options: {disconnect_expired_cert: true}\n"
        )
        created = subprocess.run(
            [BIN / "dtadmin", "--state", str(dt_cluster.state_dir), "roles", "create", "-f"]
            + [str(tmp_path / "role.yaml")],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ},
        )
        assert created.returncode == 0, created.stderr
        roles = ("access", "strict")
    config, expires = short_lived(
        dt_cluster, tmp_path, "alice", dt_bastion.port, roles=roles, device=device
    )
    proc = subprocess.Popen(
        ["ssh", "-F", str(config), f"{LOGIN}@node-1", "echo", "up;", "sleep", "60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up", proc.stderr
        assert time.time() < expires, "too slow to test before the certificate expired"
        if how == "no role asks":
            until(expires + 2)
            assert proc.poll() is None, "a session was cut at expiry though no role asks"
            return
        proc.wait(timeout=expires - time.time() + 5)  # a bound, not a measurement
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode != 0
    said = proc.stderr.read() if proc.stderr else ""  # what the person reads
    assert "Received disconnect from" in said and "the certificate has expired" in said, said
    cut = dt_cluster.store.list_audit(type="session.terminated", user="alice")
    assert cut and "disconnect_expired_cert" in cut[-1].message, cut
    deadline = time.monotonic() + 5
    while not dt_cluster.store.list_audit(type="connection.terminated", user="alice"):
        assert time.monotonic() < deadline, "the connection's end was not audited"
        time.sleep(0.05)
    # and it cannot come back: the expired certificate is refused at the door, saying so
    again = ssh(config, f"{LOGIN}@node-1", "true")
    assert again.returncode == 255
    assert "dt-bastion: certificate refused: certificate expired at" in again.stderr, again.stderr
