"""Faults and bad input the bastion must survive (../shared/SECURITY-CHECKLIST.md).

Bounded in count and time, loopback only. Each case must end refused or cleanly, with
a clear message, an audit event, and nothing lost or half-written.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sqlite3
import struct
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest

from bastion.authz.records import IssuedCert, Node, User
from bastion.ca.certs import load_public_key
from bastion.cluster import Cluster, init_cluster
from bastion.protocol.errors import StorageUnavailable
from tests.disks import fill, tmpfs
from tests.sshd import LOGIN, bastion_server, keygen, ssh, sshd_node, write_ssh_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    cluster = init_cluster(tmp / "state", "faults")
    cluster.store.add_user(User("alice", ("access",), (LOGIN,)))
    config = tmp / "bastion.toml"
    config.write_text("[bastion]\nlogin_timeout = 2\nmax_auth_failures_per_source = 20\n")
    with (
        sshd_node(tmp / "node", cluster) as node,
        bastion_server(tmp / "state", extra_args=("--config", str(config))) as bastion,
    ):
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port))
        yield type("Env", (), {"tmp": tmp, "cluster": cluster, "bastion": bastion, "node": node})
    cluster.close()


# -- the OpenSSH certificate cases of openssh-portable's regress suite ---------------------------


def keygen_cert(
    env,
    name,
    *options,
    principals=f"{LOGIN},-dt-jump",
    user="alice",
    record=True,
    host=False,
    validity="-5m:+1h",
    serial=None,
    port_forwarding=True,
):
    """A certificate made by ssh-keygen with the cluster's own CA key (only one field wrong)."""
    d = env.tmp / name
    d.mkdir()
    key = keygen(d / "id")
    serial = serial or random.randrange(1, 2**62)
    args = [
        "ssh-keygen",
        "-q",
        "-s",
        str(env.cluster.state_dir / "ca" / "user_ca"),
        "-I",
        name,
        "-n",
        principals,
        "-z",
        str(serial),
        "-V",
        validity,
        "-O",
        "clear",
        "-O",
        f"extension:dt-user@dt-bastion={user}",
        *(("-O", "extension:permit-port-forwarding") if port_forwarding else ()),
        *options,
    ]
    if host:
        args.append("-h")
    subprocess.run([*args, str(d / "id.pub")], check=True, capture_output=True)
    if record:
        from bastion.protocol.certs import parse_cert

        issued_fp = parse_cert((d / "id-cert.pub").read_bytes()).key_fingerprint
        env.cluster.store.record_cert(
            IssuedCert(
                serial, name, user, "user", tuple(principals.split(",")), 0, 2**62, issued_fp
            )
        )
    return write_ssh_config(
        d / "ssh_config",
        bastion_port=env.bastion.port,
        key=key,
        cert=d / "id-cert.pub",
        cluster=env.cluster,
    )


def refused_with(env, config, reason):
    """Refused, and the reason on record: polled (bounded), because a key refused at
    the query stage is audited as its connection ends, just after the client exits
    (a connection that goes on to log in leaves no refusal behind)."""
    result = ssh(config, f"{LOGIN}@node-1", "true")
    assert result.returncode == 255, result.stdout
    deadline = time.monotonic() + 5
    while True:
        recent = " | ".join(e.message for e in env.cluster.store.list_audit(limit=6))
        if reason in recent or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert reason in recent, recent
    return result


def audit_mark(env) -> int:
    """The newest audit id now: rows the bastion writes for the next attempt come after it."""
    newest = env.cluster.store.list_audit(limit=1)
    return newest[-1].id if newest else 0


def audited_after(env, mark, event_type, reason, *, bound=10.0):
    """The bastion's failed ``event_type`` rows after ``mark`` whose message has ``reason``.

    Polled (bounded) because a row written as the connection closes may land just after
    the client exits; returns every row after ``mark`` on failure, for the message.
    """
    deadline = time.monotonic() + bound
    while True:
        rows = [e for e in env.cluster.store.list_audit(limit=50) if e.id > mark]
        hits = [e for e in rows if e.type == event_type and reason in e.message]
        if hits or time.monotonic() > deadline:
            assert hits, [(e.type, e.success, e.message) for e in rows]
            assert all(not e.success for e in hits), hits
            return hits
        time.sleep(0.05)


def test_the_reference_certificate_works(env):
    result = ssh(keygen_cert(env, "reference"), f"{LOGIN}@node-1", "true")
    assert result.returncode == 0, result.stderr


def test_not_yet_valid(env):
    refused_with(env, keygen_cert(env, "future", validity="+1h:+2h"), "expired or is not yet valid")


def test_expired_by_a_second(env):
    refused_with(
        env, keygen_cert(env, "expired", validity="-2h:-1s"), "expired or is not yet valid"
    )


def test_wrong_principal(env):
    refused_with(
        env, keygen_cert(env, "noprincipal", principals=LOGIN), "not issued for this bastion"
    )


def test_host_certificate_as_user_certificate(env):
    config = keygen_cert(env, "hostcert", host=True)
    # OpenSSH will not even offer a host certificate for user auth; the bastion's own
    # rule is checked directly as well, for clients that would.
    assert ssh(config, f"{LOGIN}@node-1", "true").returncode == 255
    from bastion.ca.certs import parse_cert
    from bastion.protocol.errors import AccessDenied
    from bastion.proxy.policy import check_certificate

    cert = parse_cert((env.tmp / "hostcert" / "id-cert.pub").read_bytes())
    with pytest.raises(AccessDenied, match="host certificate cannot log in"):
        check_certificate(cert, env.cluster.store, env.cluster.ca.user_ca_fingerprint, time.time())


def test_unknown_critical_option(env):
    config = keygen_cert(env, "critical", "-O", "critical:dt-evil@example.com=1")
    mark = audit_mark(env)
    result = ssh(config, f"{LOGIN}@node-1", "true")
    assert result.returncode == 255 and "Permission denied" in result.stderr
    (row,) = audited_after(env, mark, "auth.failed", "unknown critical option")
    assert "dt-evil@example.com" in row.message and row.user == "alice"


def test_source_address_that_does_not_match(env):
    config = keygen_cert(env, "srcaddr", "-O", "source-address=10.11.12.13/32")
    mark = audit_mark(env)
    result = ssh(config, f"{LOGIN}@node-1", "true")
    assert result.returncode == 255 and "Permission denied" in result.stderr
    (row,) = audited_after(env, mark, "auth.failed", "is not valid from 127.0.0.1")
    assert "10.11.12.13/32" in row.message
    assert row.user == "alice" and row.remote_addr == "127.0.0.1"


def test_force_command_cannot_open_dt_api(env):
    d = env.tmp / "forcecmd"
    keygen_cert(env, "forcecmd", "-O", "force-command=/bin/true")
    result = subprocess.run(
        ["ssh", "-F", str(d / "ssh_config"), "-s", "bastion", "dt-api"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    # asyncssh substitutes the forced command for the subsystem request, which the
    # bastion refuses like any command: dt-api never answers.
    assert result.returncode != 0 and "welcome" not in result.stdout
    assert "offers no shell" in result.stderr


def test_unrecorded_serial_is_refused(env):
    refused_with(
        env, keygen_cert(env, "unrecorded", record=False), "was not issued by this cluster"
    )


def test_revoked_serial_is_refused(env):
    config = keygen_cert(env, "revoked", serial=424242)
    env.cluster.store.revoke_cert(424242, time.time())
    refused_with(env, config, "has been revoked")


def test_no_port_forwarding_extension(env):
    config = keygen_cert(env, "nopf", port_forwarding=False)
    mark = audit_mark(env)
    result = ssh(config, f"{LOGIN}@node-1", "true")
    assert result.returncode == 255
    # the login succeeds; the jump (direct-tcpip) is what is refused, and audited
    assert "administratively prohibited" in result.stderr, result.stderr
    (row,) = audited_after(env, mark, "session.denied", "does not permit port forwarding")
    assert row.user == "alice" and row.remote_addr == "127.0.0.1"
    rows = [e for e in env.cluster.store.list_audit(limit=50) if e.id > mark]
    assert not [e for e in rows if e.type == "auth.failed"], rows


def test_valid_certificate_with_the_wrong_private_key(env):
    config = keygen_cert(env, "wrongkey")
    d = env.tmp / "wrongkey"
    keygen(d / "other")
    (d / "id").write_text((d / "other").read_text())
    mark = audit_mark(env)
    assert ssh(config, f"{LOGIN}@node-1", "true").returncode == 255
    # OpenSSH sees that the certificate does not match the private key and never sends
    # it: it offers the bare key, and that is all the bastion sees and audits.
    audited_after(env, mark, "auth.failed", "this is a plain public key, not a certificate")


def _wrong_signer(env, name):
    """A valid certificate paired with another key: asyncssh refuses to pair a
    certificate with a key it does not certify, so the mismatch is made after that
    check, and this key pair then signs with the other key."""
    keygen_cert(env, name)
    d = env.tmp / name
    keygen(d / "other")
    keypair = asyncssh.load_keypairs([(str(d / "id"), str(d / "id-cert.pub"))])[0]
    keypair._key = asyncssh.read_private_key(str(d / "other"))
    return keypair


async def _log_in_with(env, keypair, source="127.0.0.1"):
    """One public-key login to the bastion from ``source``, nothing else offered."""
    async with asyncssh.connect(
        "127.0.0.1",
        env.bastion.port,
        local_addr=(source, 0),
        username="alice",
        client_keys=[keypair],
        known_hosts=None,
        agent_path=None,
        config=None,
        password_auth=False,
        kbdint_auth=False,
        connect_timeout=10,
    ):
        pass


def test_certificate_signed_for_with_the_wrong_private_key(env):
    """A client that does send the valid certificate, with a signature by another key."""
    keypair = _wrong_signer(env, "wrongsig")
    mark = audit_mark(env)
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(_log_in_with(env, keypair))
    # The certificate itself passes the bastion's own checks; asyncssh then finds the
    # signature wrong, and the bastion records that refusal against the user.
    (row,) = audited_after(env, mark, "auth.failed", "certificate refused by the SSH layer")
    assert row.user == "alice" and row.remote_addr == "127.0.0.1"


def test_bad_signatures_count_towards_the_per_address_limit(env):
    """Certificates that pass every check but are signed with the wrong key are failed
    logins like any other: after max_auth_failures_per_source (20 here) from one
    address, that address is refused at connect, and 127.0.0.1 is not."""
    keypair = _wrong_signer(env, "wrongsig-flood")
    source = "127.0.0.9"

    async def flood():
        outcomes = []
        for _ in range(21):
            try:
                await _log_in_with(env, keypair, source)
            except asyncssh.PermissionDenied:
                outcomes.append("denied")
            except (asyncssh.DisconnectError, OSError) as exc:
                outcomes.append(str(exc))
        return outcomes

    mark = audit_mark(env)
    outcomes = asyncio.run(flood())
    assert outcomes[:20] == ["denied"] * 20
    assert outcomes[20] != "denied"  # cut at connect, before any key exchange
    refused = [
        row
        for row in audited_after(env, mark, "auth.failed", "too many failed logins", bound=20.0)
        if row.remote_addr == source
    ]
    assert refused
    result = ssh(keygen_cert(env, "after-wrongsig"), f"{LOGIN}@node-1", "echo", "ok")
    assert result.returncode == 0 and result.stdout.strip() == "ok"


# -- garbage on the wire ---------------------------------------------------------------------------


def test_random_bytes_and_half_open_connections_do_not_hurt_others(env):
    socks = []
    rng = random.Random(7)
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", env.bastion.port))
        if i % 2:
            s.sendall(rng.randbytes(rng.randrange(1, 4096)))
        socks.append(s)  # the even ones stay half-open, saying nothing
    result = ssh(keygen_cert(env, "during-garbage"), f"{LOGIN}@node-1", "echo", "ok")
    assert result.returncode == 0 and result.stdout.strip() == "ok"
    # The garbage ones are dropped at once, the silent ones at login_timeout (2 s); each
    # is read to its end (EOF or a reset), within one generous bound for them all.
    deadline = time.monotonic() + 30
    still_open = 0
    for s in socks:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass  # closed by the bastion with our garbage still unread: closed all the same
        except TimeoutError:
            still_open += 1
        s.close()
    assert still_open == 0
    assert env.bastion.proc.poll() is None


# -- crashes, shared state, full disk ------------------------------------------------------------------


def test_kill_9_during_certificate_issue_leaves_consistent_state(tmp_path):
    cluster = init_cluster(tmp_path / "state", "crash")
    cluster.store.add_user(User("alice", ("access",), (LOGIN,)))
    cluster.close()
    script = (
        "import sys\nfrom cryptography.hazmat.primitives.asymmetric import ed25519\n"
        "from bastion.cluster import Cluster\n"
        f"c = Cluster.open({str(tmp_path / 'state')!r})\n"
        "k = ed25519.Ed25519PrivateKey.generate().public_key()\n"
        "while True:\n    c.ca.sign_user('alice', k)\n"
    )
    proc = subprocess.Popen([os.sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    # kill it mid-stream: once it has issued a good number, while it is still issuing
    watcher = sqlite3.connect(tmp_path / "state" / "cluster.db", timeout=10)
    deadline = time.monotonic() + 60
    while watcher.execute("SELECT count(*) FROM issued_certs").fetchone()[0] < 50:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    watcher.close()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    conn = sqlite3.connect(tmp_path / "state" / "cluster.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    serials = {row[0] for row in conn.execute("SELECT serial FROM issued_certs")}
    audited = {
        row[0]
        for row in conn.execute(
            "SELECT json_extract(fields, '$.serial') FROM audit WHERE type = 'cert.create' AND success = 1"
        )
    }
    assert (
        serials and {str(s) for s in serials} == audited
    )  # every certificate recorded and audited
    conn.close()
    Cluster.open(tmp_path / "state").close()  # and the cluster still opens


def test_two_bastions_on_one_state_directory(env, tmp_path):
    config = keygen_cert(env, "two-bastions")
    with bastion_server(env.cluster.state_dir) as second:
        other = tmp_path / "ssh_config"
        other.write_text(
            config.read_text().replace(f"Port {env.bastion.port}", f"Port {second.port}")
        )
        for cfg in (config, other):
            assert ssh(cfg, f"{LOGIN}@node-1", "true").returncode == 0
        from bastion.authz.records import Lock

        lock = env.cluster.store.add_lock(Lock("", "user", "alice"))
        try:
            for cfg in (config, other):
                assert ssh(cfg, f"{LOGIN}@node-1", "true").returncode == 255
        finally:
            env.cluster.store.remove_lock(lock.id)


def test_full_disk_fails_closed(tmp_path):
    with tmpfs(tmp_path / "tiny", "400k") as mount:
        cluster = init_cluster(mount / "state", "full")
        cluster.store.add_user(User("alice", ("access",), (LOGIN,)))
        filler = fill(mount)
        key = load_public_key(keygen(tmp_path / "k").with_suffix(".pub").read_bytes())
        issued = 0
        with pytest.raises(StorageUnavailable, match="full|disk|write"):
            for _ in range(2000):
                cluster.ca.sign_user("alice", key)
                issued += 1
        recorded = len(cluster.store.list_certs())
        assert recorded == issued  # nothing handed out unrecorded
        cluster.close()
        filler.unlink()
        reopened = Cluster.open(mount / "state")
        assert reopened.store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        reopened.close()


# -- last: it leaves 127.0.0.1 rate-limited for a minute -----------------------------------


@pytest.mark.flood
def test_many_failed_authentications_are_rate_limited(env):
    class Guesser(asyncssh.SSHClient):
        def kbdint_auth_requested(self):
            return ""

        def kbdint_challenge_received(self, name, instructions, lang, prompts):
            return ["wrong password", "000000"][: len(prompts)]

    async def fail_once(source: str) -> None:
        try:
            conn, _ = await asyncssh.create_connection(
                Guesser,
                "127.0.0.1",
                env.bastion.port,
                local_addr=(source, 0),
                username="alice",
                known_hosts=None,
                agent_path=None,
                config=None,
                kbdint_auth=True,
                password_auth=False,
                public_key_auth=False,
                client_keys=None,
                connect_timeout=10,
            )
            conn.close()
        except (asyncssh.Error, OSError) as exc:
            failures.append(repr(exc))

    failures: list[str] = []

    async def flood() -> float:
        for _ in range(25):
            await fail_once("127.0.0.1")
        t0 = time.perf_counter()
        linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT left behind
        for _ in range(10_000):  # refused at connection time now: cheap for the bastion
            try:
                s = socket.create_connection(("127.0.0.1", env.bastion.port), timeout=5)
                s.recv(256)  # the banner and the disconnect, as any SSH client reads them
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                s.close()
            except OSError:
                pass
        return time.perf_counter() - t0

    asyncio.run(flood())
    # another address is still served normally
    config = keygen_cert(env, "other-source")
    text = config.read_text().replace(
        "HostName 127.0.0.1\n    Port", "HostName 127.0.0.1\n    BindAddress 127.0.0.2\n    Port", 1
    )
    config.write_text(text)
    result = ssh(config, f"{LOGIN}@node-1", "echo", "still-served")
    assert result.returncode == 0 and "still-served" in result.stdout, result.stderr
    events = env.cluster.store.list_audit(type="auth.failed", limit=20000)
    assert any("too many failed logins" in e.message for e in events), (
        failures[:3],
        [e.message for e in events[-8:]],
    )
    # 10,000 refused connections did not become 10,000 audit rows (a disk flood)
    assert len(events) < 500, len(events)
