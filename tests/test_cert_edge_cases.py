"""Certificates no honest tool would make, presented to the running bastion by stock ssh.

ssh-keygen and pyca/cryptography both refuse to build these (duplicate critical
options, a malformed CIDR, a self-signed certificate), so the test encodes them
itself from the OpenSSH certificate format (PROTOCOL.certkeys). The encoder is checked
by a control case the bastion must accept. Everything else about each certificate is
honest: our CA's signature, a serial this cluster recorded, the usual principals and
extensions, so the one defect is what gets it refused (checklist #4, #6, #7, #35).
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import struct
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz.records import IssuedCert, User
from bastion.ca.certs import user_cert_spec
from bastion.cluster import init_cluster
from tests.audit_rows import messages_once
from tests.sshd import LOGIN, bastion_server, keygen, ssh, write_ssh_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edge")
    cluster = init_cluster(tmp / "state", "edge")
    cluster.store.add_user(User("alice", ("access",), (LOGIN,)))
    with bastion_server(tmp / "state") as bastion:
        yield type("Env", (), {"tmp": tmp, "cluster": cluster, "bastion": bastion})
    cluster.close()


def _s(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(data)) + data


def _raw(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _options(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(_s(name) + (_s(_s(value)) if value else _s(b"")) for name, value in pairs)


def encode_cert(
    signer: ed25519.Ed25519PrivateKey,
    key: ed25519.Ed25519PublicKey,
    *,
    serial: int,
    key_id: str,
    principals: tuple[str, ...],
    valid: tuple[int, int],
    critical: list[tuple[str, str]],
    extensions: list[tuple[str, str]],
) -> bytes:
    """An ssh-ed25519-cert-v01@openssh.com line, fields exactly as given (even invalid)."""
    body = (
        _s("ssh-ed25519-cert-v01@openssh.com")
        + _s(os.urandom(32))
        + _s(_raw(key))
        + struct.pack(">QI", serial, 1)
        + _s(key_id)
        + _s(b"".join(_s(p) for p in principals))
        + struct.pack(">QQ", *valid)
        + _s(_options(critical))
        + _s(_options(extensions))
        + _s(b"")
        + _s(_s("ssh-ed25519") + _s(_raw(signer.public_key())))
    )
    signature = _s(_s("ssh-ed25519") + _s(signer.sign(body)))
    return b"ssh-ed25519-cert-v01@openssh.com " + base64.b64encode(body + signature) + b"\n"


def client(env, name: str, critical=(), signer=None, record=True) -> Path:
    """Key, hand-encoded certificate and ssh_config; returns the config."""
    cluster = env.cluster
    d = env.tmp / name
    d.mkdir()
    key_path = keygen(d / "id")
    key = serialization.load_ssh_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    perms = cluster.ca.permissions(cluster.store.get_user("alice"))
    spec = user_cert_spec(
        user="alice", perms=perms, serial=random.randrange(1, 2**62), now=int(time.time())
    )
    line = encode_cert(
        signer or cluster.ca.user_ca,
        key.public_key(),
        serial=spec.serial,
        key_id=spec.key_id,
        principals=spec.principals,
        valid=(spec.valid_after, spec.valid_before),
        critical=list(critical),
        extensions=sorted(spec.extensions.items()),
    )
    (d / "id-cert.pub").write_bytes(line)
    if record:
        cluster.store.record_cert(
            IssuedCert(
                spec.serial, spec.key_id, "alice", "user", spec.principals,
                spec.valid_after, spec.valid_before, "", None, time.time(),
            )
        )  # fmt: skip
    return write_ssh_config(
        d / "ssh_config",
        bastion_port=env.bastion.port,
        key=key_path,
        cert=d / "id-cert.pub",
        cluster=cluster,
    )


def refused_with(env, config: Path, reason: str) -> None:
    before = len(env.cluster.store.list_audit(type="auth.failed"))
    result = ssh(config, "bastion")
    assert result.returncode == 255 and "Permission denied" in result.stderr, result.stderr
    events = messages_once(env.cluster.store, "auth.failed", reason, after=before)
    assert any(reason in m for m in events), events
    assert env.bastion.proc.poll() is None


def test_control_the_hand_encoded_certificate_is_accepted(env):
    result = ssh(client(env, "control"), "bastion")
    assert "offers no shell" in result.stderr, result.stderr  # authenticated


@pytest.mark.parametrize(
    "name, critical, reason",
    [
        (
            "dup-force",
            [("force-command", "/bin/true"), ("force-command", "/bin/sh")],
            "malformed certificate",
        ),
        (
            "dup-source",
            [("source-address", "127.0.0.1/32"), ("source-address", "0.0.0.0/0")],
            "malformed certificate",
        ),
        ("bad-cidr", [("source-address", "999.1.1.1/99")], "malformed source-address"),
        ("not-here", [("source-address", "10.11.12.0/24")], "not valid from 127.0.0.1"),
    ],
)
def test_defective_critical_options_are_refused_with_a_reason(env, name, critical, reason):
    """asyncssh alone would take the last of two force-commands; we refuse the blob."""
    refused_with(env, client(env, name, critical), reason)


def test_a_matching_source_address_is_honoured(env):
    config = client(env, "src-ok", [("source-address", "10.0.0.0/8,127.0.0.0/8")])
    assert "offers no shell" in ssh(config, "bastion").stderr


def test_a_self_signed_certificate_is_refused(env):
    own = ed25519.Ed25519PrivateKey.generate()
    config = client(env, "selfsigned", signer=own)
    refused_with(env, config, "unknown CA")


def test_the_ca_key_itself_is_no_user_key(env):
    """Someone holding a copy of the CA's private key still cannot log in *with* it."""
    d = env.tmp / "ca-as-user"
    d.mkdir()
    config = write_ssh_config(
        d / "ssh_config",
        bastion_port=env.bastion.port,
        key=env.cluster.state_dir / "ca" / "user_ca",
        cert=d / "none-cert.pub",
        cluster=env.cluster,
    )
    refused_with(env, config, "not a certificate")


def test_agent_x11_and_remote_forwarding_are_refused(env):
    """Checklist #35: they all need a session channel or a global request the bastion
    refuses, so nothing of the client's agent or display ever reaches it."""
    config = client(env, "agent")
    d = config.parent

    async def attempt():
        async with asyncssh.connect(
            "127.0.0.1",
            env.bastion.port,
            username="dt",
            client_keys=[(str(d / "id"), str(d / "id-cert.pub"))],
            known_hosts=None,
            agent_path=None,
            agent_forwarding=True,
            config=None,
        ) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_session(asyncssh.SSHClientSession, x11_forwarding=True)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 22)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_session(asyncssh.SSHClientSession, subsystem="sftp")

    asyncio.run(asyncio.wait_for(attempt(), 30))
    result = subprocess.run(  # stock ssh asking for both
        ["ssh", "-F", str(config), "-A", "-X", "bastion"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0 and "offers no shell" in result.stderr
    assert env.bastion.proc.poll() is None
