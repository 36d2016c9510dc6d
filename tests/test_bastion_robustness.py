"""The bastion under misbehaving clients, and its shutdown, with real OpenSSH.

One cluster, node and bastion per module, the bastion with tight limits from a TOML
config (3 connections per source, a 2 s login grace time); the shutdown test starts a
bastion of its own (the dt_* fixtures in conftest.py) so it can stop it.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest

from bastion.authz.records import Device, DeviceCredential, Node, User
from tests.sshd import LOGIN, bastion_server, ssh, sshd_node, user_client

pytestmark = pytest.mark.integration
LOGIN_TIMEOUT = 2.0
PER_SOURCE = 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from bastion.cluster import init_cluster

    tmp = tmp_path_factory.mktemp("robust")
    cluster = init_cluster(tmp / "state", "robust")
    config = tmp / "bastion.toml"
    config.write_text(
        f"[bastion]\nmax_connections_per_source = {PER_SOURCE}\n"
        f"login_timeout = {LOGIN_TIMEOUT}\nkeepalive_interval = 5\n"
    )
    with (
        sshd_node(tmp / "node", cluster) as node,
        bastion_server(tmp / "state", extra_args=("--config", str(config))) as bastion,
    ):
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port))
        time.sleep(0.1)  # let the readiness probe's connection be forgotten
        yield type("Env", (), {"tmp": tmp, "cluster": cluster, "node": node, "bastion": bastion})
    cluster.close()


_count = iter(range(10_000))


def client(env, *, roles=("access",), device=None, port=None):
    name = f"r{next(_count)}"
    env.cluster.store.add_user(User(name, roles, (LOGIN,)))
    if device is not None:
        device = env.cluster.store.add_device(
            Device("", f"SN-{name}", "linux", "enrolled", name, device)
        )
    config = user_client(
        env.cluster, env.tmp / name, name, bastion_port=port or env.bastion.port, device=device
    )
    return name, config


def raw(env, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", env.bastion.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(4096):
        out += chunk
    return out


def audit_messages(env, kind="auth.failed", since=0.0):
    return [e.message for e in env.cluster.store.list_audit(type=kind) if e.time >= since]


def audited(env, text, kind="auth.failed", since=0.0, bound=5.0):
    """Whether an event with ``text`` lands within ``bound`` seconds. Rows written
    from the bastion's synchronous callbacks (a connection closed, a refusal at
    connect) land just after the client sees the close: the event loop never waits
    for the database."""
    deadline = time.monotonic() + bound
    while True:
        messages = audit_messages(env, kind, since)
        if any(text in m for m in messages) or time.monotonic() > deadline:
            return any(text in m for m in messages)
        time.sleep(0.05)


def test_strict_key_exchange_is_on(env):
    """Terrapin (CVE-2023-48795): asyncssh's strict kex must stay offered."""
    _, config = client(env)
    result = subprocess.run(
        ["ssh", "-vv", "-F", str(config), "bastion", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert "kex-strict-s-v00@openssh.com" in result.stderr


def test_a_stalled_client_is_dropped_at_the_login_timeout(env):
    since = time.time()
    sock = raw(env)
    try:
        start = time.monotonic()
        banner = read_until_closed(sock)
        waited = time.monotonic() - start
    finally:
        sock.close()
    assert banner.startswith(b"SSH-2.0-dt-bastion")
    assert LOGIN_TIMEOUT - 0.5 < waited < LOGIN_TIMEOUT + 3
    assert audited(env, "Login timeout expired", since=since)


def test_garbage_and_stalls_never_affect_others(env):
    since = time.time()
    _, config = client(env)
    garbage = raw(env, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)))
    stalled = raw(env, b"SSH-2.0-half-a-client\r\n")
    try:
        result = ssh(config, f"{LOGIN}@node-1", "echo", "still-fine")
        assert result.returncode == 0 and result.stdout.strip() == "still-fine", result.stderr
        assert garbage.recv(4096).startswith(b"SSH-2.0-dt-bastion")
        assert b"dt-bastion" not in read_until_closed(garbage)  # closed, nothing more said
    finally:
        garbage.close()
        stalled.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        messages = audit_messages(env, since=since)
        if any("connection closed before login" in m for m in messages):
            break
        time.sleep(0.1)
    assert any("connection closed before login" in m for m in messages), messages


def test_connections_per_source_are_limited(env):
    since = time.time()
    _, config = client(env)
    held = [raw(env) for _ in range(PER_SOURCE)]
    try:
        for sock in held:  # each got its banner: the bastion has counted it
            assert sock.recv(64).startswith(b"SSH-2.0-dt-bastion")
        refused = raw(env)
        try:
            answer = read_until_closed(refused)
        finally:
            refused.close()
        assert b"too many connections from your address" in answer
        result = ssh(config, "bastion", "true")
        assert result.returncode == 255
    finally:
        for sock in held:
            sock.close()
    assert audited(env, "too many connections from your address", since=since)
    time.sleep(0.2)
    result = ssh(config, f"{LOGIN}@node-1", "true")
    assert result.returncode == 0, result.stderr


def test_only_direct_tcpip_is_offered(env):
    user, config = client(env)
    base = ["ssh", "-F", str(config)]

    def run(*args):
        return subprocess.run(
            [*base, *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )

    remote = run("-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22", "bastion")
    assert remote.returncode == 255 and "remote port forwarding failed" in remote.stderr
    assert run("-s", "bastion", "sftp").returncode != 0
    for args in (("bastion", "id"), ("-s", "bastion", "netconf"), ("bastion",)):
        result = run(*args)
        assert result.returncode == 1, result
        assert "ssh -J" in result.stderr and "offers no shell" in result.stderr
    denied = [e for e in env.cluster.store.list_audit(type="session.denied") if e.user == user]
    assert any("command 'id' refused" in e.message for e in denied)
    assert any("subsystem 'netconf' refused" in e.message for e in denied)


def test_shutdown_ends_live_sessions_and_says_why(dt_cluster, dt_node, dt_bastion, tmp_path):
    """SIGTERM: forwarded sessions end audited, other clients get a reason, exit 0."""
    store = dt_cluster.store
    store.add_user(User("alice", ("access",), (LOGIN,)))
    config = user_client(dt_cluster, tmp_path / "alice", "alice", bastion_port=dt_bastion.port)

    def start(*args):
        return subprocess.Popen(
            ["ssh", "-F", str(config), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    live = start(f"{LOGIN}@node-1", "sleep", "30")
    idle = start("-N", "bastion")
    try:
        deadline = time.monotonic() + 15
        while not store.list_audit(type="session.start"):
            assert time.monotonic() < deadline, "session did not start"
            time.sleep(0.05)
        time.sleep(0.3)
        dt_bastion.proc.send_signal(signal.SIGTERM)
        assert dt_bastion.proc.wait(10) == 0, dt_bastion.log()
        assert live.wait(5) != 0
        assert idle.wait(5) != 0
        assert "the bastion is shutting down" in idle.stderr.read()
    finally:
        for proc in (live, idle):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    end = store.list_audit(type="session.end")
    assert len(end) == 1 and end[0].user == "alice"
    assert end[0].message == "bastion shutting down" and end[0].fields["bytes_down"] > 0
    assert "dt-bastion stopping" in dt_bastion.log()


def test_a_device_session_through_a_restricted_bastion(env):
    """Limits do not get in the way of the normal path with a trusted device."""
    cred = DeviceCredential("cred-r", b"\x30", "tpm_ekcert", "cd" * 32)
    name, config = client(env, roles=("access", "require-trusted-device"), device=cred)
    result = ssh(config, f"{LOGIN}@node-1", "true")
    assert result.returncode == 0, result.stderr
