"""Checklist #34: SSH messages out of order against the real `dt-bastion serve`.

The bastion leaves message order to asyncssh, so nothing in bastion/ would notice if an
upgrade or a server option relaxed it. These tests send userauth, service and channel
messages before key exchange ends, and a channel open before authentication, and require
each time that the bastion hangs up (fails closed), opens no TCP connection for the early
channel, audits nothing that looks like a login or a session, and keeps serving.

asyncssh itself would serve userauth without a SERVICE_REQUEST for ssh-userauth; the
bastion refuses that order in ``begin_auth`` (RFC 4253 section 10), tested below.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from types import SimpleNamespace

import asyncssh
import pytest
from asyncssh.connection import SSHClientConnection

from bastion.authz.records import Node, User
from bastion.ca.certs import load_public_key
from tests.sshd import LOGIN, keygen

pytestmark = pytest.mark.integration
MSG_DISCONNECT, MSG_SERVICE_REQUEST, MSG_KEXINIT = 1, 5, 20
MSG_USERAUTH_REQUEST, MSG_CHANNEL_OPEN = 50, 90


def _s(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(data)) + data


def _payload(msg: int, *strings: str) -> bytes:
    return bytes([msg]) + b"".join(_s(text) for text in strings)


def _channel_open(host: str, port: int) -> bytes:
    """direct-tcpip to host:port, what `ssh -J` sends (RFC 4254 section 7.2)."""
    return (
        _s("direct-tcpip")
        + struct.pack(">III", 0, 2**21, 32768)
        + _s(host)
        + struct.pack(">I", port)
        + _s("127.0.0.1")
        + struct.pack(">I", 1)
    )


EARLY = {
    "userauth-none": _payload(MSG_USERAUTH_REQUEST, "alice", "ssh-connection", "none"),
    "service-request": _payload(MSG_SERVICE_REQUEST, "ssh-userauth"),
    "channel-open": bytes([MSG_CHANNEL_OPEN]) + _channel_open("node-1", 22),
}

# Broad enough that algorithm negotiation succeeds and the order is what gets refused.
CLIENT_KEXINIT = (
    bytes([MSG_KEXINIT])
    + os.urandom(16)
    + _s("curve25519-sha256,ecdh-sha2-nistp256,kex-strict-c-v00@openssh.com")
    + _s("ssh-ed25519-cert-v01@openssh.com,ssh-ed25519,ecdsa-sha2-nistp256,rsa-sha2-256")
    + _s("aes128-ctr,aes256-ctr") * 2
    + _s("hmac-sha2-256-etm@openssh.com") * 2
    + _s("none") * 2
    + _s("") * 2
    + b"\x00"
    + struct.pack(">I", 0)
)


def packet(payload: bytes) -> bytes:
    """An unencrypted SSH binary packet (RFC 4253 section 6): block size 8, padding >= 4."""
    padding = 8 - (5 + len(payload)) % 8
    padding += 8 if padding < 4 else 0
    return struct.pack(">IB", 1 + len(payload) + padding, padding) + payload + os.urandom(padding)


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def split_packets(data: bytes) -> list[bytes]:
    """The payloads of the server's unencrypted packets after its version line."""
    data = data[data.index(b"\n") + 1 :]
    payloads = []
    while len(data) >= 5:
        length, padding = struct.unpack(">IB", data[:5])
        payloads.append(data[5 : 4 + length - padding])
        data = data[4 + length :]
    return payloads


@pytest.fixture
def env(dt_cluster, dt_bastion, tmp_path):
    """alice may reach node-1, which is a plain listening socket we watch for connects."""
    target = socket.create_server(("127.0.0.1", 0))
    target.settimeout(10)
    store = dt_cluster.store
    store.add_user(User("alice", ("access",), (LOGIN,)))
    store.add_node(Node("node-1", "127.0.0.1", target.getsockname()[1]))
    keygen(tmp_path / "id", "alice")
    issued = dt_cluster.ca.sign_user("alice", load_public_key((tmp_path / "id.pub").read_bytes()))
    (tmp_path / "id-cert.pub").write_text(issued.openssh + "\n")
    key = asyncssh.read_private_key(str(tmp_path / "id"))
    cert = asyncssh.read_certificate(str(tmp_path / "id-cert.pub"))
    last_id = store.list_audit(limit=1)[0].id
    yield SimpleNamespace(
        bastion=dt_bastion, store=store, target=target, keys=[(key, cert)], last_id=last_id
    )
    target.close()


async def connect(env, keys=None) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        env.bastion.port,
        username="alice",
        client_keys=keys or env.keys,
        known_hosts=None,  # the host key is not under test here
        agent_path=None,
        config=None,
        preferred_auth="publickey",
    )


def new_audit_events(env) -> list:
    """Audit rows since setup; the refusal is written as the bastion drops the connection,
    which the client may see first, so wait (bounded) for at least one."""
    deadline = time.monotonic() + 10
    while not (events := [e for e in env.store.list_audit() if e.id > env.last_id]):
        if time.monotonic() > deadline:
            return []
        time.sleep(0.05)
    return events


def assert_failed_closed(env) -> None:
    """Alive, nothing connected to the node, nothing audited as a success or a session,
    no traceback; then a normal client still reaches node-1 through the same bastion,
    which also shows that the listener would have seen an early forward."""
    assert env.bastion.proc.poll() is None, env.bastion.log()
    env.target.settimeout(0.5)  # a bound for a connect still in flight, not a measurement
    with pytest.raises(TimeoutError):
        env.target.accept()
    events = new_audit_events(env)
    assert events and {(e.type, e.success) for e in events} == {("auth.failed", False)}, events
    assert "Traceback" not in env.bastion.log()

    async def normal_client():
        async with await connect(env) as conn:
            _, writer = await conn.open_connection("node-1", 22)
            writer.close()

    asyncio.run(asyncio.wait_for(normal_client(), 20))
    env.target.settimeout(10)
    env.target.accept()[0].close()


@pytest.mark.parametrize("kexinit_first", [False, True], ids=["no-kexinit", "mid-kex"])
@pytest.mark.parametrize("message", sorted(EARLY))
def test_messages_before_key_exchange_ends_are_refused(env, message, kexinit_first):
    """Before NEWKEYS nothing is encrypted or authenticated: a userauth, a service request
    or a channel open there must end the connection with a protocol error, not an answer."""
    with socket.create_connection(("127.0.0.1", env.bastion.port), timeout=10) as sock:
        sock.sendall(b"SSH-2.0-out-of-order\r\n")
        data = sock.recv(256)
        assert data.startswith(b"SSH-2.0-dt-bastion")
        sock.sendall((packet(CLIENT_KEXINIT) if kexinit_first else b"") + packet(EARLY[message]))
        data += read_to_eof(sock)
    payloads = split_packets(data)
    assert [p[0] for p in payloads] == [MSG_KEXINIT, MSG_DISCONNECT], payloads
    code, reason_len = struct.unpack(">II", payloads[-1][1:9])
    reason = payloads[-1][9 : 9 + reason_len].decode()
    assert code == asyncssh.DISC_PROTOCOL_ERROR and "before k" in reason, reason
    assert_failed_closed(env)


@pytest.mark.parametrize("service_request", ["after", "before", "never"])
def test_channel_open_before_auth_is_refused(env, monkeypatch, service_request):
    """Key exchange done, userauth not finished: a direct-tcpip open to a node alice may
    reach, from alice's own valid certificate, must not reach the node. The open goes out
    just after, just before, or instead of the ssh-userauth service request."""
    request = SSHClientConnection.send_service_request

    def send_early_channel_open(self, service):
        if service_request == "before":
            request(self, service)
        self._auth_complete = True  # asyncssh's client would hold the open back until auth
        try:
            self.send_packet(MSG_CHANNEL_OPEN, _channel_open("node-1", 22))
        finally:
            self._auth_complete = False
        if service_request == "after":
            request(self, service)

    with monkeypatch.context() as patch:
        patch.setattr(SSHClientConnection, "send_service_request", send_early_channel_open)
        # The bastion's DISCONNECT says why; a client that wrote again after the hang-up
        # may see only the broken pipe. The audit below has the reason either way.
        with pytest.raises((asyncssh.ProtocolError, ConnectionError)) as refused:
            asyncio.run(asyncio.wait_for(connect(env), 20))
    if isinstance(refused.value, asyncssh.ProtocolError):
        assert "before authentication" in str(refused.value)
    events = new_audit_events(env)
    assert any("before authentication" in e.message for e in events), events
    assert_failed_closed(env)


def skip_service_request(self, service):
    """Start userauth as if the server had accepted ssh-userauth, without asking for it."""
    self._auth_in_progress = True
    self._owner.begin_auth(self._username)
    self.try_next_auth()


def test_skipping_the_service_request_skips_no_check(env, monkeypatch):
    """Whatever the order, a key without a certificate from our CA gets no login."""
    plain_key = [asyncssh.generate_private_key("ssh-ed25519")]
    with monkeypatch.context() as patch:
        patch.setattr(SSHClientConnection, "send_service_request", skip_service_request)
        with pytest.raises(asyncssh.DisconnectError):  # out of order, or no valid key
            asyncio.run(asyncio.wait_for(connect(env, plain_key), 20))
    assert_failed_closed(env)


def test_userauth_without_service_request_is_refused(env, monkeypatch):
    """RFC 4253 section 10: userauth runs only once ssh-userauth was requested and accepted.
    Here a valid certificate skips SERVICE_REQUEST and goes straight to userauth."""

    async def attempt():
        conn = await connect(env)
        conn.close()  # reached only if the bastion let that login through
        await conn.wait_closed()

    with monkeypatch.context() as patch:
        patch.setattr(SSHClientConnection, "send_service_request", skip_service_request)
        with pytest.raises(asyncssh.ProtocolError, match="before the ssh-userauth service"):
            asyncio.run(asyncio.wait_for(attempt(), 20))
    assert_failed_closed(env)


def test_a_client_without_strict_kex_is_refused_with_the_fix(env, monkeypatch):
    """Checklist #33 (Terrapin): a client that does not offer kex-strict-c is sent away,
    with a message naming the fix, before it may authenticate. The refusal does not
    depend on the cipher; the client here uses aes128-gcm because asyncssh's client,
    once told not to offer strict kex, still resets its own sequence numbers when the
    server offers it, which breaks chacha20 and MAC ciphers on its side (not ours)."""

    def no_strict(self):
        return [b"ext-info-c"]

    async def attempt():
        return await asyncssh.connect(
            "127.0.0.1",
            env.bastion.port,
            username="alice",
            client_keys=env.keys,
            known_hosts=None,
            agent_path=None,
            config=None,
            encryption_algs=["aes128-gcm@openssh.com"],
        )

    with monkeypatch.context() as patch:
        patch.setattr(SSHClientConnection, "_get_extra_kex_algs", no_strict)
        with pytest.raises(asyncssh.ProtocolError, match="strict key exchange"):
            asyncio.run(asyncio.wait_for(attempt(), 20))
    assert_failed_closed(env)
