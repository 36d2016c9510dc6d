"""The audit log you can prove: hash chain, signed checkpoints, `dtadmin audit verify`.

Every test drives the real `dtadmin` (and `dt-bastion serve`) as separate processes
over a real SQLite file, and tampers with it as an attacker would: with the `sqlite3`
command. Nothing in the test process holds the database open while they run.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from bastion.protocol.certs import fingerprint, public_line
from bastion.storage import audit_chain

BIN = Path(sys.executable).parent
SQLITE3 = shutil.which("sqlite3")
TAMPERED = 16  # AuditTampered.exit_code


def dtadmin(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "dtadmin"), "--state", str(state), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def sql(state: Path, statement: str) -> str:
    """What an attacker with write access to the database does."""
    if SQLITE3 is None:
        pytest.skip("needs the sqlite3 command (Debian sqlite3)")
    proc = subprocess.run(
        [SQLITE3, str(state / "cluster.db"), statement],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def verify(state: Path, *args: str) -> subprocess.CompletedProcess:
    return dtadmin(state, "audit", "verify", *args, check=False)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A cluster made by `dtadmin init`, with a few events: rows 1-7."""
    state = tmp_path_factory.mktemp("audit-template") / "state"
    dtadmin(state, "init", "--cluster", "audit")
    for name in ("alice", "bob", "carol"):
        dtadmin(state, "users", "add", name, "--roles", "access", "--logins", "root")
    return state


@pytest.fixture
def state(template, tmp_path):
    """A copy of the template for each test to attack (no process has it open)."""
    return Path(shutil.copytree(template, tmp_path / "state"))


def rows(state: Path) -> int:
    return int(sql(state, "SELECT count(*) FROM audit").strip())


def _rewrite_row_3_and_relink(db: sqlite3.Connection) -> None:
    """What an attacker with the database file does: change a row, then recompute
    every hash after it so the chain holds again (only a signed checkpoint can tell)."""
    db.execute("UPDATE audit SET message = 'nothing happened' WHERE id = 3")
    prev = audit_chain.GENESIS
    cur = db.execute("SELECT * FROM audit ORDER BY id")
    names = [d[0] for d in cur.description]
    for values in cur.fetchall():
        row = dict(zip(names, values, strict=True))
        prev = audit_chain.link(prev, row)
        db.execute("UPDATE audit SET hash = ? WHERE id = ?", (prev.hex(), row["id"]))


def test_an_untouched_log_verifies_and_says_what_it_cannot_see(state):
    proc = verify(state)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "audit log intact" in proc.stdout
    # row 1 was signed at init; the rows after it are the chain's alone, and it says so
    assert "cannot be detected from this database alone" in proc.stderr
    signed = verify(state, "--checkpoint", "--format", "json")
    report = json.loads(signed.stdout)
    assert report["ok"] and report["unsigned_rows"] == 0
    assert report["last_signed_row"] == report["last_row"] == rows(state)


def test_an_edited_row_is_named(state):
    n = rows(state)
    sql(state, "UPDATE audit SET message = 'nothing happened' WHERE id = 3")
    proc = verify(state)
    assert proc.returncode == TAMPERED
    assert "row 3 was changed" in proc.stderr, proc.stderr
    report = json.loads(verify(state, "--format", "json").stdout)
    assert [(p["row"], p["kind"]) for p in report["problems"]] == [(3, "changed")]
    assert report["rows"] == n


def test_a_deleted_row_is_named(state):
    sql(state, "DELETE FROM audit WHERE id = 4")
    proc = verify(state)
    assert proc.returncode == TAMPERED
    assert "row 4 removed" in proc.stderr, proc.stderr


def test_a_deleted_row_with_the_ids_after_it_renumbered_is_named(state):
    sql(state, "DELETE FROM audit WHERE id = 3; UPDATE audit SET id = id - 1 WHERE id > 3")
    proc = verify(state)
    assert proc.returncode == TAMPERED
    assert "row 3 removed, and the rows after it renumbered" in proc.stderr, proc.stdout


def test_two_swapped_rows_are_named(state):
    cols = "time, code, type, success, message, user, device, remote_addr, fields, hash"
    sql(
        state,
        f"BEGIN; CREATE TEMP TABLE t AS SELECT * FROM audit WHERE id IN (3, 4); "
        f"UPDATE audit SET ({cols}) = (SELECT {cols} FROM t WHERE t.id = 4) WHERE id = 3; "
        f"UPDATE audit SET ({cols}) = (SELECT {cols} FROM t WHERE t.id = 3) WHERE id = 4; "
        "COMMIT;",
    )
    proc = verify(state)
    assert proc.returncode == TAMPERED
    assert "row 3 holds the event written as row 4: rows were reordered" in proc.stdout
    assert "row 4 holds the event written as row 3" in proc.stdout


def test_a_checkpoint_forged_with_another_key_is_named(state):
    last, row_hash = sql(state, "SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").split("|")
    row_hash = row_hash.strip()
    other = ed25519.Ed25519PrivateKey.generate()
    sig = audit_chain.sign_checkpoint(other, int(last), row_hash, 1e9)
    sql(
        state,
        "INSERT INTO audit_checkpoints (row_id, row_hash, time, key, signature) VALUES "
        f"({last}, '{row_hash}', 1e9, '{fingerprint(other.public_key())}', '{sig}')",
    )
    proc = verify(state)
    assert proc.returncode == TAMPERED
    assert f"(row {last}) is signed by key {fingerprint(other.public_key())}" in proc.stderr
    assert "forged" in proc.stderr
    # the same, claiming to be the cluster's key
    sql(state, "DELETE FROM audit_checkpoints WHERE time = 1e9")
    ours = dtadmin(state, "audit", "verify", "--format", "json").stdout
    key = json.loads(ours)["key"]
    sql(
        state,
        "INSERT INTO audit_checkpoints (row_id, row_hash, time, key, signature) VALUES "
        f"({last}, '{row_hash}', 1e9, '{key}', '{sig}')",
    )
    proc = verify(state)
    assert proc.returncode == TAMPERED
    assert "has a bad signature: forged or altered" in proc.stderr


def test_an_emptied_log_and_another_audit_key_are_named(state, tmp_path):
    mine = verify(state, "--key", str(state / "ca" / "audit_key.pub"))
    assert mine.returncode == 0  # checked with a copy of the public key kept elsewhere
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    (tmp_path / "other.pub").write_text(public_line(other, "other") + "\n")
    theirs = verify(state, "--key", str(tmp_path / "other.pub"))
    assert theirs.returncode == TAMPERED and "not the cluster's audit key" in theirs.stderr
    sql(state, "DELETE FROM audit; DELETE FROM audit_checkpoints")
    emptied = verify(state)
    assert emptied.returncode == TAMPERED and "the audit log is empty" in emptied.stderr


def test_a_rewrite_with_hashes_recomputed_is_caught_by_the_checkpoint(state):
    """The attacker changes row 3 and recomputes every hash after it: every link
    holds, but the signed checkpoint over the last row no longer matches."""
    dtadmin(state, "audit", "verify", "--checkpoint")
    db = sqlite3.connect(state / "cluster.db")  # the attacker's own connection
    try:
        _rewrite_row_3_and_relink(db)
        db.commit()
    finally:
        db.close()
    proc = verify(state)
    assert proc.returncode == TAMPERED
    assert "a row from 2 to" in proc.stderr and "hashes after it recomputed" in proc.stderr


def test_a_truncated_tail_is_caught_only_against_a_checkpoint_kept_elsewhere(state, tmp_path):
    kept = tmp_path / "kept-checkpoint.json"
    assert verify(state, "--checkpoint", "--checkpoint-out", str(kept)).returncode == 0
    assert json.loads(kept.read_text())["row_id"] == rows(state)
    last = rows(state)
    # the attacker removes the last two rows and every checkpoint that named them
    sql(state, f"DELETE FROM audit WHERE id > {last - 2}")
    sql(state, f"DELETE FROM audit_checkpoints WHERE row_id > {last - 2}")
    alone = verify(state)
    assert alone.returncode == 0  # what the database alone cannot tell, it does not claim
    against = verify(state, "--against", str(kept))
    assert against.returncode == TAMPERED
    assert f"row {last}, signed by the checkpoint kept in {kept}, is missing" in against.stderr


def test_an_old_cluster_is_chained_renamed_and_signed_by_the_migration(tmp_path):
    """A database of schema 3 (before the chain), with events under their old names:
    the first `dtadmin` to open it chains every row, renames the old types, makes the
    audit key and signs a checkpoint; verify is clean; the old names still filter."""
    state = tmp_path / "state"
    dtadmin(state, "init", "--cluster", "old")
    db = sqlite3.connect(state / "cluster.db")
    try:
        db.execute("DROP TABLE audit_checkpoints")
        db.execute("ALTER TABLE audit DROP COLUMN hash")
        db.execute("DELETE FROM _migrations WHERE version = 4")  # only the chain undone
        # a cluster from before the audit key does not name one either
        db.execute("DELETE FROM settings WHERE key = 'audit_key_fingerprint'")
        for kind, message in (
            ("device.token.create", "Device Enroll Token Created"),
            ("host_cert.create", "host certificate serial 7"),
            ("device.trust_root", "EK trust root removed"),
            ("cluster.setting", "auto-enroll set to on"),
        ):
            db.execute(
                "INSERT INTO audit (time, code, type, success, message, fields) "
                "VALUES (1.5, 'DT0000I', ?, 1, ?, '{}')",
                (kind, message),
            )
        db.commit()
    finally:
        db.close()
    (state / "ca" / "audit_key").unlink()
    (state / "ca" / "audit_key.pub").unlink()
    proc = verify(state, "--format", "json")
    report = json.loads(proc.stdout)
    assert report["ok"] and report["rows"] == 5 and report["checkpoints"] == 1
    assert (state / "ca" / "audit_key").stat().st_mode & 0o777 == 0o600
    types = sql(state, "SELECT type FROM audit ORDER BY id").split()
    assert types == [
        "cluster.init",
        "token.create",
        "cert.create",
        "trustroot.delete",
        "cluster.update",
    ]
    old = json.loads(
        dtadmin(state, "audit", "ls", "--type", "host_cert.create", "--format", "json").stdout
    )
    assert [e["message"] for e in old] == ["host certificate serial 7"]


def test_the_audit_key_is_not_a_ca_key(state):
    ca = state / "ca"
    pubs = {p.name: p.read_text().split()[1] for p in ca.glob("*.pub")}
    assert "audit_key.pub" in pubs
    assert len(set(pubs.values())) == len(pubs)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_checkpoints_come_every_256_rows_in_the_writers_batches(
    tmp_path, backend, monkeypatch, request
):
    """The bastion's writer appends in batches of savepoints; a checkpoint is due every
    CHECKPOINT_ROWS rows (and after CHECKPOINT_SECONDS), not at every row of a batch,
    and a row rolled back with its savepoint leaves no hole in the chain."""
    from bastion import audit
    from bastion.cluster import init_cluster
    from bastion.storage.audit_log import CHECKPOINT_ROWS

    url = None
    if backend == "postgres":
        from tests.postgres import fresh_database

        url = fresh_database(request.getfixturevalue("pg_server"))
        monkeypatch.setenv("DT_DATABASE", url)  # for the dtadmin below
    cluster = init_cluster(tmp_path / "state", "batch", database=url)
    store = cluster.store
    try:
        with store.transaction(bump=False):
            for i in range(2 * CHECKPOINT_ROWS + 10):
                try:
                    with store.savepoint():
                        audit.record(store, "auth.failed", success=False, message=f"try {i}")
                        if i == 5:
                            raise ValueError("this job fails alone")
                except ValueError:
                    pass
        rows = [cp.row_id for cp in store.list_audit_checkpoints()]
        assert rows == [1, 1 + CHECKPOINT_ROWS, 1 + 2 * CHECKPOINT_ROWS]
    finally:
        cluster.close()
    report = json.loads(verify(tmp_path / "state", "--format", "json").stdout)
    assert report["ok"] and report["rows"] == 2 * CHECKPOINT_ROWS + 10  # init + all but one


def test_a_quiet_logs_last_rows_are_signed_by_the_bastions_sweep(tmp_path):
    """Rows of a burst right after a checkpoint would stay unsigned until the next
    event; the sweep of a running bastion signs them once they have waited."""
    import time

    from bastion import audit
    from bastion.cluster import init_cluster
    from bastion.storage.audit_log import CHECKPOINT_SECONDS

    cluster = init_cluster(tmp_path / "state", "quiet")
    store = cluster.store
    try:
        audit.record(store, "user.create", message="burst")
        now = time.time()
        assert store.checkpoint_audit_if_stale(now) is None  # not waited long enough
        signed = store.checkpoint_audit_if_stale(now + CHECKPOINT_SECONDS + 1)
        assert signed is not None and signed.row_id == store.last_audit_id() == 2
        assert store.checkpoint_audit_if_stale(now + 2 * CHECKPOINT_SECONDS) is None  # done
    finally:
        cluster.close()


def test_a_rewrite_with_every_checkpoint_removed_is_not_signed_over(state):
    """The attacker rewrites row 3, recomputes the hashes and deletes every checkpoint:
    the next process to open the cluster (verify itself) must not sign the rewritten
    chain as if it were an old cluster's first checkpoint, and verify says so."""
    dtadmin(state, "audit", "verify", "--checkpoint")
    db = sqlite3.connect(state / "cluster.db")
    try:
        _rewrite_row_3_and_relink(db)
        db.execute("DELETE FROM audit_checkpoints")
        db.commit()
    finally:
        db.close()
    proc = verify(state)
    assert proc.returncode == TAMPERED, proc.stdout + proc.stderr
    assert "checkpoints were removed" in proc.stderr
    dtadmin(state, "users", "add", "dave", "--roles", "access", "--logins", "root")
    assert verify(state).returncode == TAMPERED  # nor does the next append sign over it
    assert sql(state, "SELECT count(*) FROM audit_checkpoints").strip() == "0"
