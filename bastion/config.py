"""The bastion's configuration: one frozen dataclass, loaded once, passed explicitly.

Sources, later ones winning: defaults, a TOML file (``--config``), ``--set KEY=VALUE``
on the command line, then the dedicated options (``--state``, ``--listen``, ...). An unknown key or a value of the wrong type is refused with a message that
names it; nothing falls back silently.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.protocol.errors import UsageError


@dataclass(frozen=True, slots=True)
class BastionConfig:
    state_dir: Path = Path("/var/lib/dt-bastion")
    # The cluster database when it is not SQLite in state_dir: a postgresql:// URL
    # (libpq's; never with a password in it: use a passfile). $DT_DATABASE and
    # `serve --database` win over it. The keys stay in state_dir.
    database: str = ""
    listen_host: str = "0.0.0.0"
    listen_port: int = 3022
    # Names clients use to reach the bastion: they go into its host certificate.
    host_names: tuple[str, ...] = ()
    # Connections not authenticated within this long are dropped.
    login_timeout: float = 30.0
    keepalive_interval: float = 30.0
    keepalive_count_max: int = 3
    max_connections: int = 20000
    max_connections_per_source: int = 200
    # Failed authentications one address may make per minute before it is cut off.
    max_auth_failures_per_source: int = 30
    # How often live sessions are re-checked against the state (revision watch).
    revision_poll_interval: float = 0.2
    # How often a bastion looks for sessions left open by a sibling on the same state
    # directory that was killed (it always looks once at start).
    session_sweep_interval: float = 10.0
    # Fail closed when blind: once the cluster database has not confirmed the state
    # is current (the revision watch's read) for state_stale_after seconds, new
    # sessions and logins are refused ("cannot reach the cluster database"); after
    # state_stale_grace seconds more, live sessions are ended too, each told why. A
    # lock or revocation committed meanwhile could not reach this bastion. It
    # recovers by itself at the first read that answers (audit: state.stale,
    # state.confirmed).
    state_stale_after: float = 10.0
    state_stale_grace: float = 30.0
    node_connect_timeout: float = 10.0
    # Bytes read from one socket per event-loop turn. The bastion is one asyncio
    # process: a 256 KiB read (asyncio's default) of a bulk transfer is ~8 SSH packets
    # decrypted back to back while every keystroke waits; 32 KiB (one OpenSSH packet)
    # cut the echo's median beside a bulk transfer from ~2 ms to ~0.7 ms for ~4% of
    # throughput (bench: interactive, throughput). Ignored under uvloop.
    socket_read_size: int = 32768
    api_step_timeout: float = 30.0
    # How long a request waits for the cluster database (a write lock another process
    # holds, a slow or unreachable disk) before it is refused with a clear message.
    # The event loop never waits for it: other connections go on meanwhile.
    storage_timeout: float = 5.0
    lockout_max_failures: int = 5
    lockout_window: float = 600.0
    lockout_duration: float = 1800.0
    # Load balancers whose PROXY protocol headers are believed (CIDRs).
    proxy_protocol_from: tuple[str, ...] = ()
    # The SSH algorithms offered, in order of preference (see ALGORITHMS below for
    # what each may name). The defaults: no SHA-1, no small or NIST-curve key
    # exchange, no CBC, no encrypt-and-MAC; post-quantum hybrids first, and
    # curve25519-sha256 for OpenSSH before 9.9 (Debian 12's 9.2 has no ML-KEM).
    kex_algs: tuple[str, ...] = field(default_factory=lambda: default_algs("kex_algs"))
    encryption_algs: tuple[str, ...] = field(
        default_factory=lambda: default_algs("encryption_algs")
    )
    mac_algs: tuple[str, ...] = field(default_factory=lambda: default_algs("mac_algs"))
    # User signatures accepted and host key algorithms offered (with their
    # certificate variants): never ssh-rsa (SHA-1) or ssh-dss.
    signature_algs: tuple[str, ...] = field(default_factory=lambda: default_algs("signature_algs"))
    # -- flood limits (docs/getting-started.md, "Limits"; decided in bastion.authz.limits)
    # Connections still logging in, in all (0: a quarter of max_connections) and per
    # address: silent sockets must not take the slots logged-in users need. When all
    # are taken, a newcomer takes the oldest pre-login slot of the address holding
    # the most; login_timeout drops the silent ones.
    max_unauthenticated: int = 0
    max_unauthenticated_per_source: int = 128  # 100 parallel `ssh -J` from one host pass
    # dt-api sessions and forwarded connections open at once on one SSH connection
    # (one connection opened 2,000 dt-api channels).
    max_channels_per_connection: int = 16
    # Certificates the CA signs for one user in any 60 s, counted in the cluster's
    # records (pipelined requests got 1,000 certificates in a second). 0: no limit.
    max_certs_per_user_per_minute: int = 20
    # Password checks (argon2) waiting or running at once; beyond it a password login
    # is turned away at once with "busy" rather than queued (60 queued attempts
    # delayed a real login from 0.06 s to 3.6 s). Certificate logins never wait on it.
    max_pending_password_checks: int = 8
    # -- running as a service (docs/getting-started.md, "Running as a service")
    # On SIGTERM: stop accepting, let live sessions run for up to this long, then cut
    # them (each told why); a second SIGTERM cuts at once.
    drain_timeout: float = 30.0
    # HOST:PORT (or PORT: on 127.0.0.1) of the plain-HTTP /metrics and /healthz
    # listener, never the SSH port. Empty: no such listener.
    metrics_listen: str = ""
    # Processes serving the one SSH port (``--workers``), each a whole bastion
    # coordinated through the state (bastion/service/supervisor.py); 0: one per core.
    # With N > 1 worker i serves metrics on metrics_listen's port + i.
    workers: int = 0
    log_level: str = "info"  # one of LOG_LEVELS
    log_format: str = "text"  # "text" (one line per record) or "json" (one object per line)
    extra: dict[str, Any] = field(default_factory=dict)

    def unauthenticated_cap(self) -> int:
        return self.max_unauthenticated or max(1, self.max_connections // 4)

    def names(self) -> tuple[str, ...]:
        if self.host_names:
            return self.host_names
        names = [socket.gethostname(), "localhost", "127.0.0.1", "::1"]
        if self.listen_host not in ("0.0.0.0", "::", ""):
            names.append(self.listen_host)
        return tuple(dict.fromkeys(names))


_FIELDS = {f.name: f for f in dataclasses.fields(BastionConfig) if f.name != "extra"}


def _default(name: str) -> Any:
    f = _FIELDS[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _coerce(name: str, value: Any) -> Any:
    default = _default(name)
    if isinstance(default, Path):
        if not isinstance(value, str | Path):
            raise UsageError(f"config: {name} must be a path")
        return Path(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(f"config: {name} must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"config: {name} must be a non-negative integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise UsageError(f"config: {name} must be a positive number")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"config: {name} must be a list of strings")
        return tuple(value)
    if not isinstance(value, str):
        raise UsageError(f"config: {name} must be a string")
    return value


def load_config(
    path: Path | None = None, *, defaults: dict[str, Any] | None = None, **overrides: Any
) -> BastionConfig:
    """``defaults`` (e.g. the state dir from $DT_STATE) lose to the file and overrides."""
    values: dict[str, Any] = {
        name: _coerce(name, value) for name, value in (defaults or {}).items() if value is not None
    }
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config {path} is not valid TOML: {exc}") from None
        section = data.get("bastion", data)
        for key, value in section.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise UsageError(f"config {path}: unknown setting {key!r}")
            values[name] = _coerce(name, value)
    for name, value in overrides.items():
        if value is not None:
            values[name] = _coerce(name, value)
    for cidr in values.get("proxy_protocol_from", ()):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise UsageError(f"config: proxy_protocol_from has a bad network {cidr!r}") from None
    for name in ALGORITHMS:
        if name in values:
            check_algs(name, values[name])
    for name in _AT_LEAST_ONE:  # 0 would refuse everyone, not lift the limit
        if values.get(name, 1) < 1:
            raise UsageError(f"config: {name} must be at least 1")
    if values.get("workers", 0) < 0:
        raise UsageError("config: workers must be 0 (one per core) or more")
    _check_service_settings(values)
    return BastionConfig(**values)


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
METRICS_HOST = "127.0.0.1"  # the metrics listener's host when only a port is named


def _check_service_settings(values: dict[str, Any]) -> None:
    for name, allowed in (("log_level", LOG_LEVELS), ("log_format", LOG_FORMATS)):
        if name in values:
            values[name] = values[name].lower()
            if values[name] not in allowed:
                raise UsageError(
                    f"config: {name} {values[name]!r} is not one of: {', '.join(allowed)}"
                )
    if values.get("metrics_listen"):
        host, port = metrics_address(values["metrics_listen"])
        ssh_host = values.get("listen_host", _default("listen_host"))
        if (
            port
            and port == values.get("listen_port", _default("listen_port"))
            and (host == ssh_host or ssh_host in ("0.0.0.0", "::", ""))
        ):
            raise UsageError(
                f"config: metrics_listen {host}:{port} is the SSH port; "
                "/metrics and /healthz need a port of their own"
            )


def metrics_address(value: str) -> tuple[str, int]:
    """``metrics_listen`` as (host, port): a port alone means loopback."""
    host, port = parse_listen(value, what="metrics_listen", default_port=None)
    return host or METRICS_HOST, port


_AT_LEAST_ONE = (
    "max_unauthenticated_per_source",
    "max_channels_per_connection",
    "max_pending_password_checks",
)


# -- SSH algorithms --------------------------------------------------------------------------

# What each algorithm setting may name: the defaults first (in their order), then
# what an operator may add for an older client. Nothing here is broken; the additions
# each draw an ssh-audit warning or failure (not post-quantum, NIST curves,
# encrypt-and-MAC), which is why they are not offered unless asked for. Names the
# installed asyncssh lacks (sntrup761 needs liboqs) are left out of the defaults.
ALGORITHMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "kex_algs": (
        (
            "mlkem768x25519-sha256",
            "sntrup761x25519-sha512",
            "sntrup761x25519-sha512@openssh.com",
            "curve25519-sha256",
        ),
        (
            "curve25519-sha256@libssh.org",
            "curve448-sha512",
            "mlkem768nistp256-sha256",
            "mlkem1024nistp384-sha384",
            "ecdh-sha2-nistp256",
            "ecdh-sha2-nistp384",
            "ecdh-sha2-nistp521",
            "diffie-hellman-group16-sha512",
            "diffie-hellman-group18-sha512",
        ),
    ),
    "encryption_algs": (
        (
            "chacha20-poly1305@openssh.com",
            "aes256-gcm@openssh.com",
            "aes128-gcm@openssh.com",
            "aes256-ctr",
            "aes192-ctr",
            "aes128-ctr",
        ),
        (),
    ),
    "mac_algs": (
        ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com"),
        ("umac-128-etm@openssh.com", "hmac-sha2-256", "hmac-sha2-512"),
    ),
    "signature_algs": (
        (
            "ssh-ed25519",
            "ecdsa-sha2-nistp256",
            "ecdsa-sha2-nistp384",
            "ecdsa-sha2-nistp521",
            "rsa-sha2-512",
            "rsa-sha2-256",
        ),
        ("ssh-ed448", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com"),
    ),
}


def supported_algs(name: str) -> frozenset[str]:
    """What the installed asyncssh can do for one algorithm setting."""
    from asyncssh import encryption, kex, mac, public_key

    listed = {
        "kex_algs": kex.get_kex_algs,
        "encryption_algs": encryption.get_encryption_algs,
        "mac_algs": mac.get_mac_algs,
        "signature_algs": public_key.get_public_key_algs,
    }[name]()
    return frozenset(alg.decode("ascii") for alg in listed)


def allowed_algs(name: str) -> tuple[str, ...]:
    defaults, additions = ALGORITHMS[name]
    have = supported_algs(name)
    return tuple(alg for alg in (*defaults, *additions) if alg in have)


def default_algs(name: str) -> tuple[str, ...]:
    have = supported_algs(name)
    return tuple(alg for alg in ALGORITHMS[name][0] if alg in have)


def check_algs(name: str, algs: tuple[str, ...]) -> None:
    """Refuse an empty list or a name that is unknown, weak or not in this asyncssh."""
    allowed = allowed_algs(name)
    if not algs:
        raise UsageError(f"config: {name} is empty; name at least one of: {', '.join(allowed)}")
    for alg in algs:
        if alg not in allowed:
            raise UsageError(f"config: {name} cannot offer {alg!r}; allowed: {', '.join(allowed)}")


def parse_setting(item: str) -> tuple[str, Any]:
    """One ``--set KEY=VALUE`` from the command line, checked like a TOML line.

    VALUE is read as a TOML value (``5``, ``0.5``, ``true``, ``["a", "b"]``), else as a
    plain string; :func:`load_config` then checks its type like any other source.
    """
    key, sep, raw = item.partition("=")
    name = key.strip().replace("-", "_")
    if not sep or name not in _FIELDS:
        known = ", ".join(sorted(_FIELDS))
        raise UsageError(f"--set {item!r}: expected KEY=VALUE, KEY one of: {known}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return name, value


def parse_listen(
    value: str, *, what: str = "--listen", default_port: int | None = 3022
) -> tuple[str | None, int]:
    """``HOST:PORT``, ``[V6ADDR]:PORT``, ``HOST``, ``V6ADDR`` or ``PORT`` alone.

    The host is None when only a port is given (``--listen 56069``: that port on the
    configured host, not the IPv4 address 0.0.0.219).
    """
    text = value.strip()
    host: str | None
    if text.isdigit():
        host, port = None, text
    elif text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"invalid {what} {value!r}: expected HOST:PORT or [ADDRESS]:PORT")
        host, port = inside, rest[1:]
    elif text.count(":") > 1:  # a bare IPv6 address: no port in it
        host, port = text, ""
    else:
        host, _, port = text.partition(":")
    if not port:
        if default_port is None:
            raise UsageError(f"invalid {what} {value!r}: expected HOST:PORT or PORT")
        port = str(default_port)
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"invalid {what} {value!r}: expected HOST:PORT or PORT (0-65535)")
    return host or None, int(port)
