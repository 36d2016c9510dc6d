"""A cluster's state directory: the database, the CA keys and the bastion's host key.

``Cluster.open`` is what both ``dtadmin`` and ``dt-bastion`` call; it refuses to
return a cluster whose database or keys are missing or corrupt, or whose state
directory another local user could change (``check_state_dir``): whoever can write
there can swap the CA keys the CA signs with.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import ssh

from bastion import audit
from bastion.authz.rbac import PRESET_ROLES, check_name
from bastion.ca import keys
from bastion.ca.authority import (
    AUDIT_KEY_SETTING,
    HOST_CA_SETTING,
    RETIRED_USER_CAS_SETTING,
    USER_CA_SETTING,
    CertificateAuthority,
)
from bastion.protocol.errors import AlreadyExists, StateError, StorageUnavailable
from bastion.protocol.files import (
    check_ancestors,
    check_own_dir,
    mode_text,
    private_dir,
    user_name,
)
from bastion.storage import DB_NAME, StateStore, open_store

DEFAULT_STATE_DIR = "/var/lib/dt-bastion"
BASTION_HOST_CERT = keys.BASTION_HOST_KEY + "-cert.pub"


def default_state_dir() -> Path:
    return Path(os.environ.get("DT_STATE") or DEFAULT_STATE_DIR)


@dataclass
class Cluster:
    state_dir: Path
    store: StateStore
    ca: CertificateAuthority

    @property
    def name(self) -> str:
        return str(self.store.get_setting("cluster_name", ""))

    @classmethod
    def open(cls, state_dir: Path | str, *, database: str | None = None) -> Cluster:
        """The cluster whose keys are in ``state_dir`` and whose state is in SQLite
        there, or in the PostgreSQL ``database`` (see ``storage.open_store``)."""
        state_dir = Path(state_dir)
        if os.path.lexists(state_dir):  # a missing one: open_store says how to make it
            check_state_dir(state_dir)
        elif database:
            raise StateError(
                f"no cluster state directory {state_dir} (the CA keys live there even "
                "with a PostgreSQL database; copy it from the first bastion)"
            )
        store = _open(state_dir, database)
        if not store.get_setting("cluster_name"):
            store.close()
            where = "the database" if database else str(state_dir / DB_NAME)
            raise StateError(f"{where} is not an initialised cluster")
        kdir = keys.ca_dir(state_dir)
        try:
            user_ca = _load_user_ca(kdir, store)
            host_ca = keys.load_private_key(kdir / keys.HOST_CA)
            _check_in_force(store, HOST_CA_SETTING, kdir / keys.HOST_CA, host_ca, "host CA key")
            _ensure_audit_key(kdir, store)
            audit_key = keys.load_private_key(kdir / keys.AUDIT_KEY)
            _check_in_force(store, AUDIT_KEY_SETTING, kdir / keys.AUDIT_KEY, audit_key, "audit key")
        except StateError:
            store.close()
            raise
        return cls(state_dir, store, CertificateAuthority(store, user_ca, host_ca))

    def close(self) -> None:
        self.store.close()

    # -- user CA rotation: revoking a whole CA ----------------------------------------------

    def rotate_user_ca(self, *, actor: str) -> tuple[str, str, int]:
        """Replace the user CA: every certificate it signed stops working at once.

        The one answer to a leaked CA key. The new key is written beside the old one
        first, then a single transaction names it the CA in force, retires the old
        public key (nodes' KRL revokes it) and revokes every live user certificate;
        only then are the files renamed. A crash anywhere leaves either the old CA in
        force or the new one (``_load_user_ca`` finishes a committed rotation).
        Returns (old fingerprint, new fingerprint, certificates revoked).
        """
        kdir = keys.ca_dir(self.state_dir)
        with _rotation_lock(kdir):
            return self._rotate_locked(kdir, actor)

    def _rotate_locked(self, kdir: Path, actor: str) -> tuple[str, str, int]:
        _discard(kdir / _NEXT)
        new_key = keys.create_key(kdir, _NEXT, f"user-ca@{self.name}")
        old_fp, new_fp = self.ca.user_ca_fingerprint, keys.fingerprint(new_key.public_key())
        now = time.time()
        try:
            with self.store.transaction():
                if self.store.get_setting(USER_CA_SETTING, old_fp) != old_fp:
                    raise StateError("the user CA was rotated by someone else meanwhile")
                retired = list(self.store.get_setting(RETIRED_USER_CAS_SETTING, []))
                retired.append(
                    {
                        "fingerprint": old_fp,
                        "public_key": keys.public_line(self.ca.user_ca.public_key()),
                        "retired": now,
                    }
                )
                self.store.set_setting(RETIRED_USER_CAS_SETTING, retired)
                self.store.set_setting(USER_CA_SETTING, new_fp)
                revoked = self.store.revoke_certs(now, everything=True)
                audit.record(
                    self.store,
                    "ca.rotate",
                    message=(
                        f"user CA {old_fp} replaced by {new_fp}; "
                        f"{len(revoked)} certificate(s) revoked"
                    ),
                    actor=actor,
                    old_fingerprint=old_fp,
                    new_fingerprint=new_fp,
                    revoked=len(revoked),
                )
        except BaseException:
            _discard(kdir / _NEXT)
            raise
        _install_next(kdir, now)
        self.ca.set_user_ca(new_key)
        return old_fp, new_fp, len(revoked)

    def refresh_user_ca(self) -> bool:
        """Load the user CA the database names, if another process rotated it.

        Returns True when the CA in memory is the one in force (after loading it if
        needed); False while a rotation's files are not in place yet (retry later).
        """
        wanted = self.store.get_setting(USER_CA_SETTING, self.ca.user_ca_fingerprint)
        if wanted == self.ca.user_ca_fingerprint:
            return True
        check_state_dir(self.state_dir)  # a new key file is about to be trusted
        try:
            key = _load_user_ca(keys.ca_dir(self.state_dir), self.store, repair=False)
        except StateError:
            return False
        self.ca.set_user_ca(key)
        return True

    def retired_user_cas(self) -> list[dict]:
        return list(self.store.get_setting(RETIRED_USER_CAS_SETTING, []))

    # -- the bastion's own host key -------------------------------------------------------

    def bastion_host_key_path(self) -> Path:
        return keys.ca_dir(self.state_dir) / keys.BASTION_HOST_KEY

    def ensure_bastion_host_cert(self, principals: tuple[str, ...], min_valid: int = 86400) -> Path:
        """Make (or renew) the bastion's host key and its host-CA certificate."""
        key_path = self.bastion_host_key_path()
        cert_path = key_path.with_name(BASTION_HOST_CERT)
        if not key_path.exists():
            try:
                keys.create_key(key_path.parent, key_path.name, f"dt-bastion@{self.name}")
            except OSError as exc:  # a read-only or full disk: say so, not "internal error"
                raise StorageUnavailable(
                    f"cannot write the bastion's host key {key_path}: {exc.strerror}"
                ) from exc
        key = keys.load_private_key(key_path)
        if cert_path.exists():
            try:
                cert = ssh.load_ssh_public_identity(cert_path.read_bytes())
                names = {p.decode() for p in cert.valid_principals}  # type: ignore[union-attr]
                if (
                    isinstance(cert, ssh.SSHCertificate)
                    and cert.valid_before > time.time() + min_valid
                    and names >= set(principals)
                    and keys.fingerprint(cert.signature_key()) == self.ca.host_ca_fingerprint
                ):
                    return cert_path
            except (ValueError, UnicodeDecodeError):
                pass
        issued = self.ca.sign_host(key.public_key(), principals, actor="dt-bastion")
        try:
            keys.atomic_write(cert_path, (issued.openssh + "\n").encode(), 0o644)
        except OSError as exc:
            raise StorageUnavailable(
                f"cannot write the bastion's host certificate {cert_path}: {exc.strerror}"
            ) from exc
        return cert_path


def init_cluster(
    state_dir: Path | str, name: str, *, actor: str = "dtadmin", database: str | None = None
) -> Cluster:
    """Create a new cluster; refuses to touch a directory (or a PostgreSQL
    ``database``) that already holds one. The keys are made in ``state_dir``."""
    check_name("cluster", name)
    state_dir = Path(state_dir)
    made = not os.path.lexists(state_dir)
    if made:
        private_dir(state_dir, STATE_WHAT)
    else:
        check_state_dir(state_dir)
    kdir = keys.ca_dir(state_dir)
    if (state_dir / DB_NAME).exists() or (kdir / keys.USER_CA).exists():
        raise AlreadyExists(
            f"{state_dir} already holds a cluster; refusing to overwrite it "
            "(remove the directory to start over)"
        )
    try:
        store = _open(state_dir, database, create=True)
        if database and store.get_setting("cluster_name"):
            store.close()
            raise AlreadyExists("the database already holds a cluster; refusing to overwrite it")
    except BaseException:
        if made:  # a refused init leaves nothing behind (only what it made, if empty)
            with contextlib.suppress(OSError):
                state_dir.rmdir()
        raise
    user_ca: ed25519.Ed25519PrivateKey = keys.create_key(kdir, keys.USER_CA, f"user-ca@{name}")
    host_ca = keys.create_key(kdir, keys.HOST_CA, f"host-ca@{name}")
    audit_key = keys.create_key(kdir, keys.AUDIT_KEY, f"audit@{name}")
    with store.transaction():
        store.set_setting("cluster_name", name)
        store.set_setting(USER_CA_SETTING, keys.fingerprint(user_ca.public_key()))
        store.set_setting(HOST_CA_SETTING, keys.fingerprint(host_ca.public_key()))
        store.set_setting(AUDIT_KEY_SETTING, keys.fingerprint(audit_key.public_key()))
        store.set_setting("device_trust_mode", "optional")
        store.set_setting("auto_enroll", False)
        for role in PRESET_ROLES:
            store.put_role(role)
        audit.record(store, "cluster.init", message=f'cluster "{name}" created', actor=actor)
    return Cluster(state_dir, store, CertificateAuthority(store, user_ca, host_ca))


def _open(state_dir: Path, database: str | None, *, create: bool = False) -> StateStore:
    """The store, SQLite or PostgreSQL: the shells see only the StateStore interface
    (tests/test_state_store.py checks they use nothing else)."""
    return open_store(state_dir, database, create=create)


_NEXT = keys.USER_CA + ".next"
STATE_WHAT = "cluster state directory"


# -- who can change the state ---------------------------------------------------------------


def check_state_dir(state_dir: Path | str) -> None:
    """Refuse a state directory another local user could change, naming the fix.

    The directory must belong to this process's user and be writable by nobody else,
    its parents by nobody but that user or root; everything in it must be that user's
    and writable by nobody else, with no symbolic links; ``ca/`` (and what is under
    it) must be 0700 and its private key files 0600. ``os.lstat`` and ``os.scandir``
    only: this runs in processes holding SQLite connections to ``cluster.db``, and
    opening (then closing) that file would drop their locks.
    """
    root = Path(os.path.realpath(state_dir))
    check_ancestors(root, STATE_WHAT)
    check_own_dir(root, STATE_WHAT)
    _check_entries(root, root, in_ca=False)


def _check_entries(root: Path, directory: Path, *, in_ca: bool) -> None:
    me = os.geteuid()
    with os.scandir(directory) as entries:
        for entry in entries:
            path = Path(entry.path)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # a temp file renamed meanwhile
                continue
            if stat.S_ISLNK(st.st_mode):
                raise StateError(
                    f"{path} is a symbolic link, which cluster state must never hold "
                    "(another user may have planted it): remove it and restore the file "
                    "from a backup"
                )
            if st.st_uid != me:
                raise StateError(
                    f"{path} belongs to {user_name(st.st_uid)}, not to you "
                    f"({user_name(me)}), so they could have replaced it: check it, then "
                    f"run: chown {user_name(me)} {path}"
                )
            if stat.S_ISDIR(st.st_mode):
                ca = in_ca or (directory == root and entry.name == keys.ca_dir(root).name)
                check_own_dir(path, "CA key folder" if ca else "state folder", private=ca)
                _check_entries(root, path, in_ca=ca)
            elif in_ca and not entry.name.endswith(".pub") and st.st_mode & 0o077:
                raise StateError(
                    f"key file {path} is accessible by group or others (mode "
                    f"{mode_text(st)}); run: chmod 600 {path}"
                )
            elif st.st_mode & 0o022:
                raise StateError(
                    f"{path} is writable by group or others (mode {mode_text(st)}); "
                    f"run: chmod go-w {path}"
                )


def _discard(key_path: Path) -> None:
    key_path.unlink(missing_ok=True)
    key_path.with_name(key_path.name + ".pub").unlink(missing_ok=True)


def _install_next(kdir: Path, stamp: float) -> None:
    """Move the old user CA into ca/retired/ and the committed next one into place."""
    retired = kdir / "retired"
    retired.mkdir(mode=0o700, exist_ok=True)
    current = kdir / keys.USER_CA
    if current.exists():
        name = f"{keys.USER_CA}-{int(stamp)}"
        os.replace(current, retired / name)
        if current.with_name(current.name + ".pub").exists():
            os.replace(current.with_name(current.name + ".pub"), retired / (name + ".pub"))
    nxt = kdir / _NEXT
    os.replace(nxt.with_name(nxt.name + ".pub"), current.with_name(current.name + ".pub"))
    os.replace(nxt, current)
    fd = os.open(kdir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_user_ca(
    kdir: Path, store: StateStore, *, repair: bool = True
) -> ed25519.Ed25519PrivateKey:
    """The user CA the database names, finishing an interrupted rotation.

    A key file that does not match the database's fingerprint is refused: the bastion
    must never trust, or sign with, a CA the cluster has retired. ``repair`` (under
    the rotation lock) completes or discards a rotation a crash left behind; without
    it nothing on disk is changed, which is what a live bastion wants.
    """
    nxt = kdir / _NEXT
    if nxt.exists():
        with _rotation_lock(kdir) if repair else contextlib.nullcontext():
            wanted = store.get_setting(USER_CA_SETTING)
            if nxt.exists():
                pending = keys.load_private_key(nxt)
                if keys.fingerprint(pending.public_key()) == wanted:
                    if repair:
                        _install_next(kdir, time.time())  # committed, not yet renamed
                    return pending
                if repair:
                    _discard(nxt)  # a rotation that never committed
    wanted = store.get_setting(USER_CA_SETTING)
    key = keys.load_private_key(kdir / keys.USER_CA)
    if wanted is not None and keys.fingerprint(key.public_key()) != wanted:
        raise StateError(
            f"user CA key {kdir / keys.USER_CA} is not the CA the cluster database names "
            f"({wanted}; this file is {keys.fingerprint(key.public_key())}); refusing to "
            f"use it. {_COPY_HINT.format(files='ca/user_ca and ca/user_ca.pub')}"
        )
    return key


_COPY_HINT = (
    "Every bastion needs the key in force: copy {files} from a host that has it "
    '(docs/getting-started.md, "Several bastions")'
)


def _check_in_force(
    store: StateStore, setting: str, path: Path, key: ed25519.Ed25519PrivateKey, what: str
) -> None:
    """The key file is the one the database names (a cluster from before keys were
    named gets this host's named now); another host's or a stale copy is refused."""
    have = keys.fingerprint(key.public_key())
    named = store.get_setting(setting)
    if named is None:
        with store.transaction():
            if store.get_setting(setting) is None:
                store.set_setting(setting, have)
                return
            named = store.get_setting(setting)
    if named != have:
        raise StateError(
            f"{what} {path} is not the one the cluster database names ({named}; this file "
            f"is {have}); refusing to start. "
            f"{_COPY_HINT.format(files=f'ca/{path.name} and ca/{path.name}.pub')}"
        )


def _ensure_audit_key(kdir: Path, store: StateStore) -> None:
    """Make the audit key of a cluster created before there was one (under the
    rotation lock: two processes opening at once make one key, not two), check that
    it loads, and sign a first checkpoint over rows that have none yet."""
    path = kdir / keys.AUDIT_KEY
    made = False
    if not path.exists():
        with _rotation_lock(kdir):
            if not path.exists():
                name = store.get_setting("cluster_name", "")
                try:
                    keys.create_key(kdir, keys.AUDIT_KEY, f"audit@{name}")
                except OSError as exc:
                    raise StorageUnavailable(
                        f"cannot write the audit key {path}: {exc.strerror}"
                    ) from exc
                made = True
    keys.load_private_key(path)  # a corrupt or exposed key stops us, as a CA key does
    # Only a cluster from before the audit key gets a first checkpoint here: where the
    # key existed, rows without any checkpoint mean checkpoints were deleted, and
    # signing now would bless whatever the rows were rewritten to (verify names it).
    if made and store.last_audit_checkpoint() is None and store.last_audit_id():
        store.checkpoint_audit()


@contextlib.contextmanager
def _rotation_lock(kdir: Path) -> Iterator[None]:
    """One rotation (or crash repair) at a time per state directory."""
    fd = os.open(kdir / ".rotate.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
