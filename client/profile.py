"""The client's state under ``~/.dt`` (``DT_HOME`` overrides).

Layout (one cluster profile at a time, like the seed's current profile)::

    ~/.dt/profile.json        proxy, user, cluster, roles, logins, host CA pin
    ~/.dt/keys/id_ed25519      the session key (0600), made fresh at every login
    ~/.dt/keys/id_ed25519-cert.pub
    ~/.dt/known_hosts          @cert-authority lines for the cluster's host CA
    ~/.dt/device.json          the enrolled device: asset tag, credential id
    ~/.dt/tpm/                 the TPM-wrapped attestation key blobs

Every file is written atomically (``bastion.protocol.files.atomic_write``: a fresh
unpredictable name opened ``O_EXCL|O_NOFOLLOW``, then renamed, so a planted link is
replaced, never written through); secrets with mode 0600. ``Home.open`` refuses a home
that is a link's target someone else controls, belongs to another user, or that group
or others can write (or whose parents they can), naming the ``chmod``/``chown`` fix;
directories it makes are 0700.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.protocol.errors import CertificateError, NotLoggedIn, StateError
from bastion.protocol.files import atomic_write, check_ancestors, check_own_dir, private_dir

if TYPE_CHECKING:  # certs needs cryptography: imported where a certificate is read
    from bastion.protocol.certs import ParsedCert

KEY_NAME = "id_ed25519"


def dt_home() -> Path:
    return Path(os.environ.get("DT_HOME") or Path.home() / ".dt")


@dataclass(frozen=True, slots=True)
class Profile:
    proxy: str  # host:port of the bastion
    user: str
    cluster: str
    roles: tuple[str, ...] = ()
    logins: tuple[str, ...] = ()
    host_ca_keys: tuple[str, ...] = ()
    ca_pin: str = ""
    device_warning: str | None = None

    @property
    def host(self) -> str:
        return split_hostport(self.proxy)[0]

    @property
    def port(self) -> int:
        return split_hostport(self.proxy)[1]


@dataclass(frozen=True, slots=True)
class DeviceState:
    asset_tag: str
    credential_id: str
    cluster: str
    tpm: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def split_hostport(value: str, default_port: int = 3022) -> tuple[str, int]:
    from bastion.protocol.errors import UsageError

    host, port = value, default_port
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":"):
            port = _port(rest[1:])
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        port = _port(port_text)
    if not host:
        raise UsageError(f"invalid address {value!r}: expected HOST:PORT")
    return host, port


def _port(text: str) -> int:
    from bastion.protocol.errors import UsageError

    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"invalid port {text!r}")
    return int(text)


HOME_WHAT = "dtclient's home"
SUB_WHAT = "dtclient's folder"


class Home:
    """Reads and writes the files under DT_HOME."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or dt_home()

    @classmethod
    def open(cls, root: Path | None = None) -> Home:
        """The home every command uses, refused if another local user could write it.

        A home that does not exist yet is made (0700, with any missing parents) when
        something is first saved; its existing parents are checked now.
        """
        home = cls(root)
        home.root = Path(os.path.realpath(home.root))
        home.check()
        return home

    def check(self) -> None:
        check_ancestors(self.root, HOME_WHAT)
        check_own_dir(self.root, HOME_WHAT)
        for sub in (self.key_path.parent, self.tpm_dir):
            check_own_dir(sub, SUB_WHAT)

    @property
    def key_path(self) -> Path:
        return self.root / "keys" / KEY_NAME

    @property
    def public_key_path(self) -> Path:
        return self.key_path.with_name(KEY_NAME + ".pub")

    @property
    def cert_path(self) -> Path:
        return self.root / "keys" / f"{KEY_NAME}-cert.pub"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    @property
    def tpm_dir(self) -> Path:
        return self.root / "tpm"

    def _ensure(self, path: Path) -> Path:
        """A directory of the home to write in: made 0700 if missing, checked if not."""
        return private_dir(path, HOME_WHAT if path == self.root else SUB_WHAT)

    # -- profile --------------------------------------------------------------------------

    def save_profile(self, profile: Profile) -> None:
        self._ensure(self.root)
        atomic_write(self.root / "profile.json", _dump(asdict(profile)), 0o600)
        lines = [f"@cert-authority * {key}" for key in profile.host_ca_keys]
        atomic_write(self.known_hosts, ("\n".join(lines) + "\n").encode(), 0o644)

    def load_profile(self) -> Profile:
        data = self._load_json("profile.json")
        if data is None:
            raise NotLoggedIn("not logged in (run: dtclient login --proxy HOST:PORT --user NAME)")
        try:
            data["roles"] = tuple(data.get("roles", ()))
            data["logins"] = tuple(data.get("logins", ()))
            data["host_ca_keys"] = tuple(data.get("host_ca_keys", ()))
            return Profile(**data)
        except TypeError as exc:
            raise StateError(f"{self.root / 'profile.json'} is corrupt: {exc}") from None

    def current_cluster(self) -> str | None:
        """The cluster of the profile, or of the host CAs trusted last (kept at logout)."""
        for name in ("profile.json", "trusted.json"):
            try:
                cluster = (self._load_json(name) or {}).get("cluster")
            except StateError:
                continue
            if isinstance(cluster, str) and cluster:
                return cluster
        return None

    def trusted_host_cas(self) -> tuple[str, ...]:
        """Host CA keys trusted from an earlier login (kept across logout)."""
        data = self._load_json("trusted.json") or {}
        return tuple(data.get("host_ca_keys", ()))

    def trust_host_cas(self, keys: tuple[str, ...], cluster: str) -> None:
        self._ensure(self.root)
        atomic_write(
            self.root / "trusted.json",
            _dump({"cluster": cluster, "host_ca_keys": list(keys)}),
            0o600,
        )

    # -- key and certificate ---------------------------------------------------------------

    def save_credentials(self, private_key_pem: bytes, public_line: str, cert_line: str) -> None:
        self._ensure(self.key_path.parent)
        atomic_write(self.key_path, private_key_pem, 0o600)
        atomic_write(self.public_key_path, (public_line + "\n").encode(), 0o644)
        atomic_write(self.cert_path, (cert_line.strip() + "\n").encode(), 0o644)

    def load_cert(self) -> ParsedCert:
        try:
            data = self.cert_path.read_bytes()
        except FileNotFoundError:
            raise NotLoggedIn("not logged in (run: dtclient login)") from None
        from bastion.protocol.certs import parse_cert

        try:
            return parse_cert(data)
        except CertificateError as exc:
            raise StateError(f"stored certificate {self.cert_path} is unreadable: {exc}") from None

    def remove_credentials(self) -> list[Path]:
        removed = []
        for path in (
            self.key_path,
            self.public_key_path,
            self.cert_path,
            self.root / "profile.json",
        ):
            if os.path.lexists(path):
                path.unlink()
                removed.append(path)
        return removed

    # -- device -------------------------------------------------------------------------------

    def save_device(self, state: DeviceState) -> None:
        self._ensure(self.root)
        atomic_write(self.root / "device.json", _dump(asdict(state)), 0o600)

    def load_device(self) -> DeviceState | None:
        data = self._load_json("device.json")
        if data is None:
            return None
        try:
            return DeviceState(**data)
        except TypeError:
            return None

    def forget_device(self) -> None:
        (self.root / "device.json").unlink(missing_ok=True)

    def _load_json(self, name: str) -> dict[str, Any] | None:
        path = self.root / name
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"{path} is unreadable or corrupt: {exc}") from None
        if not isinstance(data, dict):
            raise StateError(f"{path} is corrupt")
        return data


def _dump(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


# -- what `dtclient status` and `dtclient config` print (pure) ---------------------------------


def format_duration(seconds: float) -> str:
    """Go-style durations as the seed prints them: 11h52m0s."""
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def status_view(profile: Profile, cert: ParsedCert, now: float | None = None) -> dict[str, Any]:
    from bastion.protocol.certs import DEVICE_EXTENSIONS

    now = time.time() if now is None else now
    remaining = cert.valid_before - now
    return {
        "profile_url": f"ssh://{profile.proxy}",
        "logged_in_as": profile.user,
        "cluster": profile.cluster,
        "roles": list(profile.roles),
        "logins": [p for p in cert.principals if not p.startswith("-")],
        "valid_until": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(cert.valid_before)),
        "valid_for": format_duration(remaining) if remaining > 0 else None,
        "expired": remaining <= 0,
        "extensions": sorted(cert.extensions),
        "device_trusted": all(name in cert.extensions for name in DEVICE_EXTENSIONS),
        "device_asset_tag": cert.extensions.get("device-asset-tag@dt-bastion"),
        "serial": str(cert.serial),
    }


def status_lines(view: dict[str, Any]) -> list[str]:
    validity = (
        f"[valid for {view['valid_for']}]"
        if not view["expired"]
        else "[EXPIRED: run dtclient login]"
    )
    rows = [
        ("Profile URL", view["profile_url"]),
        ("Logged in as", view["logged_in_as"]),
        ("Cluster", view["cluster"]),
        ("Roles", ", ".join(view["roles"])),
        ("Logins", ", ".join(view["logins"])),
        ("Valid until", f"{view['valid_until']} {validity}"),
        ("Extensions", ", ".join(view["extensions"])),
    ]
    width = max(len(k) for k, _ in rows) + 1
    lines = [f"  {k + ':':<{width}} {v}" for k, v in rows]
    return ["> " + lines[0][2:], *lines[1:]]


def jump_alias(cluster: str) -> str:
    """The jump host's name in the ssh_config `dtclient config` writes: ``dt-<cluster>``.

    Prefixed, so a cluster named after a real domain (``example.com``) does not capture
    ``ssh example.com``; characters ssh would read as ``user@`` or patterns become ``-``.
    """
    return "dt-" + re.sub(r"[^A-Za-z0-9._-]", "-", cluster)


def config_node_names(nodes: Iterable[str]) -> tuple[list[str], list[str]]:
    """Inventory names that can stand in an ssh_config ``Host`` line, and the rest.

    A name with ``@`` (ssh reads ``root@a@b`` differently), a pattern character or a
    leading ``-`` is left out: ``ssh -J`` with the address still reaches it.
    """
    good: list[str] = []
    bad: list[str] = []
    for name in dict.fromkeys(nodes):
        (good if SAFE_HOST_RE.fullmatch(name) else bad).append(name)
    return good, bad


SAFE_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def ssh_config(
    profile: Profile, home: Home, nodes: Iterable[str] = (), *, ssh_user: str = "dt"
) -> str:
    """An ssh_config block naming only this cluster's jump host and nodes.

    ``dt-<cluster>`` is the bastion; each node is reachable as its inventory name and
    as ``NAME.<cluster>`` (both become ``HostName NAME``, what the bastion resolves),
    through ``ProxyJump dt-<cluster>`` with the dt key and certificate. No other host
    is matched, so ``git@github.com`` and the rest of ``~/.ssh/config`` stay as they were.
    """
    q = shlex.quote
    jump = jump_alias(profile.cluster)
    names, _ = config_node_names(nodes)
    suffix = jump[3:]
    common = [
        f"    IdentityFile {q(str(home.key_path))}",
        f"    CertificateFile {q(str(home.cert_path))}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {q(str(home.known_hosts))}",
        "    StrictHostKeyChecking yes",
    ]
    lines = [
        # The cluster name comes from the bastion: only its sanitised form goes in, so a
        # name with a newline cannot add directives (a ProxyCommand would run here).
        f"# dt-bastion cluster {suffix}: generated by `dtclient config`.",
        f"# Only {jump} and this cluster's nodes; run it again when nodes are added.",
        f"Host {jump}",
        f"    HostName {profile.host}",
        f"    Port {profile.port}",
        f"    User {ssh_user}",
        # The bastion's host certificate names the bastion host, not the alias.
        f"    HostKeyAlias {profile.host}",
        *common,
    ]
    for name in names:
        lines += [
            "",
            f"Host {name} {name}.{suffix}",
            f"    HostName {name}",
            f"    ProxyJump {jump}",
        ]
        lines += common
    return "\n".join([*lines, ""])
