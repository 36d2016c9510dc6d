"""Cluster state: one SQLite file (WAL) under the state directory, through sqlite-utils.

Everything above this package talks to :class:`Store` and gets typed records back,
so a PostgreSQL backend serving several bastions would only re-implement this class.

Two rules hold everywhere here:

* Every change to users, roles, devices, nodes, locks, tokens, settings or trust
  roots bumps ``revision`` in the same transaction. Running bastions poll that one
  integer (not whole tables) and re-check their live sessions when it moves.
* A database we cannot read, or one written by a newer schema, raises
  :class:`StateError`: a bastion stops rather than guess.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import sqlite_utils

from bastion.authz.facts import Facts
from bastion.authz.records import (
    AuditEvent,
    Device,
    DeviceCredential,
    IssuedCert,
    Lock,
    Node,
    OpenSession,
    Role,
    Rule,
    Token,
    User,
)
from bastion.protocol.errors import AlreadyExists, NotFound, StateError, StorageUnavailable
from bastion.storage import files
from bastion.storage.migrations import MIGRATIONS

DB_NAME = "cluster.db"

__all__ = ["Store", "DB_NAME", "role_to_spec", "role_from_spec"]


def _j(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def role_to_spec(role: Role) -> dict[str, Any]:
    spec = asdict(role)
    spec["rules"] = [{"resources": list(r.resources), "verbs": list(r.verbs)} for r in role.rules]
    spec["logins"] = list(role.logins)
    spec["node_labels"] = {k: list(v) for k, v in role.node_labels.items()}
    return spec


def role_from_spec(spec: dict[str, Any]) -> Role:
    spec = dict(spec)
    spec["logins"] = tuple(spec.get("logins", ()))
    spec["node_labels"] = {k: tuple(v) for k, v in spec.get("node_labels", {}).items()}
    spec["rules"] = tuple(
        Rule(tuple(r["resources"]), tuple(r["verbs"])) for r in spec.get("rules", ())
    )
    return Role(**spec)


def _open_error(state_dir: Path, path: Path, exc: BaseException) -> Exception:
    if files.read_only(state_dir):
        return StorageUnavailable(
            f"cannot open the cluster database in {state_dir}: its file system is "
            "read-only; nothing can be issued or changed until it is writable again"
        )
    if isinstance(exc, OSError):
        return StateError(f"cannot open cluster state in {state_dir}: {exc.strerror}")
    return StateError(f"cluster database {path} is unreadable or corrupt: {exc}")


class Store:
    """The cluster's state. Thread-safe: one connection guarded by a re-entrant lock."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path | None, *, file_key: files.FileKey | None = None
    ) -> None:
        self.path = path
        self._conn = conn
        self._file_key = file_key
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        self._bump_pending = False
        self._after_commit: list[Callable[[], None]] = []

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path | str, *, create: bool = False, check: bool = True) -> Store:
        """Open (or with ``create``, make) the database, bringing its schema up to date.

        ``check=False`` skips the integrity check and the schema migration (a write
        transaction), for a second connection of a process that just did both."""
        state_dir = Path(state_dir)
        path = state_dir / DB_NAME
        if not create and not path.exists():
            raise StateError(
                f"no cluster state in {state_dir} "
                f"(run: dtadmin init --cluster NAME --state {state_dir})"
            )
        store: Store | None = None
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            conn, key = files.connect(path, create=create)
            store = cls(conn, path, file_key=key)
            store._configure(check)
            if check:
                store._migrate()
        except BaseException as exc:
            if store is not None:
                store.close()
            if isinstance(exc, (sqlite3.DatabaseError, OSError)):
                raise _open_error(state_dir, path, exc) from exc
            raise
        return store

    @classmethod
    def memory(cls) -> Store:
        """An in-memory store for unit tests of code above storage."""
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        store = cls(conn, None)
        store._migrate()
        return store

    def _configure(self, check: bool = True) -> None:
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a certificate is handed out only after its serial is on disk.
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        if not check:
            return
        result = self._conn.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise StateError(f"cluster database {self.path} failed its integrity check: {result}")

    def integrity_check(self) -> None:
        """Refuse a database whose indexes disagree with its tables, or worse.

        The open-time ``quick_check`` skips indexes to stay cheap; a broken index still
        answers lookups wrongly (a lock or a revoked serial that an index no longer
        finds). ``dt-bastion serve`` runs this full check once before serving.
        """
        try:
            rows = self._all("PRAGMA integrity_check(20)")
        except StateError as exc:  # too broken to check at all
            problems = [exc.message]
        else:
            problems = [str(next(iter(row.values()))) for row in rows]
        if problems != ["ok"]:
            raise StateError(
                f"cluster database {self.path} failed its integrity check: "
                f"{'; '.join(problems[:5])}; restore it from a backup"
            )

    def _migrate(self) -> None:
        with self.transaction(bump=False):
            self.db["_migrations"].create(
                {"version": int, "name": str, "applied": float}, pk="version", if_not_exists=True
            )
            done = {row["version"] for row in self.db["_migrations"].rows}
            newest = MIGRATIONS[-1][0]
            if done and max(done) > newest:
                raise StateError(
                    f"cluster database schema version {max(done)} is newer than this release "
                    f"understands ({newest}); upgrade dt-bastion"
                )
            for version, name, step in MIGRATIONS:
                if version not in done:
                    step(self.db)
                    self._conn.execute(
                        "INSERT INTO _migrations (version, name, applied) VALUES (?, ?, ?)",
                        (version, name, time.time()),
                    )

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            key, self._file_key = self._file_key, None
        if key is not None:
            files.release(key)

    def schema_version(self) -> int:
        row = self._conn.execute("SELECT max(version) FROM _migrations").fetchone()
        return int(row[0] or 0)

    # -- transactions ------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, bump: bool = True) -> Iterator[None]:
        """One atomic unit. Nested calls join the outer transaction.

        ``BEGIN IMMEDIATE`` takes the write lock up front, so two bastions racing for
        one token serialise here instead of failing with a deadlock at commit.
        """
        with self._lock:
            if self._conn.in_transaction:
                self._bump_pending |= bump
                yield
                return
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StorageUnavailable(f"cluster database is busy or unwritable: {exc}") from exc
            self._bump_pending = bump
            try:
                yield
                if self._bump_pending:
                    self._conn.execute(
                        "INSERT INTO settings (key, value) VALUES ('revision', '1') "
                        "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
                    )
                self._conn.execute("COMMIT")
            except BaseException as exc:
                self._after_commit = []
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise StorageUnavailable(f"cluster database write failed: {exc}") from exc
                if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
                    exc, sqlite3.IntegrityError
                ):
                    raise StateError(f"cluster database error: {exc}") from exc
                raise
            done, self._after_commit = self._after_commit, []
        for callback in done:
            callback()

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the current transaction has committed (at once if none
        is open), and never if it rolls back: a log line saying "allowed" must not
        outlive the issuance it describes."""
        with self._lock:
            if self._conn.in_transaction:
                self._after_commit.append(callback)
                return
        callback()

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A part of the open transaction that can fail alone: on an exception only
        its own writes are undone, and the transaction goes on (group commit)."""
        with self._lock:
            if not self._conn.in_transaction:
                raise RuntimeError("savepoint() needs an open transaction")
            self._conn.execute("SAVEPOINT part")
            callbacks = len(self._after_commit)
            try:
                yield
            except BaseException:
                del self._after_commit[callbacks:]
                # SQLite may already have rolled the whole transaction back (a full
                # disk); then there is no savepoint left and the error stands.
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK TO part")
                        self._conn.execute("RELEASE part")
                raise
            self._conn.execute("RELEASE part")

    @contextlib.contextmanager
    def read_transaction(self) -> Iterator[None]:
        """One consistent snapshot for several reads (joins a transaction already open).

        A deferred BEGIN in WAL mode takes no lock: a writer elsewhere neither waits
        for it nor is waited for."""
        with self._lock:
            if self._conn.in_transaction:
                yield
                return
            try:
                self._conn.execute("BEGIN")
            except sqlite3.OperationalError as exc:
                raise StorageUnavailable(f"cluster database read failed: {exc}") from exc
            try:
                yield
            finally:
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("COMMIT")

    def facts(
        self,
        *,
        user: str | None,
        now: float,
        serial: int | None = None,
        asset_tag: str | None = None,
    ) -> Facts:
        """What the decision core needs about ``user`` (and a certificate serial and a
        device), read in one snapshot. Anything unreadable comes back as the strictest
        value: a corrupt setting as no mode (required), a corrupt role as None."""
        with self.read_transaction():
            try:
                mode = self.get_setting("device_trust_mode")
            except StateError:
                mode = None
            ca = self.get_setting("user_ca_fingerprint")
            record = self.find_user(user) if user else None
            roles: list[Role | None] = []
            for name in record.roles if record else ():
                try:
                    roles.append(self.find_role(name))
                except StateError:
                    roles.append(None)
            return Facts(
                cluster_mode=mode,
                user_ca_fingerprint=ca if isinstance(ca, str) else None,
                user=record,
                roles=tuple(roles),
                user_lock=self.active_lock("user", user, now) if user else None,
                issued=self.find_cert(serial) if serial is not None else None,
                device=self.find_device(asset_tag) if asset_tag else None,
                device_lock=self.active_lock("device", asset_tag, now) if asset_tag else None,
            )

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Reads go straight to the connection: they are on every login's hot path, and
        sqlite-utils' query() parses each statement first (a third of issuance time)."""
        with self._lock:
            try:
                cursor = self._conn.execute(sql, params)
            except sqlite3.OperationalError as exc:
                raise StorageUnavailable(f"cluster database read failed: {exc}") from exc
            except sqlite3.DatabaseError as exc:
                raise StateError(f"cluster database error: {exc}") from exc
            names = [d[0] for d in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _exec(self, sql: str, params: tuple[Any, ...] = (), *, bump: bool = True) -> int:
        with self.transaction(bump=bump):
            return self._conn.execute(sql, params).rowcount

    # -- settings and revision ------------------------------------------------------------

    def revision(self) -> int:
        row = self._one("SELECT value FROM settings WHERE key = 'revision'")
        return int(row["value"]) if row else 0

    def get_setting(self, key: str, default: Any = None) -> Any:
        row = self._one("SELECT value FROM settings WHERE key = ?", (key,))
        if row is None:
            return default
        try:
            return json.loads(row["value"])
        except ValueError:
            raise StateError(f"cluster setting {key!r} is corrupt") from None

    def set_setting(self, key: str, value: Any) -> None:
        self._exec(
            "INSERT INTO settings (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, _j(value)),
        )

    # -- users ---------------------------------------------------------------------------

    @staticmethod
    def _user(row: dict[str, Any]) -> User:
        return User(
            name=row["name"],
            roles=tuple(json.loads(row["roles"])),
            logins=tuple(json.loads(row["logins"])),
            password_hash=row["password_hash"],
            totp_secret=row["totp_secret"],
            totp_last_step=row["totp_last_step"],
            created=row["created"] or 0.0,
            updated=row["updated"] or 0.0,
            created_by=row["created_by"] or "",
        )

    def add_user(self, user: User) -> User:
        now = time.time()
        user = replace(user, created=now, updated=now)
        try:
            self._exec(
                "INSERT INTO users (name, roles, logins, password_hash, totp_secret, "
                "totp_last_step, created, updated, created_by) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    user.name,
                    _j(list(user.roles)),
                    _j(list(user.logins)),
                    user.password_hash,
                    user.totp_secret,
                    user.totp_last_step,
                    now,
                    now,
                    user.created_by,
                ),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f'user "{user.name}" already exists') from None
        return user

    def find_user(self, name: str) -> User | None:
        row = self._one("SELECT * FROM users WHERE name = ?", (name,))
        return self._user(row) if row else None

    def get_user(self, name: str) -> User:
        user = self.find_user(name)
        if user is None:
            raise NotFound(f'user "{name}" not found')
        return user

    def list_users(self) -> list[User]:
        return [self._user(r) for r in self._all("SELECT * FROM users ORDER BY name")]

    def update_user(self, user: User) -> User:
        user = replace(user, updated=time.time())
        count = self._exec(
            "UPDATE users SET roles=?, logins=?, password_hash=?, totp_secret=?, "
            "totp_last_step=?, updated=? WHERE name=?",
            (
                _j(list(user.roles)),
                _j(list(user.logins)),
                user.password_hash,
                user.totp_secret,
                user.totp_last_step,
                user.updated,
                user.name,
            ),
        )
        if count != 1:
            raise NotFound(f'user "{user.name}" not found')
        return user

    # Field-level writes: each changes only what it names, so a change read from an
    # older copy of the record (a login that spent 190 ms in argon2, an admin's
    # editor) cannot undo another's meanwhile. Prefer them to update_user.

    def set_user_roles(self, name: str, roles: tuple[str, ...]) -> None:
        self._set_user_fields(name, roles=_j(list(roles)))

    def set_user_logins(self, name: str, logins: tuple[str, ...]) -> None:
        self._set_user_fields(name, logins=_j(list(logins)))

    def set_user_secrets(
        self,
        name: str,
        password_hash: str | None,
        totp_secret: str | None,
        totp_last_step: int | None,
    ) -> None:
        """Set (or with None, clear) the password and one-time-code app together."""
        self._set_user_fields(
            name,
            password_hash=password_hash,
            totp_secret=totp_secret,
            totp_last_step=totp_last_step,
        )

    def _set_user_fields(self, name: str, **fields: Any) -> None:
        columns = ", ".join(f"{column} = ?" for column in fields)
        count = self._exec(
            f"UPDATE users SET {columns}, updated = ? WHERE name = ?",
            (*fields.values(), time.time(), name),
        )
        if count != 1:
            raise NotFound(f'user "{name}" not found')

    def consume_totp_step(self, name: str, step: int, password_hash: str) -> bool:
        """Spend a one-time code's time step, only if the password is still the one that
        was checked and no code of this or a later step was used. Exactly one of several
        logins racing with one code gets True; none does after a password reset."""
        return (
            self._exec(
                "UPDATE users SET totp_last_step = ?, updated = ? WHERE name = ? "
                "AND password_hash = ? AND (totp_last_step IS NULL OR totp_last_step < ?)",
                (step, time.time(), name, password_hash, step),
                bump=False,  # nothing a live session is decided on
            )
            == 1
        )

    def remove_user(self, name: str) -> None:
        if self._exec("DELETE FROM users WHERE name = ?", (name,)) != 1:
            raise NotFound(f'user "{name}" not found')

    # -- roles ---------------------------------------------------------------------------

    def put_role(self, role: Role, *, create_only: bool = False) -> Role:
        now = time.time()
        spec = _j(role_to_spec(role))
        with self.transaction():
            exists = self._one("SELECT name FROM roles WHERE name = ?", (role.name,))
            if exists and create_only:
                raise AlreadyExists(f'role "{role.name}" already exists')
            self._conn.execute(
                "INSERT INTO roles (name, spec, preset, created, updated) VALUES (?,?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET spec=excluded.spec, updated=excluded.updated",
                (role.name, spec, int(role.preset), now, now),
            )
        return role

    def find_role(self, name: str) -> Role | None:
        row = self._one("SELECT spec FROM roles WHERE name = ?", (name,))
        if row is None:
            return None
        try:
            return role_from_spec(json.loads(row["spec"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise StateError(f'role "{name}" is corrupt in the database: {exc}') from None

    def get_role(self, name: str) -> Role:
        role = self.find_role(name)
        if role is None:
            raise NotFound(f'role "{name}" not found')
        return role

    def list_roles(self) -> list[Role]:
        return [self.get_role(r["name"]) for r in self._all("SELECT name FROM roles ORDER BY name")]

    def remove_role(self, name: str) -> None:
        if self._exec("DELETE FROM roles WHERE name = ?", (name,)) != 1:
            raise NotFound(f'role "{name}" not found')

    # -- devices -------------------------------------------------------------------------

    @staticmethod
    def _device(row: dict[str, Any]) -> Device:
        cred = None
        if row["credential"]:
            c = json.loads(row["credential"])
            cred = DeviceCredential(
                id=c["id"],
                public_key_der=bytes.fromhex(c["public_key_der"]),
                attestation_type=c["attestation_type"],
                ek_pub_hash=c["ek_pub_hash"],
                ak_public=bytes.fromhex(c.get("ak_public", "")),
            )
        return Device(
            id=row["id"],
            asset_tag=row["asset_tag"],
            os_type=row["os_type"],
            enroll_status=row["enroll_status"],
            owner=row["owner"] or "",
            credential=cred,
            collected_data=tuple(json.loads(row["collected_data"] or "[]")),
            profile=json.loads(row["profile"] or "{}"),
            ek_pub_hash=row["ek_pub_hash"],
            created=row["created"] or 0.0,
            updated=row["updated"] or 0.0,
        )

    @staticmethod
    def _device_params(d: Device) -> tuple[Any, ...]:
        cred = None
        if d.credential is not None:
            cred = _j(
                {
                    "id": d.credential.id,
                    "public_key_der": d.credential.public_key_der.hex(),
                    "attestation_type": d.credential.attestation_type,
                    "ek_pub_hash": d.credential.ek_pub_hash,
                    "ak_public": d.credential.ak_public.hex(),
                }
            )
        return (
            d.asset_tag,
            d.os_type,
            d.enroll_status,
            d.owner,
            cred,
            _j(list(d.collected_data)),
            _j(d.profile),
            d.ek_pub_hash,
            d.updated,
            d.id,
        )

    def add_device(self, device: Device) -> Device:
        now = time.time()
        device = replace(device, id=device.id or str(uuid.uuid4()), created=now, updated=now)
        try:
            self._exec(
                "INSERT INTO devices (asset_tag, os_type, enroll_status, owner, credential, "
                "collected_data, profile, ek_pub_hash, updated, id, created) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (*self._device_params(device), now),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f'device "{device.asset_tag}" already exists') from None
        return device

    def find_device(self, asset_tag: str) -> Device | None:
        row = self._one("SELECT * FROM devices WHERE asset_tag = ?", (asset_tag,))
        return self._device(row) if row else None

    def get_device(self, asset_tag: str) -> Device:
        device = self.find_device(asset_tag)
        if device is None:
            raise NotFound(f'device "{asset_tag}" not found')
        return device

    def find_device_by_id(self, device_id: str) -> Device | None:
        row = self._one("SELECT * FROM devices WHERE id = ?", (device_id,))
        return self._device(row) if row else None

    def list_devices(self) -> list[Device]:
        return [self._device(r) for r in self._all("SELECT * FROM devices ORDER BY asset_tag")]

    def update_device(self, device: Device) -> Device:
        device = replace(device, updated=time.time())
        try:
            count = self._exec(
                "UPDATE devices SET asset_tag=?, os_type=?, enroll_status=?, owner=?, "
                "credential=?, collected_data=?, profile=?, ek_pub_hash=?, updated=? WHERE id=?",
                self._device_params(device),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f'device "{device.asset_tag}" already exists') from None
        if count != 1:
            raise NotFound(f'device "{device.asset_tag}" not found')
        return device

    def remove_device(self, asset_tag: str) -> None:
        if self._exec("DELETE FROM devices WHERE asset_tag = ?", (asset_tag,)) != 1:
            raise NotFound(f'device "{asset_tag}" not found')

    # -- nodes ---------------------------------------------------------------------------

    @staticmethod
    def _node(row: dict[str, Any]) -> Node:
        return Node(
            name=row["name"],
            host=row["host"],
            port=int(row["port"]),
            labels=json.loads(row["labels"] or "{}"),
            created=row["created"] or 0.0,
        )

    def add_node(self, node: Node) -> Node:
        node = replace(node, created=time.time())
        try:
            self._exec(
                "INSERT INTO nodes (name, host, port, labels, created) VALUES (?,?,?,?,?)",
                (node.name, node.host, node.port, _j(node.labels), node.created),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(
                f'node "{node.name}" or address {node.addr} is already in the inventory'
            ) from None
        return node

    def find_node(self, name: str) -> Node | None:
        row = self._one("SELECT * FROM nodes WHERE name = ?", (name,))
        return self._node(row) if row else None

    def find_node_by_addr(self, host: str, port: int) -> Node | None:
        row = self._one("SELECT * FROM nodes WHERE host = ? AND port = ?", (host, port))
        return self._node(row) if row else None

    def list_nodes(self) -> list[Node]:
        return [self._node(r) for r in self._all("SELECT * FROM nodes ORDER BY name")]

    def remove_node(self, name: str) -> None:
        if self._exec("DELETE FROM nodes WHERE name = ?", (name,)) != 1:
            raise NotFound(f'node "{name}" not found')

    # -- locks ---------------------------------------------------------------------------

    @staticmethod
    def _lockrec(row: dict[str, Any]) -> Lock:
        return Lock(
            id=row["id"],
            target_kind=row["target_kind"],
            target=row["target"],
            message=row["message"] or "",
            expires=row["expires"],
            created=row["created"] or 0.0,
            created_by=row["created_by"] or "",
        )

    def add_lock(self, lock: Lock) -> Lock:
        lock = replace(lock, id=lock.id or uuid.uuid4().hex[:12], created=time.time())
        self._exec(
            "INSERT INTO locks (id, target_kind, target, message, expires, created, created_by) "
            "VALUES (?,?,?,?,?,?,?)",
            (
                lock.id,
                lock.target_kind,
                lock.target,
                lock.message,
                lock.expires,
                lock.created,
                lock.created_by,
            ),
        )
        return lock

    def list_locks(self, *, now: float | None = None) -> list[Lock]:
        """All locks, or with ``now`` only those in force at that time."""
        locks = [self._lockrec(r) for r in self._all("SELECT * FROM locks ORDER BY created")]
        return locks if now is None else [lk for lk in locks if lk.active(now)]

    def active_lock(self, target_kind: str, target: str, now: float) -> Lock | None:
        rows = self._all(
            "SELECT * FROM locks WHERE target_kind = ? AND target = ? "
            "AND (expires IS NULL OR expires > ?) ORDER BY created LIMIT 1",
            (target_kind, target, now),
        )
        return self._lockrec(rows[0]) if rows else None

    def remove_lock(self, lock_id: str) -> None:
        if self._exec("DELETE FROM locks WHERE id = ?", (lock_id,)) != 1:
            raise NotFound(f'lock "{lock_id}" not found')

    def remove_locks_for(self, target_kind: str, target: str) -> int:
        return self._exec(
            "DELETE FROM locks WHERE target_kind = ? AND target = ?", (target_kind, target)
        )

    # -- single-use tokens -------------------------------------------------------------------

    def add_token(self, token: Token) -> Token:
        token = replace(token, created=time.time())
        self._exec(
            "INSERT INTO tokens (token_hash, kind, subject, expires, created, created_by) "
            "VALUES (?,?,?,?,?,?)",
            (
                token.token_hash,
                token.kind,
                token.subject,
                token.expires,
                token.created,
                token.created_by,
            ),
        )
        return token

    def find_token(self, token_hash: str, kind: str) -> Token | None:
        row = self._one(
            "SELECT * FROM tokens WHERE token_hash = ? AND kind = ?", (token_hash, kind)
        )
        return Token(**row) if row else None

    def consume_token(self, token_hash: str, kind: str, *, now: float, consumer: str) -> bool:
        """Mark a live token used. Exactly one of several racing callers gets True.

        Call it inside the transaction that also stores what the token paid for, so a
        crash between the two leaves the token unused rather than silently burnt.
        """
        return (
            self._exec(
                "UPDATE tokens SET consumed = ?, consumed_by = ? WHERE token_hash = ? "
                "AND kind = ? AND consumed IS NULL AND expires > ?",
                (now, consumer, token_hash, kind, now),
            )
            == 1
        )

    def list_tokens(self, kind: str | None = None) -> list[Token]:
        if kind is None:
            rows = self._all("SELECT * FROM tokens ORDER BY created")
        else:
            rows = self._all("SELECT * FROM tokens WHERE kind = ? ORDER BY created", (kind,))
        return [Token(**r) for r in rows]

    # -- issued certificates -------------------------------------------------------------------

    @staticmethod
    def _cert(row: dict[str, Any]) -> IssuedCert:
        return IssuedCert(
            serial=int(row["serial"]),
            key_id=row["key_id"],
            user=row["user"] or "",
            cert_type=row["cert_type"],
            principals=tuple(json.loads(row["principals"] or "[]")),
            valid_after=int(row["valid_after"]),
            valid_before=int(row["valid_before"]),
            public_key_fingerprint=row["fingerprint"] or "",
            device_id=row["device_id"],
            issued=row["issued"] or 0.0,
            revoked=row["revoked"],
        )

    def record_cert(self, cert: IssuedCert) -> bool:
        """Record an issued serial; False if that serial was already taken."""
        try:
            with self.transaction(bump=False):
                self._conn.execute(
                    "INSERT INTO issued_certs (serial, key_id, user, cert_type, principals, "
                    "valid_after, valid_before, fingerprint, device_id, issued) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        cert.serial,
                        cert.key_id,
                        cert.user,
                        cert.cert_type,
                        _j(list(cert.principals)),
                        cert.valid_after,
                        cert.valid_before,
                        cert.public_key_fingerprint,
                        cert.device_id,
                        cert.issued or time.time(),
                    ),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def find_cert(self, serial: int) -> IssuedCert | None:
        row = self._one("SELECT * FROM issued_certs WHERE serial = ?", (serial,))
        return self._cert(row) if row else None

    def list_certs(
        self, *, user: str | None = None, key_id: str | None = None, revoked: bool | None = None
    ) -> list[IssuedCert]:
        sql, params = "SELECT * FROM issued_certs WHERE 1=1", []
        if user is not None:
            sql += " AND user = ?"
            params.append(user)
        if key_id is not None:
            sql += " AND key_id = ?"
            params.append(key_id)
        if revoked is not None:
            sql += " AND revoked IS NOT NULL" if revoked else " AND revoked IS NULL"
        return [self._cert(r) for r in self._all(sql + " ORDER BY issued", tuple(params))]

    def revoke_certs(
        self,
        now: float,
        *,
        serials: tuple[int, ...] = (),
        key_id: str | None = None,
        user: str | None = None,
        everything: bool = False,
    ) -> list[IssuedCert]:
        """Revoke every unrevoked user certificate matching any selector; returns them.

        One statement per selector inside the caller's transaction, so a revocation and
        its audit row land together and the bastion's watcher sees the revision move.
        """
        clauses: list[str] = []
        params: list[Any] = []
        if serials:
            clauses.append(f"serial IN ({','.join('?' * len(serials))})")
            params.extend(serials)
        if key_id is not None:
            clauses.append("key_id = ?")
            params.append(key_id)
        if user is not None:
            clauses.append("user = ?")
            params.append(user)
        if everything:
            clauses.append("1=1")
        if not clauses:
            return []
        where = f"cert_type = 'user' AND revoked IS NULL AND ({' OR '.join(clauses)})"
        with self.transaction():
            rows = self._all(f"SELECT * FROM issued_certs WHERE {where}", tuple(params))
            self._conn.execute(f"UPDATE issued_certs SET revoked = ? WHERE {where}", (now, *params))
        return [self._cert(r) for r in rows]

    def revoke_cert(self, serial: int, now: float) -> None:
        if (
            self._exec(
                "UPDATE issued_certs SET revoked = ? WHERE serial = ? AND revoked IS NULL",
                (now, serial),
            )
            != 1
        ):
            raise NotFound(f"no unrevoked certificate with serial {serial}")

    # -- trust roots -----------------------------------------------------------------------------

    def add_trust_root(self, fingerprint: str, subject: str, pem: str) -> None:
        try:
            self._exec(
                "INSERT INTO trust_roots (fingerprint, subject, pem, added) VALUES (?,?,?,?)",
                (fingerprint, subject, pem, time.time()),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"trust root {fingerprint} is already configured") from None

    def list_trust_roots(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM trust_roots ORDER BY added")

    def remove_trust_root(self, fingerprint: str) -> None:
        if self._exec("DELETE FROM trust_roots WHERE fingerprint = ?", (fingerprint,)) != 1:
            raise NotFound(f"no trust root with fingerprint {fingerprint}")

    # -- login failures (rate limiting and lockout) ------------------------------------------

    def record_login_failure(self, user: str, now: float, remote_addr: str | None) -> int:
        """Record one failure; returns failures for ``user`` in the last hour."""
        with self.transaction(bump=False):
            self._conn.execute(
                "INSERT INTO login_failures (user, time, remote_addr) VALUES (?,?,?)",
                (user, now, remote_addr),
            )
            self._conn.execute("DELETE FROM login_failures WHERE time < ?", (now - 86400,))
        return self.count_login_failures(user, since=now - 3600)

    def count_login_failures(self, user: str, *, since: float, pending: bool = True) -> int:
        """Failures since ``since``; with ``pending=False`` only those already checked,
        not the attempts still reserved (what a lockout is decided on)."""
        sql = "SELECT count(*) AS n FROM login_failures WHERE user = ? AND time >= ?"
        row = self._one(sql if pending else sql + " AND pending = 0", (user, since))
        return int(row["n"]) if row else 0

    def clear_login_failures(self, user: str) -> None:
        self._exec("DELETE FROM login_failures WHERE user = ?", (user,))

    def begin_login_attempt(
        self, user: str, *, now: float, since: float, limit: int, remote_addr: str | None
    ) -> int | None:
        """Reserve one login attempt before it is checked; None when ``limit`` failed or
        pending attempts since ``since`` already exist (then do not check it at all).

        The count and the reservation are one write transaction, so of N concurrent
        guesses at most ``limit`` are ever checked. The reservation counts as a failure
        until :meth:`settle_login_attempt` makes it one or :meth:`login_succeeded`
        removes it; a process that dies in between leaves it counted (fail closed).
        """
        with self.transaction(bump=False):
            row = self._one(
                "SELECT count(*) AS n FROM login_failures WHERE user = ? AND time >= ?",
                (user, since),
            )
            if row and int(row["n"]) >= limit:
                return None
            cursor = self._conn.execute(
                "INSERT INTO login_failures (user, time, remote_addr, pending) VALUES (?,?,?,1)",
                (user, now, remote_addr),
            )
            self._conn.execute("DELETE FROM login_failures WHERE time < ?", (now - 86400,))
            return int(cursor.lastrowid or 0)

    def settle_login_attempt(self, attempt: int) -> None:
        """A reserved attempt failed: it is an ordinary failure from now on."""
        self._exec("UPDATE login_failures SET pending = 0 WHERE id = ?", (attempt,), bump=False)

    def login_succeeded(self, user: str, attempt: int) -> None:
        """Forget ``user``'s failures and this attempt's reservation. Attempts still
        being checked keep theirs: a success does not wave concurrent guesses through."""
        self._exec(
            "DELETE FROM login_failures WHERE user = ? AND (pending = 0 OR id = ?)",
            (user, attempt),
            bump=False,
        )

    # -- open sessions (for ending them after a crash) -------------------------------------
    # Written with bump=False: sessions coming and going are not a state change that
    # every bastion must re-check its live sessions for.

    def add_open_session(self, session: OpenSession) -> None:
        with self.transaction(bump=False):
            self._conn.execute(
                "INSERT INTO live_sessions (instance, session_id, user, device, node, "
                "remote_addr, serial, started) VALUES (?,?,?,?,?,?,?,?)",
                (
                    session.instance,
                    session.session_id,
                    session.user,
                    session.device,
                    session.node,
                    session.remote_addr,
                    session.serial,
                    session.started,
                ),
            )

    def remove_open_session(self, instance: str, session_id: int) -> None:
        with self.transaction(bump=False):
            self._conn.execute(
                "DELETE FROM live_sessions WHERE instance = ? AND session_id = ?",
                (instance, session_id),
            )

    def list_open_sessions(self, instance: str | None = None) -> list[OpenSession]:
        where, params = ("WHERE instance = ?", (instance,)) if instance else ("", ())
        return [
            OpenSession(**row)
            for row in self._all(f"SELECT * FROM live_sessions {where} ORDER BY started", params)
        ]

    def open_session_instances(self) -> list[str]:
        return [r["instance"] for r in self._all("SELECT DISTINCT instance FROM live_sessions")]

    def take_open_sessions(self, instance: str) -> list[OpenSession]:
        """Remove and return an instance's sessions. Called inside the caller's
        transaction, the removal commits together with its audit rows."""
        with self.transaction(bump=False):
            sessions = self.list_open_sessions(instance)
            self._conn.execute("DELETE FROM live_sessions WHERE instance = ?", (instance,))
            return sessions

    # -- audit ---------------------------------------------------------------------------------

    def append_audit(self, event: AuditEvent) -> int:
        with self.transaction(bump=False):
            cur = self._conn.execute(
                "INSERT INTO audit (time, code, type, success, message, user, device, "
                "remote_addr, fields) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    event.time,
                    event.code,
                    event.type,
                    int(event.success),
                    event.message,
                    event.user,
                    event.device,
                    event.remote_addr,
                    _j(event.fields),
                ),
            )
            return int(cur.lastrowid or 0)

    def list_audit(
        self,
        *,
        type: str | None = None,
        user: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[AuditEvent]:
        sql, params = "SELECT * FROM audit WHERE 1=1", []
        for column, value in (("type", type), ("user", user)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        if since is not None:
            sql += " AND time >= ?"
            params.append(since)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        rows = self._all(sql, tuple(params))
        return [
            AuditEvent(
                id=r["id"],
                time=r["time"],
                code=r["code"],
                type=r["type"],
                success=bool(r["success"]),
                message=r["message"] or "",
                user=r["user"],
                device=r["device"],
                remote_addr=r["remote_addr"],
                fields=json.loads(r["fields"] or "{}"),
            )
            for r in reversed(rows)
        ]
