"""PostgreSQL schema migrations: a registry of numbered steps, each one transaction.

The PostgreSQL schema has its own numbering, independent of SQLite's
(:mod:`bastion.storage.migrations`): step 1 makes, in one go, the schema SQLite has
after its steps up to 5 (every table, column and index, the audit chain's
``hash`` and ``audit_checkpoints``, ``users.bot``), plus the change feed
(``changes``). Types are PostgreSQL's: ``double precision`` for SQLite's REAL times,
``bigint`` for its 64-bit integers, ``bigserial`` where SQLite had a rowid alias.

A later SQLite step gets its PostgreSQL twin appended here (the next number), in the
same portable SQL the noun modules speak (tests/test_pg_store.py checks that every
SQLite table and column has one here). A step is never edited once released, and
during a rolling upgrade the bastions of the previous release still read the
database: a step only adds (tables, columns with defaults, indexes), never renames or
drops what that release reads.
Applied steps are recorded in ``_migrations``; a database made by a newer release is
refused.
"""

from __future__ import annotations

PG_MIGRATIONS: list[tuple[int, str, tuple[str, ...]]] = [
    (
        1,
        "initial schema (SQLite's migrations 1-5) and the change feed",
        (
            "CREATE TABLE settings (key text PRIMARY KEY, value text)",
            """CREATE TABLE users (
                name text PRIMARY KEY, roles text NOT NULL, logins text NOT NULL,
                password_hash text, totp_secret text, totp_last_step bigint,
                created double precision, updated double precision, created_by text,
                bot integer NOT NULL DEFAULT 0)""",
            """CREATE TABLE roles (
                name text PRIMARY KEY, spec text NOT NULL, preset integer,
                created double precision, updated double precision)""",
            """CREATE TABLE devices (
                id text PRIMARY KEY, asset_tag text NOT NULL, os_type text NOT NULL,
                enroll_status text NOT NULL, owner text, credential text,
                collected_data text, profile text, ek_pub_hash text,
                created double precision, updated double precision)""",
            "CREATE UNIQUE INDEX idx_devices_asset_tag ON devices (asset_tag)",
            """CREATE TABLE tokens (
                token_hash text PRIMARY KEY, kind text NOT NULL, subject text NOT NULL,
                expires double precision NOT NULL, created double precision,
                created_by text, consumed double precision, consumed_by text)""",
            """CREATE TABLE nodes (
                name text PRIMARY KEY, host text NOT NULL, port integer NOT NULL,
                labels text, created double precision)""",
            "CREATE UNIQUE INDEX idx_nodes_host_port ON nodes (host, port)",
            """CREATE TABLE locks (
                id text PRIMARY KEY, target_kind text NOT NULL, target text NOT NULL,
                message text, expires double precision, created double precision,
                created_by text)""",
            "CREATE INDEX idx_locks_target_kind_target ON locks (target_kind, target)",
            """CREATE TABLE issued_certs (
                serial bigint PRIMARY KEY, key_id text NOT NULL, "user" text,
                cert_type text NOT NULL, principals text, valid_after bigint NOT NULL,
                valid_before bigint NOT NULL, fingerprint text, device_id text,
                issued double precision, revoked double precision)""",
            'CREATE INDEX idx_issued_certs_user ON issued_certs ("user")',
            """CREATE TABLE audit (
                id bigint PRIMARY KEY, time double precision NOT NULL, code text NOT NULL,
                type text NOT NULL, success integer NOT NULL, message text, "user" text,
                device text, remote_addr text, fields text, hash text)""",
            "CREATE INDEX idx_audit_time ON audit (time)",
            "CREATE INDEX idx_audit_type ON audit (type)",
            """CREATE TABLE audit_checkpoints (
                id bigserial PRIMARY KEY, row_id bigint NOT NULL, row_hash text NOT NULL,
                time double precision NOT NULL, key text NOT NULL, signature text NOT NULL)""",
            """CREATE TABLE trust_roots (
                fingerprint text PRIMARY KEY, subject text, pem text NOT NULL,
                added double precision)""",
            """CREATE TABLE login_failures (
                id bigserial PRIMARY KEY, "user" text, time double precision,
                remote_addr text, pending integer NOT NULL DEFAULT 0)""",
            'CREATE INDEX idx_login_failures_user_time ON login_failures ("user", time)',
            """CREATE TABLE live_sessions (
                instance text NOT NULL, session_id bigint NOT NULL, "user" text,
                device text, node text, remote_addr text, serial text,
                started double precision NOT NULL, PRIMARY KEY (instance, session_id))""",
            # The change feed: one row per committed change (what SQLite's settings
            # 'revision' counts), the NOTIFY's payload is its seq.
            """CREATE TABLE changes (
                seq bigserial PRIMARY KEY, time double precision NOT NULL, origin text)""",
        ),
    ),
    (
        2,
        "failed authentications per address, cluster-wide (SQLite's migration 6)",
        (
            """CREATE TABLE source_failures (
                addr text NOT NULL, failed_at double precision NOT NULL,
                instance text NOT NULL, stamp double precision NOT NULL)""",
            "CREATE INDEX source_failures_time ON source_failures (failed_at)",
            "CREATE INDEX source_failures_stamp ON source_failures (instance, stamp)",
        ),
    ),
    (
        3,
        "device posture (SQLite's migration 7)",
        (
            """CREATE TABLE device_posture (
                device_id text PRIMARY KEY, baseline text, baseline_time double precision,
                baseline_by text, measured text, verdict text NOT NULL DEFAULT 'unchecked',
                reasons text, attested_until double precision NOT NULL DEFAULT 0,
                attest_failure text, updated double precision)""",
        ),
    ),
    # The next SQLite migration (8) gets its twin here as step 4.
]


def newest() -> int:
    return PG_MIGRATIONS[-1][0]
