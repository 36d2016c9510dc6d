"""Schema migrations, as a registry of numbered steps each run in one transaction.

A step is never edited once released; a change to the schema is a new step. The
applied steps are recorded in ``_migrations`` so a bastion can tell a database made
by a newer release (and refuse it) from one it can bring up to date.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[tuple[int, str, Migration]] = []


def migration(version: int, name: str) -> Callable[[Migration], Migration]:
    def register(fn: Migration) -> Migration:
        if MIGRATIONS and MIGRATIONS[-1][0] != version - 1:
            raise ValueError(f"migration {version} does not follow {MIGRATIONS[-1][0]}")
        MIGRATIONS.append((version, name, fn))
        return fn

    return register


@migration(1, "initial schema")
def _initial(db: sqlite_utils.Database) -> None:
    db.table("settings").create({"key": str, "value": str}, pk="key")
    db.table("users").create(
        {
            "name": str,
            "roles": str,
            "logins": str,
            "password_hash": str,
            "totp_secret": str,
            "totp_last_step": int,
            "created": float,
            "updated": float,
            "created_by": str,
        },
        pk="name",
        not_null={"roles", "logins"},
    )
    db.table("roles").create(
        {"name": str, "spec": str, "preset": int, "created": float, "updated": float},
        pk="name",
        not_null={"spec"},
    )
    db.table("devices").create(
        {
            "id": str,
            "asset_tag": str,
            "os_type": str,
            "enroll_status": str,
            "owner": str,
            "credential": str,
            "collected_data": str,
            "profile": str,
            "ek_pub_hash": str,
            "created": float,
            "updated": float,
        },
        pk="id",
        not_null={"asset_tag", "os_type", "enroll_status"},
    )
    db.table("devices").create_index(["asset_tag"], unique=True)
    db.table("tokens").create(
        {
            "token_hash": str,
            "kind": str,
            "subject": str,
            "expires": float,
            "created": float,
            "created_by": str,
            "consumed": float,
            "consumed_by": str,
        },
        pk="token_hash",
        not_null={"kind", "subject", "expires"},
    )
    db.table("nodes").create(
        {"name": str, "host": str, "port": int, "labels": str, "created": float},
        pk="name",
        not_null={"host", "port"},
    )
    db.table("nodes").create_index(["host", "port"], unique=True)
    db.table("locks").create(
        {
            "id": str,
            "target_kind": str,
            "target": str,
            "message": str,
            "expires": float,
            "created": float,
            "created_by": str,
        },
        pk="id",
        not_null={"target_kind", "target"},
    )
    db.table("locks").create_index(["target_kind", "target"])
    db.table("issued_certs").create(
        {
            "serial": int,
            "key_id": str,
            "user": str,
            "cert_type": str,
            "principals": str,
            "valid_after": int,
            "valid_before": int,
            "fingerprint": str,
            "device_id": str,
            "issued": float,
            "revoked": float,
        },
        pk="serial",
        not_null={"key_id", "cert_type", "valid_after", "valid_before"},
    )
    db.table("issued_certs").create_index(["user"])
    db.table("audit").create(
        {
            "id": int,
            "time": float,
            "code": str,
            "type": str,
            "success": int,
            "message": str,
            "user": str,
            "device": str,
            "remote_addr": str,
            "fields": str,
        },
        pk="id",
        not_null={"time", "code", "type", "success"},
    )
    db.table("audit").create_index(["time"])
    db.table("audit").create_index(["type"])
    db.table("trust_roots").create(
        {"fingerprint": str, "subject": str, "pem": str, "added": float},
        pk="fingerprint",
        not_null={"pem"},
    )
    db.table("login_failures").create({"user": str, "time": float, "remote_addr": str})
    db.table("login_failures").create_index(["user", "time"])


@migration(2, "live sessions")
def _live_sessions(db: sqlite_utils.Database) -> None:
    """Forwarded sessions open right now, one row per session, keyed by the bastion
    process (``instance``) that holds it. A process killed with ``kill -9`` cannot write
    its sessions' ``session.end``; the rows it leaves are how the next bastion to start
    (or a sibling on the same state directory) finds them and ends them in the audit log.
    """
    db.table("live_sessions").create(
        {
            "instance": str,
            "session_id": int,
            "user": str,
            "device": str,
            "node": str,
            "remote_addr": str,
            "serial": str,
            "started": float,
        },
        pk=("instance", "session_id"),
        not_null={"instance", "session_id", "started"},
    )


@migration(3, "login attempts reserved before they are checked")
def _pending_login_attempts(db: sqlite_utils.Database) -> None:
    """A password login takes its place in ``login_failures`` before argon2 runs
    (``pending`` = 1), so concurrent guesses count against the lockout while they are
    being checked, not only once each has failed. Rows from before are failures. The
    table gains a real ``id`` (a rowid alias, which VACUUM keeps) to name a reservation.
    """
    db.execute(
        "CREATE TABLE login_failures_v3 (id INTEGER PRIMARY KEY, user TEXT, time FLOAT, "
        "remote_addr TEXT, pending INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute(
        "INSERT INTO login_failures_v3 (user, time, remote_addr) "
        "SELECT user, time, remote_addr FROM login_failures"
    )
    db.table("login_failures").drop()
    db.execute("ALTER TABLE login_failures_v3 RENAME TO login_failures")
    db.table("login_failures").create_index(["user", "time"])


# Event types renamed when one style (``noun.verb``, one lowercase word each) was
# chosen; docs/audit.md lists the current ones. Rows written before are renamed by
# migration 4 before they are chained, and ``dtadmin audit ls --type`` accepts the
# old names.
RENAMED_EVENT_TYPES: dict[str, str] = {
    "device.token.create": "token.create",
    "user.token": "token.create",
    "host_cert.create": "cert.create",
    "cluster.setting": "cluster.update",
    "api.error": "api.failed",
    # device.trust_root was both add and remove; its message says which
}


@migration(4, "audit hash chain and signed checkpoints")
def _audit_chain(db: sqlite_utils.Database) -> None:
    """Every audit row gains ``hash``, its link in the chain (see
    ``bastion.storage.audit_chain``), and ``audit_checkpoints`` holds the signed
    checkpoints. Old event type names are renamed first, so the chain covers the
    names that are read; then the existing rows are chained in id order. The first
    checkpoint is signed once the audit key exists (``Cluster.open`` makes it).
    """
    from bastion.storage import audit_chain

    db.execute("ALTER TABLE audit ADD COLUMN hash TEXT")
    db.execute(
        "CREATE TABLE audit_checkpoints (id INTEGER PRIMARY KEY, row_id INTEGER NOT NULL, "
        "row_hash TEXT NOT NULL, time FLOAT NOT NULL, key TEXT NOT NULL, "
        "signature TEXT NOT NULL)"
    )
    for old, new in RENAMED_EVENT_TYPES.items():
        db.execute("UPDATE audit SET type = ? WHERE type = ?", (new, old))
    db.execute(
        "UPDATE audit SET type = CASE WHEN message LIKE '%removed%' THEN 'trustroot.delete' "
        "ELSE 'trustroot.create' END WHERE type = 'device.trust_root'"
    )
    prev = audit_chain.GENESIS
    cursor = db.execute("SELECT * FROM audit ORDER BY id")
    names = [d[0] for d in cursor.description]
    links = []
    for values in cursor.fetchall():
        row = dict(zip(names, values, strict=True))
        prev = audit_chain.link(prev, row)
        links.append((prev.hex(), row["id"]))
    db.conn.executemany("UPDATE audit SET hash = ? WHERE id = ?", links)


@migration(5, "bot users")
def _bot_users(db: sqlite_utils.Database) -> None:
    """Users gain ``bot``: automation with no password, code or device, whose
    certificates come from `dtadmin auth sign` or a bot token (tokens of kind "bot")."""
    db.execute("ALTER TABLE users ADD COLUMN bot INTEGER NOT NULL DEFAULT 0")


@migration(6, "failed authentications per address, cluster-wide")
def _source_failures(db: sqlite_utils.Database) -> None:
    """Each bastion's failed authentications per client address, so that
    ``max_auth_failures_per_source`` counts across bastions
    (``bastion.storage.source_failures``)."""
    db.execute(
        "CREATE TABLE source_failures (addr TEXT NOT NULL, failed_at FLOAT NOT NULL, "
        "instance TEXT NOT NULL, stamp FLOAT NOT NULL)"
    )
    db.execute("CREATE INDEX source_failures_time ON source_failures (failed_at)")
    db.execute("CREATE INDEX source_failures_stamp ON source_failures (instance, stamp)")


@migration(7, "device posture")
def _device_posture(db: sqlite_utils.Database) -> None:
    """Each device's measured-boot posture (``bastion.storage.posture``): the baseline
    it is compared with (recorded at enrollment or approved by an admin), what it
    measured last, the verdict and its reasons, and (continuous attestation) until
    when its live sessions stand. Keyed by device id, one row per device; the
    measurements are JSON."""
    db.execute(
        "CREATE TABLE device_posture (device_id TEXT PRIMARY KEY, baseline TEXT, "
        "baseline_time FLOAT, baseline_by TEXT, measured TEXT, "
        "verdict TEXT NOT NULL DEFAULT 'unchecked', reasons TEXT, "
        "attested_until REAL NOT NULL DEFAULT 0, attest_failure TEXT, updated FLOAT)"
    )
