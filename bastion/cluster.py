"""A cluster's state directory: the database, the CA keys and the bastion's host key.

``Cluster.open`` is what both ``dtadmin`` and ``dt-bastion`` call; it refuses to
return a cluster whose database or keys are missing or corrupt.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import ssh

from bastion import audit
from bastion.ca import keys
from bastion.ca.authority import CertificateAuthority
from bastion.errors import AlreadyExists, StateError
from bastion.rbac import PRESET_ROLES, check_name
from bastion.storage import DB_NAME, Store

DEFAULT_STATE_DIR = "/var/lib/dt-bastion"
BASTION_HOST_CERT = keys.BASTION_HOST_KEY + "-cert.pub"


def default_state_dir() -> Path:
    return Path(os.environ.get("DT_STATE") or DEFAULT_STATE_DIR)


@dataclass
class Cluster:
    state_dir: Path
    store: Store
    ca: CertificateAuthority

    @property
    def name(self) -> str:
        return str(self.store.get_setting("cluster_name", ""))

    @classmethod
    def open(cls, state_dir: Path | str) -> Cluster:
        state_dir = Path(state_dir)
        store = Store.open(state_dir)
        if not store.get_setting("cluster_name"):
            store.close()
            raise StateError(f"{state_dir / DB_NAME} is not an initialised cluster")
        kdir = keys.ca_dir(state_dir)
        try:
            user_ca = keys.load_private_key(kdir / keys.USER_CA)
            host_ca = keys.load_private_key(kdir / keys.HOST_CA)
        except StateError:
            store.close()
            raise
        return cls(state_dir, store, CertificateAuthority(store, user_ca, host_ca))

    def close(self) -> None:
        self.store.close()

    # -- the bastion's own host key -------------------------------------------------------

    def bastion_host_key_path(self) -> Path:
        return keys.ca_dir(self.state_dir) / keys.BASTION_HOST_KEY

    def ensure_bastion_host_cert(self, principals: tuple[str, ...], min_valid: int = 86400) -> Path:
        """Make (or renew) the bastion's host key and its host-CA certificate."""
        key_path = self.bastion_host_key_path()
        cert_path = key_path.with_name(BASTION_HOST_CERT)
        if not key_path.exists():
            keys.create_key(key_path.parent, key_path.name, f"dt-bastion@{self.name}")
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
        keys.atomic_write(cert_path, (issued.openssh + "\n").encode(), 0o644)
        return cert_path


def init_cluster(state_dir: Path | str, name: str, *, actor: str = "dtadmin") -> Cluster:
    """Create a new cluster; refuses to touch a directory that already holds one."""
    check_name("cluster", name)
    state_dir = Path(state_dir)
    kdir = keys.ca_dir(state_dir)
    if (state_dir / DB_NAME).exists() or (kdir / keys.USER_CA).exists():
        raise AlreadyExists(
            f"{state_dir} already holds a cluster; refusing to overwrite it "
            "(remove the directory to start over)"
        )
    store = Store.open(state_dir, create=True)
    user_ca: ed25519.Ed25519PrivateKey = keys.create_key(kdir, keys.USER_CA, f"user-ca@{name}")
    host_ca = keys.create_key(kdir, keys.HOST_CA, f"host-ca@{name}")
    with store.transaction():
        store.set_setting("cluster_name", name)
        store.set_setting("device_trust_mode", "optional")
        store.set_setting("auto_enroll", False)
        for role in PRESET_ROLES:
            store.put_role(role)
        audit.record(store, "cluster.init", message=f'cluster "{name}" created', actor=actor)
    return Cluster(state_dir, store, CertificateAuthority(store, user_ca, host_ca))
