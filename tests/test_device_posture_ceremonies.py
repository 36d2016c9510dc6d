"""Measured-boot posture at enrollment and device login, end to end in one process.

A real cluster in a temp dir (SQLite, the CA), the real dt-api session over in-memory
streams (every message through the strict wire codec), the real client ceremony and a
real swtpm whose PCRs were extended with a boot event log's digests, as firmware would
have: synthesized logs (tests/tpm_eventlog.py) and the shipped real ones. What the
user meets is asserted where they meet it: the refusal's class and message, the
certificate's extensions, cert_issued's warning and fields; and the audit rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.authz import decide, posture
from bastion.authz.posture import policy_doc, policy_from_doc
from bastion.authz.records import DevicePosture, Role, User
from bastion.ca.authority import UserCertRequest
from bastion.ca.keys import public_line
from bastion.cluster import init_cluster
from bastion.protocol import eventlog, wire
from bastion.protocol.certs import EXT_POSTURE, parse_cert
from bastion.protocol.errors import DeviceNotTrusted, PostureDenied, ProtocolError
from bastion.protocol.quote import POSTURE_PCRS
from bastion.proxy.api import ApiIdentity, ApiSession
from bastion.proxy.workers import Workers
from client import ceremony as client_ceremony
from client.eventlog_source import read_event_log
from client.profile import DeviceState
from client.tpm import TPM
from tests import tpm_eventlog as logs
from tests.postgres import fresh_database
from tests.swtpm import trust_test_tpms

pytestmark = pytest.mark.integration
TAG = "SN-POSTURE"


# -- one process: bastion, dt-api, client ---------------------------------------------------


class _Pipe:
    """One direction of the in-memory dt-api channel; keeps every line it carried."""

    def __init__(self, into: asyncio.StreamReader) -> None:
        self.into = into
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.lines.extend(data.splitlines())
        self.into.feed_data(data)

    def write_eof(self) -> None:
        self.into.feed_eof()


class Client:
    """The client end, as dtclient's ApiSession has it: call, receive (errors raised)."""

    def __init__(self, reader: Any, writer: _Pipe) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, msg: Any) -> None:
        await wire.write_message(self.writer, msg)

    async def receive(self, expect: Any) -> Any:
        answer = await wire.read_message(self.reader, 30)
        wire.raise_if_error(answer)
        assert isinstance(answer, expect), answer
        return answer

    async def call(self, msg: Any, expect: Any) -> Any:
        await self.send(msg)
        return await self.receive(expect)


class Env:
    def __init__(self, cluster: Any, tpm: Any, tmp: Path) -> None:
        self.cluster, self.store, self.tpm, self.tmp = cluster, cluster.store, tpm, tmp
        self.ak = tmp / "ak"
        self.device: DeviceState | None = None
        self.to_client: _Pipe | None = None  # what the bastion sent in the last run

    def policy(self, doc: dict[str, Any]) -> None:
        """The cluster's posture policy, as `dtadmin posture set` stores it."""
        self.store.set_setting("posture_policy", policy_doc(policy_from_doc(doc)))

    def boot(self, log: bytes, *, sent: bytes | None = None) -> None:
        """The device (re)boots as ``log`` says; dtclient will send ``sent`` (default
        the same log) from DT_EVENT_LOG."""
        logs.reboot(self.tpm.tcti)
        logs.replay_into_tpm(self.tpm.tcti, log)
        path = self.tmp / "boot.log"
        path.write_bytes(log if sent is None else sent)

    @contextlib.contextmanager
    def session(self) -> Iterator[Client]:
        """A dt-api session of alice's (authenticated by certificate)."""
        workers = Workers(self.store)
        loop = asyncio.new_event_loop()
        task = None
        try:
            server_in, client_in = asyncio.StreamReader(loop=loop), asyncio.StreamReader(loop=loop)
            self.to_client = _Pipe(client_in)
            api = ApiSession(self.cluster, ApiIdentity("alice", "certificate"), workers=workers)
            client = Client(wire.LineReader(client_in), _Pipe(server_in))
            task = loop.create_task(api.run(wire.LineReader(server_in), self.to_client))
            client.loop = loop  # type: ignore[attr-defined]
            loop.run_until_complete(
                client.call(wire.Hello(version=wire.PROTOCOL_VERSION, client="t"), wire.Welcome)
            )
            yield client
            client.writer.write_eof()
            loop.run_until_complete(asyncio.wait_for(task, 30))
        finally:
            if task is not None and not task.done():  # a refusal raised in the client
                task.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(task)
            loop.close()
            workers.close()

    def enroll(self) -> dict[str, Any]:
        with self.session() as client, TPM.open(self.tpm.tcti) as tpm:
            view = client.loop.run_until_complete(  # type: ignore[attr-defined]
                client_ceremony.enroll(
                    client, tpm, self.ak, token=None, current_device=True, tag_override=TAG
                )
            )
        self.device = DeviceState(TAG, view["credential_id"], "posture")
        return view

    def login(self, *, old_client: bool = False) -> tuple[wire.DeviceChallenge, wire.CertIssued]:
        """A certificate request with device authentication; ``old_client`` answers as
        dtclient before posture did: PCRs 0-7, never a log."""
        assert self.device is not None
        key = public_line(ed25519.Ed25519PrivateKey.generate().public_key())

        async def go(client: Client) -> tuple[Any, Any]:
            await client.send(wire.CertRequest(public_key=key, device=True))
            challenge = await client.receive(wire.DeviceChallenge)
            with TPM.open(self.tpm.tcti) as tpm:
                if old_client:
                    answer = client_ceremony.device_response(
                        tpm, self.ak, challenge.nonce, key, self.device, pcr_select=range(8)
                    )
                else:
                    answer = client_ceremony.answer_challenge(
                        tpm, self.ak, challenge, key, self.device
                    )
            return challenge, await client.call(answer, wire.CertIssued)

        with self.session() as client:
            return client.loop.run_until_complete(go(client))  # type: ignore[attr-defined]

    def posture(self) -> Any:
        return self.store.find_device_posture(self.store.get_device(TAG).id)

    def audit(self, kind: str) -> list[Any]:
        return self.store.list_audit(type=kind)


@pytest.fixture(params=["sqlite", "postgres"])
def env(request, tmp_path, swtpm, monkeypatch) -> Iterator[Env]:
    """alice (access, editor) and her device's TPM, on SQLite and on PostgreSQL."""
    database = None
    if request.param == "postgres":
        database = fresh_database(request.getfixturevalue("pg_server"))
    cluster = init_cluster(tmp_path / "state", "posture", database=database)
    try:
        trust_test_tpms(cluster.store, swtpm.provisioned)
        cluster.store.add_user(User("alice", ("access", "editor"), ("root",)))
        monkeypatch.setenv("DT_EVENT_LOG", str(tmp_path / "boot.log"))
        e = Env(cluster, swtpm, tmp_path)
        e.boot(logs.SyntheticBoot().log())
        yield e
    finally:
        cluster.close()


def extensions(issued: wire.CertIssued) -> dict[str, str]:
    return parse_cert(issued.certificate.encode()).extensions


GOOD = logs.SyntheticBoot()


# -- no posture policy: nothing changes -------------------------------------------------------


def test_without_a_posture_policy_the_ceremonies_speak_as_before(env):
    view = env.enroll()
    assert "posture" not in view
    first = [json.loads(line) for line in env.to_client.lines]
    challenge = next(m for m in first if m["type"] == "enroll_challenge")
    assert set(challenge) == {"type", "credential_blob", "encrypted_secret", "nonce"}
    for old_client in (True, False):
        asked, issued = env.login(old_client=old_client)
        assert asked.pcr_select is None and asked.event_log is False
        sent = next(json.loads(x) for x in env.to_client.lines if b"device_challenge" in x)
        assert set(sent) == {"type", "nonce"}  # the line an older dtclient reads
        assert issued.device_warning is None and issued.posture is None
        assert issued.attest_interval is None
        ext = extensions(issued)
        assert "device-id@dt-bastion" in ext and ext[EXT_POSTURE] == "unchecked"
    record = env.posture()
    assert record.verdict == "unchecked" and record.baseline_by == "enrollment"
    assert record.measured == record.baseline  # logins with no policy write nothing more
    assert record.baseline.log == "absent" and sorted(record.measured.pcrs) == [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14
    ]  # fmt: skip
    assert env.audit("device.posture") == []  # no verdict, nothing to audit


# -- Secure Boot -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", logs.NO_SECURE_BOOT_LOGS)
def test_secure_boot_required_refuses_the_shipped_no_secure_boot_logs(env, name):
    env.boot(logs.shipped(name))
    env.policy({"secure_boot": True, "on_failure": "deny"})
    with pytest.raises(PostureDenied, match="Secure Boot is off") as refused:
        env.enroll()
    assert f'device "{TAG}" was not enrolled' in refused.value.message
    assert env.store.find_device(TAG) is None
    posture_rows = env.audit("device.posture")
    assert [(e.success, e.fields["verdict"], e.fields["log"]) for e in posture_rows] == [
        (False, "deny", "replayed")
    ]
    enroll_rows = env.audit("device.enroll")
    assert not enroll_rows[-1].success and enroll_rows[-1].fields["reason"] == "posture_denied"


def test_secure_boot_on_passes_and_the_certificate_says_so(env):
    env.policy({"secure_boot": True, "on_failure": "deny"})
    view = env.enroll()
    assert view["posture"] == "pass" and view["posture_reasons"] == []
    asked, issued = env.login()
    assert asked.event_log is True and asked.pcr_select == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14]
    assert issued.posture == "pass" and issued.device_warning is None
    cert = parse_cert(issued.certificate.encode())
    assert cert.posture == "pass" and cert.extensions[EXT_POSTURE] == "pass"
    record = env.posture()
    assert record.verdict == "pass" and record.measured.log == "replayed"
    assert record.measured.secure_boot is True
    # Every later connection is held to it: the claims carry the verdict...
    facts = env.store.facts(user="alice", asset_tag=TAG, now=record.measured.time)
    claims = decide.claims_of(cert)
    assert claims.posture == "pass"
    # ...and a certificate from before the policy (no verdict) no longer stands.
    with pytest.raises(DeviceNotTrusted, match="no posture verdict"):
        decide.check_device(replace(claims, posture=None), facts, record.measured.time)


def test_warn_keeps_the_device_and_says_why(env):
    env.boot(logs.SyntheticBoot(secure_boot=False).log())
    env.policy({"secure_boot": True, "on_failure": "warn"})
    assert env.enroll()["posture"] == "warn"
    _, issued = env.login()
    assert issued.posture == "warn" and "device-id@dt-bastion" in extensions(issued)
    assert extensions(issued)[EXT_POSTURE] == "warn"
    assert issued.device_warning == (
        f'device "{TAG}" posture warning: Secure Boot is off (cluster posture policy)'
    )
    rows = env.audit("device.posture")
    assert [e.success for e in rows] == [True, True] and rows[-1].fields["at"] == "login"


# -- the kernel command line and the boot chain --------------------------------------------------


def test_a_tampered_kernel_command_line_is_refused(env):
    env.policy({"kernel_cmdline": r"\S+ root=/dev/vda1 ro( quiet)?", "on_failure": "withhold"})
    env.enroll()
    _, issued = env.login()
    assert issued.posture == "pass"
    env.boot(replace(GOOD, cmdline=GOOD.cmdline + " init=/bin/sh").log())
    _, issued = env.login()
    assert issued.posture == "withhold"
    assert "device-id@dt-bastion" not in extensions(issued)
    assert EXT_POSTURE not in extensions(issued)
    assert "kernel command line not allowed" in issued.device_warning
    assert "init=/bin/sh" in issued.device_warning
    assert "this certificate carries no device extensions" in issued.device_warning
    record = env.posture()
    assert record.failed and record.verdict == "withhold"
    failed = [e for e in env.audit("device.authenticate") if not e.success]
    assert failed and failed[-1].fields["reason"] == "device_not_trusted"


def test_a_tampered_boot_loader_digest_is_refused(env):
    chain = {k: GOOD.digest(k) for k in ("shim", "bootloader", "kernel")}
    env.policy({"boot_chains": [{"name": "debian", **chain}], "on_failure": "deny"})
    env.enroll()
    assert env.login()[1].posture == "pass"
    # 1. Booted another grub: the log says so truthfully, and the chain is not allowed.
    env.boot(replace(GOOD, bootloader=b"grubx64.efi evil").log())
    with pytest.raises(PostureDenied, match="boot chain is not an allowed one: boot loader"):
        env.login()
    # 2. The same boot, the log edited to show the allowed grub's digest: it no longer
    #    replays to the quote, so it is no log at all, and the chain cannot be checked.
    evil = replace(GOOD, bootloader=b"grubx64.efi evil")
    grub = evil.index(logs.EV_EFI_BOOT_SERVICES_APPLICATION, 4, nth=1)
    lie = logs.encode_log(
        logs.with_event(evil.events(), grub, digest=bytes.fromhex(chain["bootloader"]))
    )
    env.boot(evil.log(), sent=lie)
    with pytest.raises(PostureDenied, match="does not replay to the quoted PCRs") as refused:
        env.login()
    assert "PCR 4 differs" in refused.value.message
    assert env.posture().measured.log == "mismatch"


def test_a_log_that_does_not_replay_to_the_quote_counts_as_no_log(env):
    env.policy({"secure_boot": True, "on_failure": "withhold"})
    env.enroll()
    # Booted with Secure Boot off; sends a (well-formed) log of a Secure Boot boot.
    env.boot(logs.SyntheticBoot(secure_boot=False).log(), sent=GOOD.log())
    _, issued = env.login()
    assert issued.posture == "withhold"
    assert "Secure Boot cannot be checked" in issued.device_warning
    assert "it is not the log of this boot, so it counts as no log" in issued.device_warning
    measured = env.posture().measured
    assert measured.log == "mismatch" and measured.secure_boot is None


def test_a_changed_boot_since_enrollment_drifts_from_the_baseline(env):
    env.policy({"baseline": True, "on_failure": "withhold"})
    env.enroll()
    env.boot(replace(GOOD, bootloader=b"grubx64.efi 2.13").log())
    _, issued = env.login()
    assert issued.posture == "withhold"
    assert "PCR 4 changed since enrollment: boot loader differs" in issued.device_warning
    record = env.posture()
    assert record.baseline_by == "enrollment" and record.baseline != record.measured


# -- the client's log and the CA's own look --------------------------------------------------------


def test_an_unreadable_log_is_said_to_the_user_and_to_the_bastion(env, monkeypatch, capsys):
    env.policy({"secure_boot": True, "on_failure": "withhold"})
    env.enroll()
    monkeypatch.setenv("DT_EVENT_LOG", str(env.tmp / "no-such.log"))
    _, issued = env.login()
    stderr = capsys.readouterr().err
    assert "DT_EVENT_LOG names" in stderr and "no-such.log, which does not exist" in stderr
    assert "the device could not read its boot event log: DT_EVENT_LOG names" in (
        issued.device_warning
    )
    assert env.posture().measured.log == "absent"


def test_without_read_permission_the_advice_names_the_tss_group(tmp_path, monkeypatch):
    """As a user the kernel's root-only file is denied to: a forked child that drops to
    nobody reads a 0400 file of root's, as a user meets securityfs's."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    log = tmp_path / "binary_bios_measurements"
    log.write_bytes(GOOD.log())
    log.chmod(0o400)
    tmp_path.chmod(0o755)
    monkeypatch.setenv("DT_EVENT_LOG", str(log))
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.setgid(65534)
            os.setuid(65534)
            found = read_event_log()
            os.write(write, json.dumps([found.log is None, found.reason, found.advice]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        no_log, reason, advice = json.loads(f.read())
    os.waitpid(child, 0)
    assert no_log and reason == f"permission denied reading {log} (readable by root only)"
    assert "usermod -aG tss" in advice and "tmpfiles.d" in advice and "udev" in advice
    assert read_event_log().log == GOOD.log()  # root reads it: the copy sent


def test_continuous_attestation_is_asked_at_login(env):
    role = Role(
        name="attested",
        posture=policy_from_doc({"secure_boot": True, "attest_interval": "30s"}),
    )
    env.store.put_role(role)
    env.store.update_user(
        replace(env.store.get_user("alice"), roles=("access", "editor", "attested"))
    )
    env.enroll()
    _, issued = env.login()
    assert issued.posture == "pass" and issued.attest_interval == 30
    record = env.posture()
    assert record.attested_until == pytest.approx(record.measured.time + 30 + 60 + posture.ATTEST_MARGIN, abs=0.5)


def test_the_ca_decides_the_stored_posture_again(env):
    env.policy({"secure_boot": True, "on_failure": "withhold"})
    env.enroll()
    device = env.store.get_device(TAG)
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    request = UserCertRequest("alice", key, device=device, posture="pass")
    assert (
        "device-id@dt-bastion"
        in parse_cert(env.cluster.ca.sign(request).openssh.encode()).extensions
    )
    # The device's posture failed after its authentication: no device extensions...
    record = env.posture()
    env.store.put_device_posture(
        replace(record, verdict="withhold", reasons=("Secure Boot is off",))
    )
    issued = env.cluster.ca.sign(request)
    assert "device-id@dt-bastion" not in parse_cert(issued.openssh.encode()).extensions
    assert "Secure Boot is off" in issued.device_warning
    # ...or, where the policy denies, no certificate at all.
    env.store.put_device_posture(replace(record, verdict="deny", reasons=("Secure Boot is off",)))
    with pytest.raises(PostureDenied, match="Secure Boot is off"):
        env.cluster.ca.sign(request)


def test_a_withheld_posture_at_enrollment_enrolls_and_says_what_it_costs(env, capsys):
    env.boot(logs.SyntheticBoot(secure_boot=False).log())
    env.policy({"secure_boot": True})  # on_failure: withhold (the default)
    view = env.enroll()
    assert view["enroll_status"] == "enrolled" and view["posture"] == "withhold"
    assert "its certificates carry no device extensions" in capsys.readouterr().err
    record = env.posture()
    assert record.verdict == "withhold" and record.baseline_by == "enrollment"
    _, issued = env.login()
    assert issued.posture == "withhold" and "device-id@dt-bastion" not in extensions(issued)
    # Booting with Secure Boot on again is all it takes: the next login passes.
    env.boot(GOOD.log())
    _, issued = env.login()
    assert issued.posture == "pass" and "device-id@dt-bastion" in extensions(issued)
    assert not env.posture().failed


def test_the_client_quotes_exactly_what_is_asked_and_nothing_that_proves_nothing():
    assert client_ceremony.pcr_selection(None) == POSTURE_PCRS  # an older bastion's challenge
    assert client_ceremony.pcr_selection([14, 0, 7]) == (0, 7, 14)
    for odd in ([], [0, 0], [16], [7, 23], [24], [-1]):
        with pytest.raises(ProtocolError):
            client_ceremony.pcr_selection(odd)


def test_a_device_enrolled_before_posture_takes_its_first_measured_login_as_baseline(env):
    env.enroll()  # no policy yet
    device_id = env.store.get_device(TAG).id
    env.store.put_device_posture(DevicePosture(device_id))  # as a device enrolled before it
    env.policy({"baseline": True, "on_failure": "withhold"})
    _, issued = env.login()
    assert issued.posture == "pass"
    record = env.posture()
    assert record.baseline_by == "first login" and record.baseline == record.measured
    env.boot(replace(GOOD, kernel=b"vmlinuz-6.1.0-99-amd64").log())
    _, issued = env.login()
    assert issued.posture == "withhold" and "PCR 4 changed" in issued.device_warning


# -- the test helper itself: its logs are real logs, its replay is the TPM's ---------------------


@pytest.mark.parametrize(
    "boot",
    [GOOD, logs.SyntheticBoot(secure_boot=False), replace(GOOD, cmdline="/vmlinuz x=1")],
    ids=["secure-boot", "no-secure-boot", "other-cmdline"],
)
def test_synthesized_logs_read_the_same_in_tpm2_eventlog(boot, tmp_path):

    if shutil.which("tpm2_eventlog") is None:
        pytest.skip("tpm2_eventlog (tpm2-tools) is not installed")
    path = tmp_path / "boot.log"
    path.write_bytes(boot.log())
    out = subprocess.run(
        ["tpm2_eventlog", str(path)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    theirs = {
        int(m.group(1)): bytes.fromhex(m.group(2))
        for m in re.finditer(r"^\s+(\d+)\s*: 0x([0-9a-fA-F]{64})$", out.split("pcrs:")[1], re.M)
    }
    assert theirs == logs.expected_pcrs(boot.log()) == eventlog.replay(boot.log())["sha256"]


@pytest.mark.parametrize("name", [*logs.NO_SECURE_BOOT_LOGS, "sb_cert_eventlog.bin"])
def test_a_shipped_log_replays_into_a_swtpm(swtpm, name):
    log = logs.shipped(name)
    got = logs.replay_into_tpm(swtpm.tcti, log)
    assert {i: got[i] for i in eventlog.replay(log)["sha256"]} == eventlog.replay(log)["sha256"]
    logs.reboot(swtpm.tcti)
    assert set(logs.read_pcrs(swtpm.tcti, [0, 4, 7]).values()) == {bytes(32)}
