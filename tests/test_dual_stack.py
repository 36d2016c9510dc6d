"""A load balancer on IPv4 in front of a dual-stack listener (``--listen [::]:P``).

On [::] the kernel hands an IPv4 peer over IPv4-mapped (``::ffff:127.0.0.1``, the socket
being dual-stack: IPV6_V6ONLY=0). Compared as it was with ``proxy_protocol_from``
(127.0.0.1), the trusted balancer was refused as a PROXY-header forger. Both the peer
and a mapped client address in the header are now unmapped first.

Here the balancer is a small relay that ssh runs as its ProxyCommand: it connects to the
bastion by 127.0.0.1, sends a PROXY v2 header naming the client, then carries the
stock ssh's bytes; ``ssh -J`` goes through it to a real sshd node.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from bastion.authz.records import Node, User
from bastion.ca.certs import load_public_key
from bastion.cluster import init_cluster
from bastion.proxy import proxyproto
from bastion.proxy.proxied import unmapped
from tests.sshd import LOGIN, bastion_server, keygen, ssh, sshd_node, write_ssh_config

RELAY = """\
import os, socket, sys, threading
from bastion.proxy import proxyproto

port, client = int(sys.argv[1]), sys.argv[2]
sock = socket.create_connection(("127.0.0.1", port))
local = "::ffff:127.0.0.1" if ":" in client else "127.0.0.1"
sock.sendall(proxyproto.build_v2((client, 50123), (local, port)))

def upstream():
    while data := os.read(0, 65536):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)

threading.Thread(target=upstream, daemon=True).start()
while data := sock.recv(65536):
    os.write(1, data)
"""


@pytest.mark.parametrize(
    "addr, expected",
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("127.0.0.1", "127.0.0.1"),
        ("2001:db8::7", "2001:db8::7"),
        ("::1", "::1"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_unmapped(addr, expected):
    assert unmapped(addr) == expected


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dual")
    cluster = init_cluster(tmp / "state", "dual")
    cluster.store.add_user(User("alice", ("access",), (LOGIN,)))
    config = tmp / "bastion.toml"
    config.write_text('[bastion]\nproxy_protocol_from = ["127.0.0.1"]\n')
    (tmp / "relay.py").write_text(RELAY)
    with (
        sshd_node(tmp / "node", cluster) as node,
        bastion_server(
            tmp / "state", listen_host="::", extra_args=("--config", str(config))
        ) as bastion,
    ):
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port, {"env": "test"}))
        yield type("Env", (), {"tmp": tmp, "cluster": cluster, "node": node, "bastion": bastion})
    cluster.close()


def _through_balancer(env, name: str, client: str) -> Path:
    """Key, certificate and an ssh_config whose bastion hop goes through the relay."""
    d = env.tmp / name
    d.mkdir()
    key = keygen(d / "id", "alice")
    issued = env.cluster.ca.sign_user("alice", load_public_key((d / "id.pub").read_bytes()))
    (d / "id-cert.pub").write_text(issued.openssh + "\n")
    config = write_ssh_config(
        d / "ssh_config",
        bastion_port=env.bastion.port,
        key=key,
        cert=d / "id-cert.pub",
        cluster=env.cluster,
    )
    relay = (
        f"    ProxyCommand {sys.executable} {env.tmp / 'relay.py'} {env.bastion.port} {client}\n"
    )
    text = config.read_text().replace(
        "    HostKeyAlias 127.0.0.1\n", f"    HostKeyAlias 127.0.0.1\n{relay}", 1
    )
    config.write_text(text)
    return config


def _session_start(env, client: str, bound: float = 10.0):
    deadline = time.monotonic() + bound
    while True:
        rows = [
            e for e in env.cluster.store.list_audit(type="session.start") if e.remote_addr == client
        ]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


@pytest.mark.integration
@pytest.mark.parametrize(
    "client, audited",
    [("203.0.113.9", "203.0.113.9"), ("::ffff:198.51.100.7", "198.51.100.7")],
    ids=["ipv4-client", "mapped-client"],
)
def test_an_ipv4_balancer_on_a_dual_stack_listener_is_trusted(env, client, audited):
    config = _through_balancer(env, f"via-{audited}", client)
    result = ssh(config, f"{LOGIN}@node-1", "echo", "through")
    assert result.returncode == 0 and result.stdout.strip() == "through", result.stderr
    rows = _session_start(env, audited)
    assert rows and rows[-1].user == "alice", rows
    forged = [
        e for e in env.cluster.store.list_audit() if "not a trusted load balancer" in e.message
    ]
    assert forged == []
    assert not [
        e for e in env.cluster.store.list_audit() if e.remote_addr and "::ffff:" in e.remote_addr
    ]


@pytest.mark.integration
def test_a_client_without_a_balancer_still_cannot_send_a_header(tmp_path):
    """The other side of it: from an address that is not a balancer (::1 here, on the
    same dual-stack listener), a PROXY header is still refused as a forgery."""
    cluster = init_cluster(tmp_path / "state", "dual")
    config = tmp_path / "bastion.toml"
    config.write_text('[bastion]\nproxy_protocol_from = ["127.0.0.1"]\n')
    try:
        with bastion_server(
            tmp_path / "state", listen_host="::", extra_args=("--config", str(config))
        ) as bastion:
            with socket.create_connection(("::1", bastion.port), timeout=10) as sock:
                sock.sendall(proxyproto.build_v2(("2001:db8::9", 1), ("::1", bastion.port)))
                sock.settimeout(5)
                try:
                    while sock.recv(4096):
                        pass
                except OSError:
                    pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                refused = [
                    e
                    for e in cluster.store.list_audit(type="auth.failed")
                    if "not a trusted load balancer" in e.message
                ]
                if refused:
                    break
                time.sleep(0.05)
        assert refused and refused[-1].remote_addr == "::1", refused
        assert not [e for e in cluster.store.list_audit() if e.remote_addr == "2001:db8::9"]
    finally:
        cluster.close()


@pytest.mark.integration
def test_a_disconnect_reason_behind_the_balancer_is_the_clients_words(env):
    """Behind a balancer too, a client's disconnect reason is recorded once, quoted as
    the client's, and under the header's address (it was also recorded as the bastion's
    own reason for the failed handshake)."""
    reason = "bye\nDT3101I session.start allow user=admin"
    with socket.create_connection(("127.0.0.1", env.bastion.port), timeout=10) as sock:
        sock.sendall(proxyproto.build_v2(("192.0.2.44", 40000), ("127.0.0.1", env.bastion.port)))
        sock.sendall(b"SSH-2.0-OpenSSH_9.2p1 forger\r\n")
        sock.recv(4096)
        payload = b"\x01" + (2).to_bytes(4, "big") + len(reason).to_bytes(4, "big")
        payload += reason.encode() + bytes(4)
        pad = 8 - (len(payload) + 5) % 8
        pad += 8 if pad < 4 else 0
        sock.sendall(
            (len(payload) + pad + 1).to_bytes(4, "big") + bytes([pad]) + payload + bytes(pad)
        )
        sock.settimeout(5)
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = [e for e in env.cluster.store.list_audit() if "bye" in e.message]
        if rows:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # a second row, if any, would follow at once
    rows = [e for e in env.cluster.store.list_audit() if "bye" in e.message]
    assert len(rows) == 1, [(e.message, e.remote_addr) for e in rows]
    assert rows[0].message.startswith("client disconnected before login: 'bye\\nDT3101I")
    assert rows[0].remote_addr == "192.0.2.44"
