"""Storage faults of ../shared/SECURITY-CHECKLIST.md, caused for real, not simulated.

* #24 a read-only disk: the state directory's ext4 file system turns read-only under a
  running CA (what ``errors=remount-ro`` does on a disk error), and a state directory on
  a file system that is read-only from the start. A plain ``mount -o remount,ro`` is
  refused (EBUSY) while SQLite holds the database open for writing, so the running case
  uses ext4's own error path (``/sys/fs/ext4/<dev>/trigger_fs_error``) on a loop device.
* #21 ``kill -9`` inside the enrollment commit, after the token is spent and before the
  device is stored.
* #25 a device lock and an unenrollment committing while another process issues
  certificates for that device.
* #27 ``dt-bastion serve`` given a truncated database.

Loopback and tmp_path only; every mount and loop device is undone in teardown; waits
are polls with a bound, never a fixed sleep, and nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz.records import Device, DeviceCredential, User
from bastion.ca.certs import load_public_key, parse_cert
from bastion.cluster import Cluster, init_cluster
from bastion.protocol import wire
from bastion.protocol.errors import DTError, StorageUnavailable
from bastion.storage import DB_NAME
from tests.disks import need_root, tmpfs, umount
from tests.sshd import bastion_server, keygen

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# -- helpers -----------------------------------------------------------------------------------


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
    )


def assert_clear_refusal(result: subprocess.CompletedProcess, *words: str) -> None:
    """Refused with one plain ``error:`` line naming the cause, never a traceback."""
    assert result.returncode == 5, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    assert any(w in result.stderr for w in words), result.stderr


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def recorded_and_audited(db: Path) -> tuple[set[int], set[int]]:
    """User certificate serials in issued_certs, and in successful cert.create audit rows."""
    conn = sqlite3.connect(db)
    try:
        recorded = {
            r[0] for r in conn.execute("SELECT serial FROM issued_certs WHERE cert_type = 'user'")
        }
        audited = {
            int(r[0])
            for r in conn.execute(
                "SELECT json_extract(fields, '$.serial') FROM audit "
                "WHERE type = 'cert.create' AND success = 1 "
                "AND json_extract(fields, '$.cert_type') IS NOT 'host'"
            )
        }
    finally:
        conn.close()
    return recorded, audited


def new_key() -> ed25519.Ed25519PublicKey:
    return ed25519.Ed25519PrivateKey.generate().public_key()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(function: str, *args: str, **popen) -> subprocess.Popen:
    """Run ``function(*args)`` of this module in a fresh Python process."""
    code = (
        f"import sys\nfrom tests.test_storage_faults import {function}\n{function}(*sys.argv[1:])"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


class Lines:
    """A child's stdout lines, collected by a thread, waited on with a bound."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._new = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._new.put(line.rstrip("\n"))
        self._new.put(None)

    def wait_for(self, done: Callable[[list[str]], bool], bound: float) -> None:
        deadline = time.monotonic() + bound
        while not done(self.lines):
            try:
                line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"gave up waiting after {bound}s; child said {self.lines[-5:]}")
            if line is None:
                pytest.fail(f"child ended early; it said {self.lines[-5:]}")
            self.lines.append(line)

    def drain(self) -> list[str]:
        """The lines received so far, without waiting: each was written before this call."""
        while True:
            try:
                line = self._new.get_nowait()
            except queue.Empty:
                return list(self.lines)
            if line is None:
                self._new.put(None)
                return list(self.lines)
            self.lines.append(line)

    def rest(self, bound: float) -> list[str]:
        """Every line until EOF (the child has exited or is about to)."""
        deadline = time.monotonic() + bound
        while True:
            try:
                line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"child still talking after {bound}s")
            if line is None:
                return self.lines
            self.lines.append(line)


def remount(mount: Path, mode: str) -> None:
    result = subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], capture_output=True)
    assert result.returncode == 0, result.stderr


@dataclass
class Volume:
    """An ext4 file system on a loop device, mounted ``errors=remount-ro``."""

    image: Path
    device: str  # /dev/loopN
    mount: Path

    @property
    def _trigger(self) -> Path:
        return Path("/sys/fs/ext4") / Path(self.device).name / "trigger_fs_error"

    def _mount(self) -> None:
        cmd = ["mount", "-t", "ext4", "-o", "errors=remount-ro", self.device, str(self.mount)]
        subprocess.run(cmd, check=True, capture_output=True)

    def fail(self) -> None:
        """What a disk error does to this file system: read-only at once, under open files."""
        self._trigger.write_text("dt-bastion storage fault test\n")
        with pytest.raises(OSError) as info:
            (self.mount / "probe").write_bytes(b"x")
        assert info.value.errno == errno.EROFS

    def repair(self) -> None:
        """Unmount, fsck (replays the journal, as a reboot would), mount read-write."""
        subprocess.run(["umount", str(self.mount)], check=True, capture_output=True)
        fsck = subprocess.run(["e2fsck", "-fy", self.device], capture_output=True, text=True)
        assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
        self._mount()


@contextlib.contextmanager
def ext4_volume(tmp_path: Path) -> Iterator[Volume]:
    need_root()
    for tool in ("mkfs.ext4", "losetup", "e2fsck"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    image = tmp_path / "volume.img"
    with open(image, "wb") as fh:
        fh.truncate(32 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    attach = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True
    )
    if attach.returncode:
        pytest.skip(f"no loop device: {attach.stderr.strip()}")
    mount = tmp_path / "srv" / "state"  # the volume is the state directory itself
    mount.mkdir(parents=True)
    volume = Volume(image, attach.stdout.strip(), mount)
    try:
        try:
            volume._mount()
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot mount ext4 here: {exc.stderr!r}")
        if not volume._trigger.exists():
            pytest.skip("this kernel has no ext4 trigger_fs_error")
        os.chmod(mount, 0o700)
        yield volume
    finally:
        umount(mount)
        subprocess.run(["losetup", "-d", volume.device], capture_output=True)


# -- #24: the disk turns read-only under a running CA ---------------------------------------------


def test_disk_turning_read_only_under_a_running_ca_fails_closed(tmp_path):
    with ext4_volume(tmp_path) as vol:
        state = vol.mount
        cluster = init_cluster(state, "rodisk")
        cluster.store.add_user(User("alice", ("access",), ("root",)))
        key = new_key()
        handed = {cluster.ca.sign_user("alice", key).record.serial for _ in range(3)}
        vol.fail()
        for _ in range(3):
            with pytest.raises(StorageUnavailable, match="cluster database .*(write|read-only)"):
                cluster.ca.sign_user("alice", key)
        # what is already committed can still be read: live sessions go on (#30)
        assert cluster.store.find_user("alice") is not None
        # dtadmin, started while the disk is read-only, refuses in one line as well
        keygen(tmp_path / "id")
        out = tmp_path / "id-cert.pub"
        signed = cli(
            "dtadmin",
            "auth",
            "sign",
            "--state",
            str(state),
            "--user",
            "alice",
            "--pubkey",
            str(tmp_path / "id.pub"),
            "--out",
            str(out),
        )
        assert_clear_refusal(signed, "read-only", "readonly", "write failed")
        assert not out.exists()
        # and so does dt-bastion serve, which has no host key written yet
        port = free_port()
        served = cli("dt-bastion", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}")
        assert_clear_refusal(served, "Read-only file system", "read-only", "readonly")
        assert "ready" not in served.stdout and not listening(port)
        cluster.close()
        vol.repair()
        assert integrity(state / DB_NAME) == "ok"
        recorded, audited = recorded_and_audited(state / DB_NAME)
        assert handed <= recorded and recorded == audited
        Cluster.open(state).close()


def _issue_until_refused(state_dir: str, refusals: str) -> None:
    """Child: issue without pause, one line per outcome, until refused ``refusals`` times."""
    cluster = Cluster.open(state_dir)
    key = new_key()
    refused = 0
    while refused < int(refusals):
        try:
            serial = cluster.ca.sign_user("alice", key).record.serial
        except DTError as exc:
            refused += 1
            print(f"refused {exc.code} {exc.message}", flush=True)
        else:
            print(f"issued {serial}", flush=True)
    with contextlib.suppress(DTError, sqlite3.Error):
        cluster.close()


def test_disk_turning_read_only_mid_issue_hands_out_nothing_unrecorded(tmp_path):
    """The fault lands wherever the issuing process happens to be, inside a commit or not.

    Which certificates were handed out before the disk failed needs no clock: a line
    the parent has read before it fails the disk was written before, after its
    certificate's commit returned. Those must all be on disk. A commit the kernel
    acknowledges while ext4 is turning read-only (its ``fdatasync`` returns 0 in the
    few milliseconds between the journal abort and the read-only flag; seen on Linux
    6.18) can be lost: the CA cannot tell that from a durable commit.
    """
    with ext4_volume(tmp_path) as vol:
        cluster = init_cluster(vol.mount, "rodisk")
        cluster.store.add_user(User("alice", ("access",), ("root",)))
        cluster.close()
        proc = child("_issue_until_refused", str(vol.mount), "20")
        try:
            lines = Lines(proc.stdout)
            lines.wait_for(lambda ls: sum(x.startswith("issued") for x in ls) >= 30, bound=120)
            before = lines.drain()
            vol.fail()
            said = lines.rest(bound=120)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr = proc.stderr.read()
        assert proc.returncode == 0 and "Traceback" not in stderr, stderr
        first_refusal = next(i for i, x in enumerate(said) if x.startswith("refused"))
        # once refused, refused ever after: the CA failed closed and stayed closed
        assert all(x.startswith("refused storage_unavailable ") for x in said[first_refusal:]), (
            said[first_refusal:]
        )
        assert "write failed" in said[first_refusal] or "read-only" in said[first_refusal]
        handed_before = {int(x.split()[1]) for x in before if x.startswith("issued")}
        handed = {int(x.split()[1]) for x in said if x.startswith("issued")}
        vol.repair()
        db = vol.mount / DB_NAME
        assert integrity(db) == "ok"
        recorded, audited = recorded_and_audited(db)
        assert recorded == audited  # each certificate and its audit row: both or neither
        assert handed_before <= recorded
        assert handed - recorded <= handed - handed_before


def test_disk_turning_read_only_under_dt_bastion_serve(tmp_path):
    """A renewal over dt-api against the real server: answered with a clear refusal."""
    import asyncssh

    from client.api import Credentials, HostTrust, open_session

    with ext4_volume(tmp_path) as vol:
        state = vol.mount
        cluster = init_cluster(state, "rodisk")
        cluster.store.add_user(User("alice", ("access",), ("root",)))
        keygen(tmp_path / "id")
        pub = (tmp_path / "id.pub").read_text()
        first = cluster.ca.sign_user("alice", load_public_key(pub.encode()))
        (tmp_path / "id-cert.pub").write_text(first.openssh + "\n")
        host_ca = (state / "ca" / "host_ca.pub").read_text().strip()
        cluster.close()
        handed = {first.record.serial}

        async def renew(port: int) -> tuple[wire.CertIssued, DTError]:
            session = await open_session(
                "127.0.0.1",
                port,
                Credentials(
                    "alice",
                    client_key=asyncssh.read_private_key(str(tmp_path / "id")),
                    certificate=asyncssh.read_certificate(str(tmp_path / "id-cert.pub")),
                ),
                HostTrust(trusted=(host_ca,)),
            )
            try:
                renewed = await session.call(wire.CertRequest(public_key=pub), wire.CertIssued)
                vol.fail()
                with pytest.raises(DTError) as refused:
                    await session.call(wire.CertRequest(public_key=pub), wire.CertIssued)
            finally:
                await session.close()
            return renewed, refused.value

        with bastion_server(state) as bastion:
            renewed, refused = asyncio.run(renew(bastion.port))
            assert bastion.proc.poll() is None  # still up: refusing, not crashed
        handed.add(parse_cert(renewed.certificate.encode()).serial)
        assert isinstance(refused, StorageUnavailable), (type(refused), refused.message)
        assert "cluster database" in refused.message
        vol.repair()
        assert integrity(state / DB_NAME) == "ok"
        recorded, audited = recorded_and_audited(state / DB_NAME)
        assert handed <= recorded and recorded == audited


# -- #24: a state directory on a file system that is read-only from the start ----------------------


def test_read_only_file_system_from_the_start_refuses_in_every_entry_point(tmp_path):
    with tmpfs(tmp_path / "ro") as mount:
        state = mount / "state"
        cluster = init_cluster(state, "rofs")
        cluster.store.add_user(User("alice", ("access",), ("root",)))
        handed = {cluster.ca.sign_user("alice", new_key()).record.serial for _ in range(2)}
        cluster.close()
        remount(mount, "ro")
        try:
            with pytest.raises(StorageUnavailable, match="read-only"):
                Cluster.open(state)
            keygen(tmp_path / "id")
            out = tmp_path / "id-cert.pub"
            signed = cli(
                "dtadmin",
                "auth",
                "sign",
                "--state",
                str(state),
                "--user",
                "alice",
                "--pubkey",
                str(tmp_path / "id.pub"),
                "--out",
                str(out),
            )
            assert_clear_refusal(signed, "read-only")
            assert not out.exists()
            port = free_port()
            served = cli(
                "dt-bastion", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}"
            )
            assert_clear_refusal(served, "read-only")
            assert "ready" not in served.stdout and not listening(port)
        finally:
            remount(mount, "rw")
        assert integrity(state / DB_NAME) == "ok"
        recorded, audited = recorded_and_audited(state / DB_NAME)
        assert recorded == audited == handed
        Cluster.open(state).close()


# -- #21: kill -9 inside the enrollment commit ------------------------------------------------------


class _DeferredFinish:
    """dt-api answered in-process, except that the finish is kept to be sent later."""

    def __init__(self, server) -> None:
        self.server = server
        self.finish = None

    async def call(self, msg, expect):
        msg = wire.decode(wire.encode(msg))
        if isinstance(msg, wire.EnrollBegin):
            return wire.decode(wire.encode(self.server.begin(msg)))
        self.finish = msg
        return wire.Enrolled(device={})


def _enroll_then_wait_inside_the_commit(
    state_dir: str, tcti: str, ak_dir: str, token: str, ready_fd: str
) -> None:
    """Child: a token enrollment whose commit stops right after the token is spent.

    Only this process is patched: ``Store.consume_token`` runs for real inside the
    ceremony's transaction, reports what that transaction now sees, then waits for the
    parent's SIGKILL. The TPM is closed before the finish, as a bastion holds no TPM.
    """
    from bastion.enroll.ceremony import EnrollmentCeremony, EnrollPolicy
    from bastion.storage import Store
    from client import ceremony as client_ceremony
    from client.tpm import TPM

    spend = Store.consume_token

    def spend_then_wait(self, token_hash, kind, *, now, consumer):
        spent = spend(self, token_hash, kind, now=now, consumer=consumer)
        seen = self._conn.execute(
            "SELECT consumed FROM tokens WHERE token_hash = ?", (token_hash,)
        ).fetchone()[0]
        report = f"spent={spent} in_transaction={self._conn.in_transaction} consumed={seen}\n"
        os.write(int(ready_fd), report.encode())
        while True:
            signal.pause()

    store = Store.open(state_dir)
    server = EnrollmentCeremony(store, "alice", policy=EnrollPolicy())
    session = _DeferredFinish(server)
    with TPM.open(tcti) as tpm:
        asyncio.run(
            client_ceremony.enroll(
                session, tpm, Path(ak_dir), token=token, current_device=False, tag_override="SN1"
            )
        )
    Store.consume_token = spend_then_wait
    server.finish(session.finish)
    os.write(int(ready_fd), b"finished without stopping\n")


def _read_line(fd: int, bound: float) -> str:
    deadline = time.monotonic() + bound
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return data.decode()
        chunk = os.read(fd, 256)
        if not chunk:
            return data.decode()
        data += chunk
    return data.decode().strip()


def test_kill_9_inside_the_enrollment_commit_burns_no_token(swtpm, tmp_path):
    from bastion.enroll.ceremony import EnrollmentCeremony, EnrollPolicy
    from bastion.enroll.tokens import issue_enroll_token
    from client import ceremony as client_ceremony
    from client.tpm import TPM

    state = tmp_path / "state"
    cluster = init_cluster(state, "enroll-crash")
    cluster.store.add_user(User("alice", ("access",), ("root",)))
    cluster.store.add_device(Device("", "SN1", "linux"))
    token = issue_enroll_token(cluster.store, "SN1")
    cluster.close()
    db = state / DB_NAME

    ready_r, ready_w = os.pipe()
    proc = child(
        "_enroll_then_wait_inside_the_commit",
        str(state),
        swtpm.tcti,
        str(tmp_path / "ak"),
        token,
        str(ready_w),
        pass_fds=(ready_w,),
    )
    os.close(ready_w)
    try:
        report = _read_line(ready_r, bound=120)
        if not report.startswith("spent="):
            proc.kill()
            pytest.fail(f"child did not reach the commit: {report!r} {proc.communicate()[1]}")
        # inside the child's transaction the token is spent and the device not yet stored
        assert report.startswith("spent=True in_transaction=True consumed=1"), report
        # from outside: nothing committed, and the child holds the write lock
        probe = sqlite3.connect(db, timeout=0, isolation_level=None)
        try:
            assert probe.execute("SELECT consumed FROM tokens").fetchone()[0] is None
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                probe.execute("BEGIN IMMEDIATE")
        finally:
            probe.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        os.close(ready_r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    assert integrity(db) == "ok"
    conn = sqlite3.connect(db)
    try:
        consumed, consumed_by = conn.execute(
            "SELECT consumed, consumed_by FROM tokens WHERE kind = 'enroll'"
        ).fetchone()
        status, credential = conn.execute(
            "SELECT enroll_status, credential FROM devices WHERE asset_tag = 'SN1'"
        ).fetchone()
        enrolled = conn.execute(
            "SELECT count(*) FROM audit WHERE type = 'device.enroll' AND success = 1"
        ).fetchone()[0]
    finally:
        conn.close()
    assert consumed is None and consumed_by is None  # not silently burnt
    assert status == "not_enrolled" and credential is None and enrolled == 0

    # the same token, the same TPM and AK: a fresh enrollment now succeeds
    cluster = Cluster.open(state)
    try:
        server = EnrollmentCeremony(cluster.store, "alice", policy=EnrollPolicy())
        session = _DeferredFinish(server)
        with TPM.open(swtpm.tcti) as tpm:
            asyncio.run(
                client_ceremony.enroll(
                    session,
                    tpm,
                    tmp_path / "ak",
                    token=token,
                    current_device=False,
                    tag_override="SN1",
                )
            )
        device = server.finish(session.finish)
        assert device.enrolled and device.owner == "alice"
        assert cluster.store.get_device("SN1").credential.id == device.credential.id
        (spent,) = cluster.store.list_tokens("enroll")
        assert spent.consumed is not None and spent.consumed_by == "alice"
    finally:
        cluster.close()


# -- #25: a device lock or an unenrollment racing issuance ------------------------------------------


def _issue_device_certs(state_dir: str, asset_tag: str, refusals: str) -> None:
    """Child: device certificates in a loop, the device record read once up front (as the
    bastion holds it after device authentication), one line per outcome."""
    cluster = Cluster.open(state_dir)
    device = cluster.store.get_device(asset_tag)
    key = new_key()
    refused = 0
    while refused < int(refusals):
        try:
            serial = cluster.ca.sign_user("alice", key, device=device).record.serial
        except DTError as exc:
            refused += 1
            print(f"refused {exc.code} {exc.message}", flush=True)
        else:
            print(f"issued {serial}", flush=True)
    cluster.close()


@pytest.mark.parametrize("revocation", ["lock", "unenroll"])
def test_device_lock_or_unenroll_racing_issuance(tmp_path, revocation):
    """Once the lock or unenrollment commits, no certificate for the device follows.

    The audit log's ids give the commit order (a certificate and its event commit
    together, as do the lock or unenrollment and theirs), so "after" needs no clock.
    The change is made by the real `dtadmin` in its own process.
    """
    state = tmp_path / "state"
    cluster = init_cluster(state, "race")
    cluster.store.add_user(User("alice", ("access",), ("root",)))
    credential = DeviceCredential(str(uuid.uuid4()), b"\x30\x00", "tpm_ekcert", "ab" * 32)
    device = cluster.store.add_device(
        Device("", "SN1", "linux", enroll_status="enrolled", owner="alice", credential=credential)
    )
    proc = child("_issue_device_certs", str(state), "SN1", "20")
    try:
        lines = Lines(proc.stdout)
        lines.wait_for(lambda ls: sum(x.startswith("issued") for x in ls) >= 20, bound=120)
        if revocation == "lock":
            args = ("dtadmin", "lock", "--device", "SN1", "--message", "race")
        else:
            args = ("dtadmin", "device", "unenroll", "SN1")
        # SQLite's write lock is not first come, first served: an issuer that never
        # pauses can keep an admin's change waiting past its 10 s busy timeout. That
        # refusal must be the clear "busy" one; then the admin simply runs it again.
        for _ in range(5):
            change = cli(*args, "--state", str(state))
            if change.returncode == 0 or "busy" not in change.stderr:
                break
        assert change.returncode == 0, change.stderr
        said = lines.rest(bound=120)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr

    event_type = "lock.create" if revocation == "lock" else "device.unenroll"
    (event,) = [e for e in cluster.store.list_audit(type=event_type) if e.device == "SN1"]
    certs = [e for e in cluster.store.list_audit(type="cert.create", limit=10**6) if e.device]
    granted = [e for e in certs if e.success]
    refused_after = [e for e in certs if not e.success and e.id > event.id]
    # the race ran on both sides of the change
    assert granted and refused_after
    assert [e for e in granted if e.id > event.id] == []
    refusals = [x for x in said if x.startswith("refused")]
    assert refusals and all(
        x.split()[1] in ("device_not_trusted", "access_denied") for x in refusals
    ), refusals
    # every certificate handed out is recorded for this device and was audited before it
    handed = {int(x.split()[1]) for x in said if x.startswith("issued")}
    recorded = {c.serial for c in cluster.store.list_certs(user="alice") if c.device_id}
    assert all(c.device_id == device.id for c in cluster.store.list_certs(user="alice"))
    assert handed == recorded == {int(e.fields["serial"]) for e in granted}
    cluster.close()


# -- #27: a truncated database given to dt-bastion serve ---------------------------------------------


@pytest.fixture(scope="module")
def populated_state(tmp_path_factory) -> Path:
    """A real cluster with users, devices and a few hundred certificates, cleanly closed."""
    state = tmp_path_factory.mktemp("populated") / "state"
    cluster = init_cluster(state, "trunc")
    for i in range(10):
        cluster.store.add_user(User(f"user{i}", ("access",), ("root",)))
        cluster.store.add_device(Device("", f"SN{i}", "linux"))
    key = new_key()
    for i in range(300):
        cluster.ca.sign_user(f"user{i % 10}", key)
    cluster.close()
    assert not (state / (DB_NAME + "-wal")).exists()  # checkpointed: all in cluster.db
    return state


def _serve(state: Path, bound: float = 60) -> tuple[subprocess.Popen, int, bool]:
    """Start `dt-bastion serve`; returns it once it has exited, or as soon as it listens."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "dt-bastion"), "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + bound
    while proc.poll() is None:
        if listening(port):
            return proc, port, True
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"dt-bastion neither listened nor exited within {bound}s")
        time.sleep(0.02)
    return proc, port, False


TRUNCATIONS: dict[str, Callable[[int, int], int]] = {
    "half": lambda size, page: size // 2,
    "half, on a page boundary": lambda size, page: size // 2 // page * page,
    "first page only": lambda size, page: page,
    "header only": lambda size, page: 100,
    "empty": lambda size, page: 0,
    "last page lost": lambda size, page: size - page,
    "last 100 bytes lost": lambda size, page: size - 100,
    "last byte lost": lambda size, page: size - 1,
}


@pytest.mark.parametrize("cut", TRUNCATIONS)
def test_serve_refuses_a_truncated_database(populated_state, tmp_path, cut):
    state = tmp_path / "state"
    shutil.copytree(populated_state, state)
    db = state / DB_NAME
    size = db.stat().st_size
    page = int.from_bytes(db.read_bytes()[16:18], "big")
    with open(db, "r+b") as fh:
        fh.truncate(TRUNCATIONS[cut](size, page))
    proc, port, listened = _serve(state)
    try:
        assert not listened, f"dt-bastion serves a database truncated to {cut}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = proc.communicate()
    assert proc.returncode == 5, (proc.returncode, out, err)
    assert "Traceback" not in err and "ready" not in out, err
    assert err.startswith("error: ") and str(db) in err, err
    assert any(w in err for w in ("truncated", "corrupt", "empty")), err
    assert not listening(port)


def test_serve_accepts_the_untruncated_copy(populated_state, tmp_path):
    """The control: the same copy, whole, is served (the refusals above are about the cut)."""
    state = tmp_path / "state"
    shutil.copytree(populated_state, state)
    proc, _, listened = _serve(state)
    try:
        assert listened, proc.communicate()
    finally:
        proc.terminate()
        proc.wait(30)


# -- a broken index, which the open-time quick_check does not look at -----------------------------


def _break_an_index(db: Path) -> str:
    """Rename one key inside the users table's index page, keeping the page well formed
    and the keys in order: the index now names a user no row has, and misses one."""
    conn = sqlite3.connect(db)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        name, root = conn.execute(
            "SELECT name, rootpage FROM sqlite_master WHERE type = 'index' AND tbl_name = 'users'"
        ).fetchone()
    finally:
        conn.close()
    data = bytearray(db.read_bytes())
    start = (root - 1) * page_size
    page = data[start : start + page_size]
    assert page[0] == 0x0A and page.count(b"user9") == 1  # one leaf page of index keys
    at = start + page.index(b"user9")
    data[at : at + 5] = b"user:"  # ':' sorts right after '9'
    db.write_bytes(bytes(data))
    return name


def test_serve_refuses_a_database_with_a_broken_index(populated_state, tmp_path):
    from bastion.protocol.errors import StateError
    from bastion.storage import Store

    state = tmp_path / "state"
    shutil.copytree(populated_state, state)
    db = state / DB_NAME
    index = _break_an_index(db)
    store = Store.open(state)  # the cheap open-time check passes it: it skips indexes
    try:
        with pytest.raises(StateError, match=f"integrity check: .*{index}") as info:
            store.integrity_check()
        assert "restore it from a backup" in info.value.message
    finally:
        store.close()
    proc, port, listened = _serve(state)
    try:
        assert not listened, "dt-bastion serves a database with a broken index"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = proc.communicate()
    assert proc.returncode == 5, (proc.returncode, out, err)
    assert "Traceback" not in err and "ready" not in out, err
    assert err.startswith("error: ") and str(db) in err and "integrity check" in err, err


def test_integrity_check_passes_a_whole_database(populated_state, tmp_path):
    from bastion.storage import Store

    state = tmp_path / "state"
    shutil.copytree(populated_state, state)
    store = Store.open(state)
    try:
        store.integrity_check()
    finally:
        store.close()
