"""CA and host key files beside the cluster database.

Private keys are OpenSSH-format files with mode 0600, written atomically (a crash
never leaves half a key). A key file that is missing, unreadable, of the wrong type
or readable by others stops the bastion (StateError): it never limps on without a CA.
"""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import ssh

from bastion.protocol.certs import fingerprint, public_line
from bastion.protocol.errors import AlreadyExists, StateError
from bastion.protocol.files import atomic_write

__all__ = ["atomic_write", "fingerprint", "public_line"]

USER_CA = "user_ca"
HOST_CA = "host_ca"
BASTION_HOST_KEY = "bastion_host_key"
AUDIT_KEY = "audit_key"  # signs audit checkpoints; never a CA key


def ca_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "ca"


def create_key(directory: Path, name: str, comment: str) -> ed25519.Ed25519PrivateKey:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / name
    if path.exists():
        raise AlreadyExists(f"key {path} already exists; refusing to overwrite it")
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    atomic_write(path, private, 0o600)
    atomic_write(
        path.with_name(name + ".pub"),
        (public_line(key.public_key(), comment) + "\n").encode(),
        0o644,
    )
    return key


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """Load a CA or host private key, refusing one that others could read."""
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateError(f"key file {path} is missing") from None
    except OSError as exc:
        raise StateError(f"key file {path} is unreadable: {exc.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise StateError(
            f"key file {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    try:
        key = ssh.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise StateError(f"key file {path} is corrupt: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise StateError(f"key file {path} is not an Ed25519 key")
    return key
