"""The device_posture noun and what facts() reads of posture, on SQLite and PostgreSQL.

Every test runs on both stores (tests/postgres.py's ``any_store``): the noun module
speaks one SQL to both, and a column or a conflict clause only one engine takes would
fail there first.
"""

from __future__ import annotations

import json
import threading

import psycopg
import pytest

from bastion.authz import posture
from bastion.authz.records import (
    BootChain,
    Device,
    DevicePosture,
    Measurement,
    PosturePolicy,
    Role,
    User,
)
from bastion.protocol.errors import NotFound, StateError
from bastion.storage import codec
from bastion.storage.postgres import PostgresStore

DIGEST = {i: f"{i:02x}" * 32 for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14)}
BOOTED = Measurement(
    pcrs=DIGEST,
    log="replayed",
    secure_boot=True,
    boot_chain=("a" * 64, "b" * 64, "c" * 64),
    cmdlines=("BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro",),
    kernel_files=("d" * 64,),
    time=1700000000.5,
)
CHANGED = Measurement(
    pcrs={**DIGEST, 4: "ff" * 32},
    log="mismatch",
    log_note="the boot event log does not replay to the quoted PCR 4",
    secure_boot=None,
    time=1700000100.0,
)
POLICY = PosturePolicy(
    secure_boot=True,
    boot_chains=(BootChain("ubuntu", shim="a" * 64, kernel="c" * 64),),
    kernel_cmdline=r"\S+ root=\S+ ro( .*)?",
    pcrs={7: "07" * 32},
    baseline=True,
    baseline_pcrs=(0, 4, 7),
    on_failure="deny",
    attest_interval=30,
    attest_grace=60,
)


def _device(store, tag: str = "LAPTOP-1") -> Device:
    return store.add_device(Device("", tag, "linux", owner="alice"))


def _record(device_id: str, **changes) -> DevicePosture:
    fields = {
        "baseline": BOOTED,
        "baseline_time": 1700000000.0,
        "baseline_by": "enrollment",
        "measured": CHANGED,
        "verdict": "withhold",
        "reasons": ("PCR 4 changed since enrollment: boot loader differs",),
        "attested_until": 1700000090.0,
        "attest_failure": "",
    }
    return DevicePosture(device_id, **{**fields, **changes})


# -- the record ---------------------------------------------------------------------------------


def test_a_posture_is_stored_and_read_back_whole(any_store):
    device = _device(any_store)
    assert any_store.find_device_posture(device.id) is None
    record = _record(device.id)
    any_store.put_device_posture(record)
    assert any_store.find_device_posture(device.id) == record
    # PCR numbers come back as ints, digests as the hex they went in as.
    read = any_store.find_device_posture(device.id)
    assert read is not None and read.baseline is not None
    assert set(read.baseline.pcrs) == set(DIGEST) and read.baseline.kernel_files == ("d" * 64,)


def test_put_replaces_the_whole_record(any_store):
    device = _device(any_store)
    any_store.put_device_posture(_record(device.id))
    again = DevicePosture(device.id, measured=BOOTED, verdict="pass")
    any_store.put_device_posture(again)
    assert any_store.find_device_posture(device.id) == again


def test_an_unknown_verdict_is_not_written(any_store):
    device = _device(any_store)
    with pytest.raises(ValueError, match="verdict"):
        any_store.put_device_posture(DevicePosture(device.id, verdict="fine"))
    assert any_store.find_device_posture(device.id) is None


def test_set_attestation_changes_only_its_two_fields(any_store):
    device = _device(any_store)
    record = _record(device.id)
    any_store.put_device_posture(record)
    any_store.set_attestation(device.id, 1700000200.0)
    assert any_store.find_device_posture(device.id) == DevicePosture(
        **{**_fields(record), "attested_until": 1700000200.0}
    )
    any_store.set_attestation(device.id, 0, "PCR 4 changed during the session")
    read = any_store.find_device_posture(device.id)
    assert read is not None
    assert (read.attested_until, read.attest_failure) == (0, "PCR 4 changed during the session")
    assert (read.baseline, read.measured, read.verdict) == (BOOTED, CHANGED, "withhold")


def test_set_attestation_makes_a_record_where_there_was_none(any_store):
    device = _device(any_store)
    any_store.set_attestation(device.id, 1700000200.0)
    assert any_store.find_device_posture(device.id) == DevicePosture(
        device.id, attested_until=1700000200.0
    )


def test_a_good_attestation_does_not_move_the_revision_a_failure_does(any_store):
    """Agents answer every few seconds: a good quote must not make every bastion
    re-check every session; a failure must, so the device's sessions are cut."""
    device = _device(any_store)
    before = any_store.revision()
    any_store.set_attestation(device.id, 1700000200.0)
    assert any_store.revision() == before
    any_store.set_attestation(device.id, 0, "the agent stopped answering")
    assert any_store.revision() > before
    # The whole record: the caller's transaction decides (a login measuring as
    # before must not make every bastion re-check every session).
    before = any_store.revision()
    with any_store.transaction(bump=False):
        any_store.put_device_posture(_record(device.id, verdict="pass"))
    assert any_store.revision() == before
    with any_store.transaction():
        any_store.put_device_posture(_record(device.id, verdict="deny"))
    assert any_store.revision() > before


def test_removing_a_device_removes_its_posture(any_store):
    device = _device(any_store)
    other = _device(any_store, "LAPTOP-2")
    any_store.put_device_posture(_record(device.id))
    any_store.put_device_posture(_record(other.id))
    any_store.remove_device("LAPTOP-1")
    assert any_store.find_device_posture(device.id) is None
    assert any_store.find_device_posture(other.id) is not None
    with pytest.raises(NotFound):
        any_store.remove_device("LAPTOP-1")
    assert any_store.find_device_posture(other.id) is not None


@pytest.mark.parametrize(
    "column, value",
    [
        ("measured", "{not json"),
        ("measured", json.dumps({"pcrs": {"x": "00"}})),
        ("baseline", json.dumps({"pcrs": {"4": 7}})),
        ("baseline", json.dumps([1, 2])),
        ("reasons", json.dumps("one reason")),
        ("verdict", "fine"),
    ],
)
def test_a_corrupt_record_is_a_state_error_and_denies_in_facts(any_store, column, value):
    device = _device(any_store)
    any_store.put_device_posture(_record(device.id, verdict="pass"))
    any_store._exec(
        f"UPDATE device_posture SET {column} = ? WHERE device_id = ?",  # noqa: S608 (a test's own names)
        (value, device.id),
    )
    with pytest.raises(StateError, match="corrupt"):
        any_store.find_device_posture(device.id)
    facts = any_store.facts(user=None, now=0, asset_tag="LAPTOP-1")
    assert facts.device == any_store.find_device("LAPTOP-1")
    assert facts.device_posture is not None and facts.device_posture.failed
    assert facts.device_posture.verdict == "deny"
    assert "cannot be read" in facts.device_posture.reasons[0]


# -- facts ----------------------------------------------------------------------------------------


def test_facts_carry_the_named_devices_posture(any_store):
    device = _device(any_store)
    _device(any_store, "LAPTOP-2")
    record = _record(device.id)
    any_store.put_device_posture(record)
    facts = any_store.facts(user=None, now=0, asset_tag="LAPTOP-1")
    assert facts.device == any_store.find_device("LAPTOP-1")
    assert facts.device_posture == record
    assert any_store.facts(user=None, now=0, asset_tag="LAPTOP-2").device_posture is None
    nobody = any_store.facts(user=None, now=0, asset_tag="NO-SUCH")
    assert nobody.device is None and nobody.device_posture is None
    assert any_store.facts(user=None, now=0).device_posture is None


def test_facts_carry_the_cluster_policy_as_stored(any_store):
    assert any_store.facts(user=None, now=0).cluster_posture is None
    any_store.set_setting("posture_policy", posture.policy_doc(POLICY))
    raw = any_store.facts(user=None, now=0).cluster_posture
    assert posture.policy_from_doc(raw) == POLICY
    assert [name for name, _ in posture.applicable(any_store.facts(user=None, now=0))] == [
        "cluster"
    ]
    any_store.set_setting("posture_policy", None)  # what `dtadmin posture clear` writes
    assert any_store.facts(user=None, now=0).cluster_posture is None


@pytest.mark.parametrize("stored", ["{not json", '"secure_boot"', "[1, 2]", '{"secure_bot": true}'])
def test_an_unreadable_cluster_policy_fails_closed_not_open(any_store, stored):
    """A policy the bastion cannot read must not read as "no policy": facts() passes
    it on raw and the core makes it one that denies every device."""
    any_store.set_setting("posture_policy", {})
    any_store._exec("UPDATE settings SET value = ? WHERE key = 'posture_policy'", (stored,))
    facts = any_store.facts(user=None, now=0)  # does not raise
    assert facts.cluster_posture is not None
    verdict = posture.evaluate(facts, BOOTED, BOOTED)
    assert verdict.status == "deny" and "cannot be read" in verdict.message


def test_a_roles_posture_is_stored_with_the_role_and_reaches_facts(any_store):
    any_store.put_role(Role("measured", logins=("root",), posture=POLICY))
    any_store.add_user(User("alice", ("measured",), ("root",)))
    assert any_store.get_role("measured").posture == POLICY
    (role,) = any_store.facts(user="alice", now=0).roles
    assert role is not None and role.posture == POLICY


def test_a_role_without_posture_is_stored_as_before(any_store):
    """No ``posture`` key at all, so the previous release still reads the role during
    a rolling upgrade."""
    any_store.put_role(Role("plain", logins=("root",)))
    (row,) = any_store._all("SELECT spec FROM roles WHERE name = 'plain'")
    assert "posture" not in json.loads(row["spec"])
    assert any_store.get_role("plain").posture is None


def test_a_role_with_an_unreadable_posture_is_a_corrupt_role(any_store):
    any_store.put_role(Role("measured", posture=POLICY))
    spec = codec.role_to_spec(Role("measured"))
    spec["posture"] = {"secure_boot": "maybe"}
    any_store._exec("UPDATE roles SET spec = ? WHERE name = 'measured'", (codec.dumps(spec),))
    with pytest.raises(StateError, match="corrupt.*secure_boot"):
        any_store.get_role("measured")
    any_store.add_user(User("alice", ("measured",)))
    assert any_store.facts(user="alice", now=0).roles == (None,)


# -- the codec ------------------------------------------------------------------------------------


def test_the_measurement_codec_round_trips_and_is_strict():
    for m in (BOOTED, CHANGED, Measurement({})):
        doc = json.loads(codec.dumps(codec.measurement_to_json(m)))
        assert codec.measurement_from_json(doc) == m
    assert codec.measurement_to_json(BOOTED)["pcrs"]["14"] == "0e" * 32
    good = codec.measurement_to_json(BOOTED)
    for bad in (
        {**good, "pcrs": {"24": "00"}},
        {**good, "pcrs": {"-1": "00"}},
        {**good, "pcrs": {"4": "AB"}},
        {**good, "secure_boot": "yes"},
        {**good, "boot_chain": "abc"},
        {**good, "time": True},
        {**good, "log": None},
        None,
    ):
        with pytest.raises(ValueError):
            codec.measurement_from_json(bad)


def test_the_role_spec_round_trips_a_policy():
    role = Role("measured", posture=POLICY)
    spec = json.loads(codec.dumps(codec.role_to_spec(role)))
    assert spec["posture"]["pcrs"] == {"7": "07" * 32}
    assert codec.role_from_spec(spec) == role


# -- round trips (PostgreSQL) --------------------------------------------------------------------


@pytest.fixture
def pg_store(pg_url, tmp_path):
    store = PostgresStore.open(pg_url, tmp_path)
    yield store
    store.close()


def test_facts_read_the_posture_with_no_round_trip_of_its_own(pg_store, monkeypatch):
    """The cluster policy rides in the settings read facts() already makes, the
    device's posture in its device read (tests/test_pg_round_trips.py pins the rest)."""
    device = _device(pg_store)
    pg_store.put_device_posture(_record(device.id))
    pg_store.set_setting("posture_policy", posture.policy_doc(POLICY))
    pg_store.add_user(User("alice", ("access",)))
    sent: list[str] = []
    me, execute = threading.get_ident(), psycopg.Cursor.execute

    def counting(self, query, params=None, **kwargs):
        if threading.get_ident() == me:
            sent.append(str(query))
        return execute(self, query, params, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", counting)
    facts = pg_store.facts(user="alice", now=0, asset_tag="LAPTOP-1")
    assert facts.device_posture is not None and facts.cluster_posture is not None
    assert len([s for s in sent if "device_posture" in s]) == 1
    assert not [s for s in sent if "FROM devices" in s and "device_posture" not in s], sent
    assert len([s for s in sent if "FROM settings" in s]) == 1, sent


def _fields(record: DevicePosture) -> dict:
    return {f: getattr(record, f) for f in record.__slots__}


# -- the migration ---------------------------------------------------------------------------------


def test_a_cluster_from_before_posture_gains_the_table_and_keeps_its_devices(store_factory):
    """SQLite's migration 7 / PostgreSQL's step 3, run on a database of the previous
    schema: only adds, so the devices (and everything else) are as they were."""
    store = store_factory(create=True)
    device = _device(store)
    version = store.schema_version()
    with store.transaction(bump=False):
        store._execute("DROP TABLE device_posture")
        store._execute("DELETE FROM _migrations WHERE version = ?", (version,))
    store.close()
    again = store_factory()
    assert again.schema_version() == version
    assert again.find_device("LAPTOP-1") == device
    assert again.find_device_posture(device.id) is None
    again.put_device_posture(_record(device.id))
    assert again.find_device_posture(device.id) == _record(device.id)
