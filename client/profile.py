"""The client's state under ``~/.dt`` (``DT_HOME`` overrides).

Layout: one profile per cluster, side by side, like ``tsh`` profiles::

    ~/.dt/current                        the current cluster's folder name
    ~/.dt/clusters/NAME/profile.json     proxy, user, cluster, roles, logins, host CA pin
    ~/.dt/clusters/NAME/keys/id_ed25519  the session key (0600), made fresh at every login
    ~/.dt/clusters/NAME/keys/id_ed25519-cert.pub
    ~/.dt/clusters/NAME/known_hosts      @cert-authority lines for the cluster's host CA
    ~/.dt/clusters/NAME/trusted.json     the host CA trusted (kept across logout)
    ~/.dt/clusters/NAME/device.json      the device enrolled with this cluster
    ~/.dt/tpm/                           the TPM-wrapped attestation key blobs

``--cluster NAME`` or ``DT_CLUSTER`` chooses a profile, else the current one. A home
in the single-profile layout of earlier versions (``~/.dt/profile.json``,
``~/.dt/keys/``) is moved into its cluster's folder when first opened.

Every file is written atomically (``bastion.protocol.files.atomic_write``: a fresh
unpredictable name opened ``O_EXCL|O_NOFOLLOW``, then renamed, so a planted link is
replaced, never written through); secrets with mode 0600. ``Home.open`` refuses a home
that is a link's target someone else controls, belongs to another user, or that group
or others can write (or whose parents they can), naming the ``chmod``/``chown`` fix;
directories it makes are 0700.
"""

from __future__ import annotations

import contextlib
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
CLUSTERS = "clusters"
CURRENT = "current"  # the file naming the current cluster's folder
# What the single-profile layout kept in the home itself; moved into the cluster's folder.
LEGACY = ("profile.json", "trusted.json", "known_hosts", "keys", "device.json")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def folder_name(cluster: str) -> str:
    """The folder a cluster's profile lives in: its name, made safe for a path."""
    name = _UNSAFE.sub("_", cluster.strip())[:100].lstrip(".")
    return name or "default"


class Home:
    """Reads and writes the files under DT_HOME, one folder per cluster (like tsh profiles).

    ``cluster`` is the folder of the selected profile: ``--cluster``, else ``DT_CLUSTER``,
    else the current one (the file ``current``); None before the first login. The paths
    other commands use (``key_path``, ``cert_path``, ``known_hosts``, ...) are those of the
    selected cluster; the TPM's key blobs (``tpm_dir``) belong to the device, not a cluster.
    """

    def __init__(self, root: Path | None = None, cluster: str | None = None) -> None:
        self.root = root or dt_home()
        self.cluster = folder_name(cluster) if cluster else None

    @classmethod
    def open(cls, root: Path | None = None, cluster: str | None = None) -> Home:
        """The home every command uses, refused if another local user could write it.

        A home that does not exist yet is made (0700, with any missing parents) when
        something is first saved; its existing parents are checked now. A home in the
        single-profile layout of earlier versions is moved into a cluster folder.
        """
        home = cls(root)
        home.root = Path(os.path.realpath(home.root))
        home.check()
        home.migrate()
        chosen = cluster or os.environ.get("DT_CLUSTER") or home.current_name()
        home.cluster = folder_name(chosen) if chosen else None
        if home.cluster is not None:
            check_own_dir(home.dir, SUB_WHAT)
            check_own_dir(home.dir / "keys", SUB_WHAT)
        return home

    def check(self) -> None:
        check_ancestors(self.root, HOME_WHAT)
        check_own_dir(self.root, HOME_WHAT)
        for sub in (self.root / "keys", self.root / CLUSTERS, self.tpm_dir):
            check_own_dir(sub, SUB_WHAT)

    # -- profiles: one folder per cluster -------------------------------------------------------

    @property
    def clusters_dir(self) -> Path:
        return self.root / CLUSTERS

    @property
    def dir(self) -> Path:
        """The selected cluster's folder (``~/.dt/clusters/NAME``); with none selected (a
        ``Home(root)`` made by hand, or a home before its first login) the home itself,
        where nothing is saved: every save selects its cluster first."""
        if self.cluster is None:
            return self.root
        return self.clusters_dir / self.cluster

    def current_name(self) -> str | None:
        try:
            name = (self.root / CURRENT).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"{self.root / CURRENT} is unreadable: {exc}") from None
        return name or None

    def select(self, cluster: str) -> None:
        """Use (and from now on save into) this cluster's profile."""
        self.cluster = folder_name(cluster)

    def make_current(self) -> None:
        self._ensure(self.root)
        atomic_write(self.root / CURRENT, (self.dir.name + "\n").encode(), 0o600)

    def cluster_names(self) -> list[str]:
        try:
            return sorted(
                p.name for p in self.clusters_dir.iterdir() if p.is_dir() and not p.is_symlink()
            )
        except FileNotFoundError:
            return []

    def profiles(self) -> list[tuple[str, Profile | None, ParsedCert | None]]:
        """Every cluster folder: its profile and certificate where readable."""
        rows: list[tuple[str, Profile | None, ParsedCert | None]] = []
        for name in self.cluster_names():
            other = Home(self.root, name)
            profile = cert = None
            with contextlib.suppress(NotLoggedIn, StateError):
                profile = other.load_profile()
            with contextlib.suppress(NotLoggedIn, StateError):
                cert = other.load_cert()
            rows.append((name, profile, cert))
        return rows

    def find_proxy(self, proxy: str) -> str | None:
        """The cluster folder whose profile talks to this bastion address."""
        for name, profile, _ in self.profiles():
            if profile is not None and profile.proxy == proxy:
                return name
        return None

    def migrate(self) -> None:
        """Move a single-profile home (``~/.dt/profile.json``, ``~/.dt/keys``) into
        ``~/.dt/clusters/NAME``, and make it current. Nothing is copied, only renamed."""
        present = [n for n in LEGACY if os.path.lexists(self.root / n)]
        if not present:
            return
        cluster = None
        for name in ("profile.json", "trusted.json", "device.json"):
            with contextlib.suppress(StateError):
                value = (self._load_json(self.root / name) or {}).get("cluster")
                if isinstance(value, str) and value:
                    cluster = value
                    break
        target = self.clusters_dir / folder_name(cluster or "default")
        if target.exists():
            return  # migrated before and something recreated a file: leave both alone
        self._ensure(self.clusters_dir)
        self._ensure(target)
        for name in present:
            with contextlib.suppress(FileNotFoundError):  # another dtclient moved it first
                os.rename(self.root / name, target / name)
        if self.current_name() is None:
            atomic_write(self.root / CURRENT, (target.name + "\n").encode(), 0o600)
        from bastion.protocol import console

        console.note(
            f"dtclient keeps one profile per cluster now: moved yours to {target} "
            "(if your ssh config names the old key paths, print it again: dtclient config)"
        )

    @property
    def key_path(self) -> Path:
        return self.dir / "keys" / KEY_NAME

    @property
    def public_key_path(self) -> Path:
        return self.key_path.with_name(KEY_NAME + ".pub")

    @property
    def cert_path(self) -> Path:
        return self.dir / "keys" / f"{KEY_NAME}-cert.pub"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def tpm_dir(self) -> Path:
        return self.root / "tpm"

    def _ensure(self, path: Path) -> Path:
        """A directory of the home to write in: made 0700 if missing, checked if not."""
        return private_dir(path, HOME_WHAT if path == self.root else SUB_WHAT)

    # -- profile --------------------------------------------------------------------------

    def save_profile(self, profile: Profile) -> None:
        if self.cluster is None:
            self.select(profile.cluster)
        self._ensure(self.dir)
        atomic_write(self.dir / "profile.json", _dump(asdict(profile)), 0o600)
        lines = [f"@cert-authority * {key}" for key in profile.host_ca_keys]
        atomic_write(self.known_hosts, ("\n".join(lines) + "\n").encode(), 0o644)
        self.make_current()

    def load_profile(self) -> Profile:
        path = self.dir / "profile.json"
        data = self._load_json(path)
        if data is None:
            raise NotLoggedIn("not logged in (run: dtclient login --proxy HOST:PORT --user NAME)")
        try:
            data["roles"] = tuple(data.get("roles", ()))
            data["logins"] = tuple(data.get("logins", ()))
            data["host_ca_keys"] = tuple(data.get("host_ca_keys", ()))
            return Profile(**data)
        except TypeError as exc:
            raise StateError(f"{path} is corrupt: {exc}") from None

    def current_cluster(self) -> str | None:
        """The selected profile's cluster, or of the host CAs trusted last (kept at logout)."""
        if self.cluster is None:
            return None
        for name in ("profile.json", "trusted.json"):
            try:
                cluster = (self._load_json(self.dir / name) or {}).get("cluster")
            except StateError:
                continue
            if isinstance(cluster, str) and cluster:
                return cluster
        return None

    def trusted_host_cas(self) -> tuple[str, ...]:
        """Host CA keys of this cluster trusted from an earlier login (kept across logout)."""
        if self.cluster is None:
            return ()
        data = self._load_json(self.dir / "trusted.json") or {}
        return tuple(data.get("host_ca_keys", ()))

    def trust_host_cas(self, keys: tuple[str, ...], cluster: str) -> None:
        if self.cluster is None:
            self.select(cluster)
        self._ensure(self.dir)
        atomic_write(
            self.dir / "trusted.json",
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
        """The key and certificate go; the profile (address, user) stays, so a plain
        ``dtclient login`` logs in again, and so does the trusted host CA."""
        removed: list[Path] = []
        if self.cluster is None:
            return removed
        for path in (self.key_path, self.public_key_path, self.cert_path):
            if os.path.lexists(path):
                path.unlink()
                removed.append(path)
        return removed

    # -- device -------------------------------------------------------------------------------

    def save_device(self, state: DeviceState) -> None:
        self._ensure(self.dir)
        atomic_write(self.dir / "device.json", _dump(asdict(state)), 0o600)

    def load_device(self) -> DeviceState | None:
        if self.cluster is None:
            return None
        data = self._load_json(self.dir / "device.json")
        if data is None:
            return None
        try:
            return DeviceState(**data)
        except TypeError:
            return None

    def forget_device(self) -> None:
        if self.cluster is not None:
            (self.dir / "device.json").unlink(missing_ok=True)

    def _load_json(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, NotADirectoryError):
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
