"""The SSH algorithms the bastion offers: a modern set, named in config, audited by ssh-audit.

asyncssh's defaults negotiated ``diffie-hellman-group14-sha1`` and accepted ``ssh-rsa``
(SHA-1) user signatures. The bastion now offers only what ``BastionConfig`` names,
checked here with the real auditing tool (ssh-audit) against a running
``dt-bastion serve``, with Debian's stock ssh through ``ssh -J``, and with a client that
signs with ssh-rsa although the bastion does not advertise it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

from bastion.authz.records import Node, User
from bastion.ca.certs import load_public_key
from bastion.cluster import init_cluster
from bastion.config import ALGORITHMS, BastionConfig, load_config, parse_setting
from bastion.protocol.errors import UsageError
from tests.sshd import LOGIN, bastion_server, ssh, sshd_node, write_ssh_config

SSH_AUDIT = Path(sys.executable).parent / "ssh-audit"
WEAK = ("sha1", "ssh-rsa", "ssh-dss", "cbc", "3des", "arcfour", "md5", "group1-", "group14-")
# The one warning ssh-audit may give: curve25519-sha256 stays for OpenSSH before 9.9
# (Debian 12's 9.2 has no ML-KEM and asyncssh no sntrup761 without liboqs).
PQ_NOTE = "does not provide protection against post-quantum attacks"


# -- config -------------------------------------------------------------------------------------


def test_defaults_are_modern_and_post_quantum_first():
    cfg = BastionConfig()
    for name in ALGORITHMS:
        for alg in getattr(cfg, name):
            assert not any(weak in alg for weak in WEAK), (name, alg)
    assert cfg.kex_algs[0] == "mlkem768x25519-sha256"
    assert cfg.kex_algs[-1] == "curve25519-sha256"
    assert all(alg.endswith("-etm@openssh.com") for alg in cfg.mac_algs)
    assert {"rsa-sha2-256", "rsa-sha2-512", "ssh-ed25519"} <= set(cfg.signature_algs)


@pytest.mark.parametrize(
    "name, bad",
    [
        ("kex_algs", "diffie-hellman-group14-sha1"),
        ("kex_algs", "no-such-kex"),
        ("encryption_algs", "aes128-cbc"),
        ("mac_algs", "hmac-sha1"),
        ("signature_algs", "ssh-rsa"),
        ("signature_algs", "ssh-dss"),
    ],
)
def test_a_weak_or_unknown_name_is_refused_naming_the_allowed(name, bad):
    with pytest.raises(UsageError) as caught:
        load_config(None, **{name: [bad]})
    message = caught.value.message
    assert name in message and repr(bad) in message
    assert ", ".join(getattr(BastionConfig(), name)) in message  # the allowed ones, named


def test_an_empty_list_is_refused():
    with pytest.raises(UsageError, match="kex_algs is empty"):
        load_config(None, kex_algs=[])


def test_names_from_toml_and_set(tmp_path):
    path = tmp_path / "bastion.toml"
    path.write_text(
        '[bastion]\nkex_algs = ["curve25519-sha256"]\n'
        'encryption_algs = ["aes256-gcm@openssh.com", "aes128-gcm@openssh.com"]\n'
    )
    cfg = load_config(path, **dict([parse_setting('mac_algs=["hmac-sha2-512-etm@openssh.com"]')]))
    assert cfg.kex_algs == ("curve25519-sha256",)
    assert cfg.encryption_algs == ("aes256-gcm@openssh.com", "aes128-gcm@openssh.com")
    assert cfg.mac_algs == ("hmac-sha2-512-etm@openssh.com",)


def test_serve_refuses_a_weak_setting_clearly(tmp_path):
    init_cluster(tmp_path / "state", "algs").close()
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "dt-bastion"),
            "serve",
            "--state",
            str(tmp_path / "state"),
            "--listen",
            "127.0.0.1:0",
            "--set",
            'kex_algs=["diffie-hellman-group14-sha1"]',
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "kex_algs cannot offer 'diffie-hellman-group14-sha1'" in result.stderr
    assert "Traceback" not in result.stderr


# -- the running bastion ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("algs")
    cluster = init_cluster(tmp / "state", "algs")
    cluster.store.add_user(User("alice", ("access",), (LOGIN,)))
    with sshd_node(tmp / "node", cluster) as node, bastion_server(tmp / "state") as bastion:
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port, {"env": "test"}))
        yield type("Env", (), {"tmp": tmp, "cluster": cluster, "node": node, "bastion": bastion})
    cluster.close()


def _notes(report: dict) -> tuple[list, list]:
    fails, warns = [], []
    for section in ("kex", "key", "enc", "mac"):
        for entry in report[section]:
            notes = entry.get("notes", {})
            fails += [(entry["algorithm"], note) for note in notes.get("fail", [])]
            warns += [(entry["algorithm"], note) for note in notes.get("warn", [])]
    return fails, warns


@pytest.mark.integration
def test_ssh_audit_finds_no_failure_and_only_the_post_quantum_note(env):
    if not SSH_AUDIT.exists() and shutil.which("ssh-audit") is None:
        pytest.skip("ssh-audit is not installed (pip install -e '.[test]')")
    tool = str(SSH_AUDIT) if SSH_AUDIT.exists() else "ssh-audit"
    # The connection-rate (DHEat) probe is a flood check, not an algorithm one.
    result = subprocess.run(
        [tool, "-j", "--skip-rate-test", "-p", str(env.bastion.port), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    report = json.loads(result.stdout)
    fails, warns = _notes(report)
    assert fails == [], fails
    assert warns == [("curve25519-sha256", PQ_NOTE)], warns
    assert report["cves"] == [], report["cves"]
    assert not report.get("recommendations"), report["recommendations"]
    offered = [entry["algorithm"] for entry in report["kex"]]
    assert offered[0] == "mlkem768x25519-sha256", offered
    assert "diffie-hellman-group14-sha1" not in offered


def _user(env, name: str, key_type: str = "ed25519") -> tuple[Path, Path]:
    d = env.tmp / name
    d.mkdir()
    key = d / "id"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", name, "-f", str(key)], check=True
    )
    issued = env.cluster.ca.sign_user("alice", load_public_key((d / "id.pub").read_bytes()))
    (d / "id-cert.pub").write_text(issued.openssh + "\n")
    return key, d / "id-cert.pub"


@pytest.mark.integration
@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
def test_stock_ssh_jumps_with_the_bench_ciphers(env, cipher):
    key, cert = _user(env, f"jump-{cipher.split('@')[0]}")
    config = write_ssh_config(
        key.parent / "ssh_config",
        bastion_port=env.bastion.port,
        key=key,
        cert=cert,
        cluster=env.cluster,
    )
    # Both hops (the bastion's and the node's) are held to the one cipher, as bench does.
    config.write_text(
        config.read_text().replace(
            "    BatchMode yes\n", f"    BatchMode yes\n    Ciphers {cipher}\n"
        )
    )
    result = ssh(config, f"{LOGIN}@node-1", "-v", "echo", "jumped")
    assert result.returncode == 0 and "jumped" in result.stdout, result.stderr[-2000:]
    # -v reaches the jump's ssh too: the bastion's hop agreed on curve25519 (ssh 9.2
    # has no ML-KEM), under the cipher asked for.
    assert "kex: algorithm: curve25519-sha256\n" in result.stderr, result.stderr[-3000:]
    assert f"kex: server->client cipher: {cipher}" in result.stderr


async def _login(port: int, key: Path, cert: Path, sig_algs: list[str]) -> str:
    try:
        async with asyncssh.connect(
            "127.0.0.1",
            port,
            username="dt",
            known_hosts=None,
            agent_path=None,
            config=None,
            client_keys=[
                (asyncssh.read_private_key(str(key)), asyncssh.read_certificate(str(cert)))
            ],
            signature_algs=sig_algs,
            preferred_auth="publickey",
            connect_timeout=15,
        ):
            return "in"
    except asyncssh.PermissionDenied:
        return "denied"


@pytest.mark.integration
def test_an_ssh_rsa_user_signature_is_refused_and_audited(env):
    """A client may sign with ssh-rsa (SHA-1) although the bastion does not advertise
    it (asyncssh's client falls back to it): the signature itself is refused."""
    key, cert = _user(env, "rsa-user", "rsa")
    assert asyncio.run(_login(env.bastion.port, key, cert, ["ssh-rsa"])) == "denied"
    refused = [
        e for e in env.cluster.store.list_audit(type="auth.failed") if "'ssh-rsa'" in e.message
    ]
    assert refused and refused[-1].user == "alice", refused
    assert "is not accepted" in refused[-1].message
    # The same key and certificate under RSA-SHA2 is welcome.
    assert asyncio.run(_login(env.bastion.port, key, cert, ["rsa-sha2-512"])) == "in"
    assert asyncio.run(_login(env.bastion.port, key, cert, ["rsa-sha2-256"])) == "in"
    assert env.bastion.proc.poll() is None


def test_an_rsa_host_key_is_never_offered_as_ssh_rsa(tmp_path):
    """The host key is filtered through signature_algs too: an RSA host key would
    otherwise be offered as ssh-rsa (SHA-1) and ssh-rsa-cert-v01@openssh.com."""
    from bastion.proxy.server import _host_keys

    cluster = init_cluster(tmp_path / "state", "algs")
    try:
        rsa = tmp_path / "rsa_host"
        subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-N", "", "-f", str(rsa)], check=True)
        issued = cluster.ca.sign_host(load_public_key(rsa.with_suffix(".pub").read_bytes()), ("b",))
        cert = tmp_path / "rsa_host-cert.pub"
        cert.write_text(issued.openssh + "\n")
        offered = _host_keys(str(rsa), str(cert), BastionConfig())
        algs = [alg.decode() for keypair in offered for alg in keypair.host_key_algorithms]
        assert sorted(algs) == [
            "rsa-sha2-256",
            "rsa-sha2-256-cert-v01@openssh.com",
            "rsa-sha2-512",
            "rsa-sha2-512-cert-v01@openssh.com",
        ]
        only_ed25519 = BastionConfig(signature_algs=("ssh-ed25519",))
        with pytest.raises(UsageError, match="signature_algs does not allow"):
            _host_keys(str(rsa), str(cert), only_ed25519)
    finally:
        cluster.close()
