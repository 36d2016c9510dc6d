"""More lines of ../shared/SECURITY-CHECKLIST.md: edges of validity, EK chains, crashes."""

from __future__ import annotations

import datetime
import os
import signal
import sqlite3
import subprocess
import time
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import ssh as cssh
from cryptography.x509.oid import NameOID

from bastion.authz.records import IssuedCert, User
from bastion.ca.certs import fingerprint, parse_cert
from bastion.ca.keys import load_private_key
from bastion.cluster import init_cluster
from bastion.enroll import attest
from bastion.protocol.errors import AccessDenied, EKUntrusted
from bastion.proxy.policy import check_certificate

# -- certificate validity edges (pure policy over real certificates) --------------------------


@pytest.fixture
def cluster(tmp_path):
    c = init_cluster(tmp_path / "state", "edges")
    c.store.add_user(User("alice", ("access",), ("root",)))
    yield c
    c.close()


def make_cert(cluster, *, after, before, principals=("root", "-dt-jump"), serial=99):
    ca = load_private_key(cluster.state_dir / "ca" / "user_ca")
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    builder = (
        cssh.SSHCertificateBuilder()
        .public_key(key)
        .type(cssh.SSHCertificateType.USER)
        .serial(serial)
        .key_id(b"edge")
        .valid_after(after)
        .valid_before(before)
        .add_extension(b"dt-user@dt-bastion", b"alice")
        .add_extension(b"permit-port-forwarding", b"")
    )
    builder = (
        builder.valid_principals([p.encode() for p in principals])
        if principals
        else builder.valid_for_all_principals()
    )
    cluster.store.record_cert(
        IssuedCert(
            serial, "edge", "alice", "user", tuple(principals), after, before, fingerprint(key)
        )
    )
    return parse_cert(builder.sign(ca).public_bytes())


def check(cluster, cert, now):
    return check_certificate(cert, cluster.store, cluster.ca.user_ca_fingerprint, now)


def test_valid_before_exactly_now_is_expired(cluster):
    now = int(time.time())
    cert = make_cert(cluster, after=now - 60, before=now)
    with pytest.raises(AccessDenied, match="expired"):
        check(cluster, cert, now)
    assert check(cluster, cert, now - 1).user == "alice"


@pytest.mark.parametrize("skew", [-300, 300])
def test_clock_skew_of_five_minutes_is_not_forgiven(cluster, skew):
    now = int(time.time())
    cert = (
        make_cert(cluster, after=now + 300, before=now + 3600)
        if skew > 0
        else make_cert(cluster, after=now - 3600, before=now - 300)
    )
    with pytest.raises(AccessDenied, match="expired or is not yet valid"):
        check(cluster, cert, now)


def test_empty_principal_list_never_means_anyone(cluster):
    now = int(time.time())
    cert = make_cert(cluster, after=now - 60, before=now + 600, principals=())
    with pytest.raises(AccessDenied, match="not issued for this bastion"):
        check(cluster, cert, now)


def test_unknown_extension_is_ignored(cluster):
    now = int(time.time())
    ca = load_private_key(cluster.state_dir / "ca" / "user_ca")
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    cert = (
        cssh.SSHCertificateBuilder()
        .public_key(key)
        .type(cssh.SSHCertificateType.USER)
        .serial(7)
        .key_id(b"x")
        .valid_after(now - 60)
        .valid_before(now + 600)
        .valid_principals([b"root", b"-dt-jump"])
        .add_extension(b"dt-user@dt-bastion", b"alice")
        .add_extension(b"made-up@example.com", b"whatever")
        .sign(ca)
    )
    cluster.store.record_cert(
        IssuedCert(7, "x", "alice", "user", ("root",), 0, 2**40, fingerprint(key))
    )
    assert check(cluster, parse_cert(cert.public_bytes()), now).user == "alice"


def test_revoked_user_never_gets_a_new_certificate_while_racing(cluster):
    """Revocation racing issuance: once the lock commits, no later issue succeeds.

    The audit log's ids give the commit order (each certificate and its event commit
    together, as do the lock and its event), so "later" needs no clock and no slack:
    the CA re-checks the user under the write lock before it records a certificate.
    """
    import threading

    from bastion import audit
    from bastion.authz.records import Lock

    key = ed25519.Ed25519PrivateKey.generate().public_key()
    issued: list[int] = []
    refused: list[str] = []
    started, locked = threading.Event(), threading.Event()

    def issuer():
        from bastion.cluster import Cluster

        own = Cluster.open(cluster.state_dir)
        end = time.time() + 30  # a bound, not a timing: it stops after 3 refusals
        while time.time() < end and not (locked.is_set() and len(refused) >= 3):
            try:
                issued.append(own.ca.sign_user("alice", key).record.serial)
                started.set()
            except AccessDenied as exc:
                refused.append(exc.message)
            # SQLite's write lock is not queued: without a breath between commits a
            # nonstop issuer can starve the locking writer past its busy timeout.
            time.sleep(0.001)
        own.close()

    t = threading.Thread(target=issuer)
    t.start()
    assert started.wait(30)
    deadline = time.monotonic() + 30  # a bound on a loaded machine, not a timing
    while len(issued) < 20:  # issuance is well under way
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.01)
    with cluster.store.transaction():
        cluster.store.add_lock(Lock("", "user", "alice"))
        audit.record(cluster.store, "lock.create", message="alice locked", user="alice")
    locked.set()
    t.join()
    lock_event = cluster.store.list_audit(type="lock.create")[-1]
    created = cluster.store.list_audit(type="cert.create")
    assert issued and refused  # the race really ran on both sides of the lock
    late = [e for e in created if e.success and e.id > lock_event.id]
    assert late == []
    assert all(not e.success for e in created if e.id > lock_event.id)


# -- EK chains ---------------------------------------------------------------------------------------


def _ca(name, issuer=None, issuer_key=None, *, days=(-10, 3650)):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(issuer_key or key, hashes.SHA256())
    )
    return cert, key


@pytest.mark.integration
def test_ek_chain_with_an_expired_intermediate(swtpm, tmp_path):
    """Re-issue the TPM's EK certificate under root -> (expired) intermediate."""
    from client.tpm import TPM

    with TPM.open(swtpm.tcti) as tpm:
        ek = tpm.endorsement()
    ek_key = serialization.load_der_public_key(ek.public_der)
    root, root_key = _ca("Test EK Root")
    expired, expired_key = _ca("Expired Intermediate", root, root_key, days=(-400, -1))
    now = datetime.datetime.now(datetime.UTC)
    ek_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(expired.subject)
        .public_key(ek_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=500))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DirectoryName(
                        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tpm")])
                    )
                ]
            ),
            critical=True,
        )
        .sign(expired_key, hashes.SHA256())
    )
    der = ek_cert.public_bytes(serialization.Encoding.DER)
    with pytest.raises(EKUntrusted, match="expired or not yet valid CA"):
        attest.verify_ek(ek.public, der, [root, expired], require_trusted=True)
    valid, valid_key = _ca("Valid Intermediate", root, root_key)
    good = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(valid.subject)
        .public_key(ek_key)
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(valid_key, hashes.SHA256())
    )
    assert (
        attest.verify_ek(
            ek.public,
            good.public_bytes(serialization.Encoding.DER),
            [root, valid],
            require_trusted=True,
        )
        == "tpm_ekcert_trusted"
    )


# -- crashes during enrollment, and re-enrollment ----------------------------------------------------


@pytest.mark.integration
def test_kill_9_during_enrollment_leaves_no_half_enrolled_device(swtpm, tmp_path):
    """The bastion dies between the challenge and the answer: nothing is half-written."""
    import asyncio

    from bastion.protocol import wire
    from client.api import Credentials, HostTrust, open_session
    from client.tpm import TPM
    from tests.sshd import bastion_server, keygen

    cluster = init_cluster(tmp_path / "state", "crash")
    store = cluster.store
    from tests.swtpm import trust_test_tpms

    trust_test_tpms(store, swtpm.provisioned)
    store.add_user(User("alice", ("access", "editor"), ("root",)))
    from bastion.authz.records import Device
    from bastion.enroll.tokens import issue_enroll_token

    store.add_device(Device("", "SN1", "linux"))
    token = issue_enroll_token(store, "SN1")
    keygen(tmp_path / "id")
    from bastion.ca.certs import load_public_key

    issued = cluster.ca.sign_user("alice", load_public_key((tmp_path / "id.pub").read_bytes()))
    (tmp_path / "id-cert.pub").write_text(issued.openssh + "\n")

    async def begin_then_crash(bastion):
        import asyncssh

        key = asyncssh.read_private_key(str(tmp_path / "id"))
        cert = asyncssh.read_certificate(str(tmp_path / "id-cert.pub"))
        host_ca = (cluster.state_dir / "ca" / "host_ca.pub").read_text().strip()
        session = await open_session(
            "127.0.0.1",
            bastion.port,
            Credentials("dt", client_key=key, certificate=cert),
            HostTrust(trusted=(host_ca,)),
        )
        with TPM.open(swtpm.tcti) as tpm:
            ek = tpm.endorsement()
            ak = tpm.load_or_create_ak(tmp_path / "ak")
        await session.call(
            wire.EnrollBegin(
                token=token,
                device_data={"asset_tag": "SN1"},
                ek_public=ek.public,
                ek_public_der=ek.public_der,
                ek_cert_der=ek.cert_der,
                ak_public=ak,
            ),
            wire.EnrollChallenge,
        )
        bastion.proc.send_signal(signal.SIGKILL)
        bastion.proc.wait()

    with bastion_server(cluster.state_dir) as bastion:
        asyncio.run(begin_then_crash(bastion))
    conn = sqlite3.connect(cluster.state_dir / "cluster.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    status, credential = conn.execute(
        "SELECT enroll_status, credential FROM devices WHERE asset_tag = 'SN1'"
    ).fetchone()
    consumed = conn.execute("SELECT consumed FROM tokens WHERE kind = 'enroll'").fetchone()[0]
    conn.close()
    assert status == "not_enrolled" and credential is None
    assert consumed is None  # the token was not burnt: the user can simply try again


@pytest.mark.integration
def test_re_enrolling_after_unenrollment(swtpm, tmp_path):
    from bastion.enroll.ceremony import EnrollPolicy
    from tests.test_enrollment import enroll

    cluster = init_cluster(tmp_path / "state", "again")
    store = cluster.store
    store.add_user(User("alice", ("access", "editor"), ("root",)))
    first, _ = enroll(store, swtpm.tcti, tmp_path / "ak", current=True, policy=EnrollPolicy())
    store.update_device(
        replace(store.get_device("SN1"), enroll_status="not_enrolled", credential=None)
    )
    second, _ = enroll(store, swtpm.tcti, tmp_path / "ak", current=True, policy=EnrollPolicy())
    assert second["enroll_status"] == "enrolled"
    assert second["credential_id"] != first["credential_id"]  # a fresh credential
    cluster.close()


# -- a node that is down or blackholed ------------------------------------------------------------------


@pytest.mark.integration
def test_unreachable_node_fails_cleanly_without_leaking(tmp_path):
    from bastion.authz.records import Node
    from bastion.ca.certs import load_public_key
    from tests.sshd import LOGIN, bastion_server, keygen, ssh, write_ssh_config

    cluster = init_cluster(tmp_path / "state", "down")
    cluster.store.add_user(User("alice", ("access",), (LOGIN,)))
    # a closed port on loopback (down), and a TEST-NET-1 address nothing answers (blackholed)
    cluster.store.add_node(Node("down", "127.0.0.1", 9))
    cluster.store.add_node(Node("blackhole", "192.0.2.1", 22))
    key = keygen(tmp_path / "id")
    issued = cluster.ca.sign_user("alice", load_public_key((tmp_path / "id.pub").read_bytes()))
    (tmp_path / "id-cert.pub").write_text(issued.openssh + "\n")
    (tmp_path / "b.toml").write_text("[bastion]\nnode_connect_timeout = 1.5\n")
    with bastion_server(cluster.state_dir, extra_args=("--config", str(tmp_path / "b.toml"))) as b:
        config = write_ssh_config(
            tmp_path / "ssh_config",
            bastion_port=b.port,
            key=key,
            cert=tmp_path / "id-cert.pub",
            cluster=cluster,
        )
        fds_before = len(os.listdir(f"/proc/{b.proc.pid}/fd"))
        for node in ("down", "blackhole", "down", "blackhole"):
            result = ssh(config, f"{LOGIN}@{node}", "true", timeout=30)
            assert result.returncode == 255 and "is unreachable" in result.stderr, result.stderr

        def fds() -> int:
            return len(os.listdir(f"/proc/{b.proc.pid}/fd"))

        deadline = time.monotonic() + 20  # the bastion closes them after the client exits
        while fds() > fds_before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fds() <= fds_before + 2
    reasons = [e.message for e in cluster.store.list_audit(type="session.denied")]
    assert len([r for r in reasons if "is unreachable" in r]) == 4, reasons
    cluster.close()


@pytest.mark.integration
def test_database_unavailable_live_sessions_go_on_new_certificates_fail_closed(tmp_path):
    """Another process holds the write lock: reads (live-session checks) still work,
    issuing a certificate fails with a clear error instead of handing out an
    unrecorded one."""
    import asyncio

    import asyncssh

    from bastion.authz.records import Node
    from bastion.ca.certs import load_public_key
    from bastion.protocol import wire
    from bastion.protocol.errors import StorageUnavailable
    from client.api import Credentials, HostTrust, open_session
    from tests.sshd import LOGIN, bastion_server, keygen, sshd_node, write_ssh_config

    cluster = init_cluster(tmp_path / "state", "dbdown")
    cluster.store.add_user(User("alice", ("access",), (LOGIN,)))
    key = keygen(tmp_path / "id")
    issued = cluster.ca.sign_user("alice", load_public_key((tmp_path / "id.pub").read_bytes()))
    (tmp_path / "id-cert.pub").write_text(issued.openssh + "\n")
    with sshd_node(tmp_path / "node", cluster) as node, bastion_server(cluster.state_dir) as b:
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port))
        config = write_ssh_config(
            tmp_path / "ssh_config",
            bastion_port=b.port,
            key=key,
            cert=tmp_path / "id-cert.pub",
            cluster=cluster,
        )
        live = subprocess.Popen(
            ["ssh", "-F", str(config), f"{LOGIN}@node-1", "sleep 4; echo alive"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        # Its start must be on record before the lock is taken: a start that cannot be
        # recorded is refused, and that is not the case under test here.
        deadline = time.monotonic() + 30
        while not cluster.store.list_audit(type="session.start"):
            assert live.poll() is None, "the live session ended before it started"
            assert time.monotonic() < deadline, "the live session did not start"
            time.sleep(0.05)
        blocker = sqlite3.connect(cluster.state_dir / "cluster.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:

            async def ask_for_a_certificate():
                session = await open_session(
                    "127.0.0.1",
                    b.port,
                    Credentials(
                        "dt",
                        client_key=asyncssh.read_private_key(str(key)),
                        certificate=asyncssh.read_certificate(str(tmp_path / "id-cert.pub")),
                    ),
                    HostTrust(
                        trusted=((cluster.state_dir / "ca" / "host_ca.pub").read_text().strip(),)
                    ),
                )
                new = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
                try:
                    await session.call(
                        wire.CertRequest(public_key=new.strip()), wire.CertIssued, timeout=40
                    )
                finally:
                    await session.close()

            with pytest.raises(StorageUnavailable, match="busy or unwritable|write failed"):
                asyncio.run(ask_for_a_certificate())
            out, _ = live.communicate(timeout=30)
            assert live.returncode == 0 and out.strip() == "alive"  # the live session went on
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
            if live.poll() is None:
                live.kill()
    assert len(cluster.store.list_certs(user="alice")) == 1  # nothing issued unrecorded
    cluster.close()
