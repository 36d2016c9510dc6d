"""SIGHUP: read the configuration again and apply what can change while serving.

The file is read with the same command-line overrides as at start (``--set``,
``--listen``, ... still win). A new configuration that does not load (bad TOML, an
unknown key, a weak algorithm) is refused as a whole, logged, and the running one is
kept. Otherwise each changed setting is either applied now (:data:`LIVE`) or logged
as needing a restart and kept at its running value (:data:`RESTART`), so the
configuration in memory always says what is in force.

Trust is read again on every reload, changed config or not: the user CA (after a
``dtadmin ca rotate`` whose files were put in place by hand) and the bastion's host key
and certificate, offered to new connections. EK trust roots need nothing: every
enrollment reads them from the cluster database.

Algorithm lists, limits and timeouts apply to connections accepted after the reload;
open connections keep what they negotiated.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bastion import accounts
from bastion.authz.limits import SlotLimits
from bastion.config import BastionConfig
from bastion.protocol.errors import DTError
from bastion.service import logs
from bastion.storage.urls import safe_url

if TYPE_CHECKING:
    from bastion.proxy.server import Bastion

log = logging.getLogger("bastion.service")

# Settings that take effect only at start: the listeners, where the state is, which
# balancers are believed. A change is logged and waits for a restart.
RESTART = frozenset(
    {
        "state_dir",
        "database",
        "listen_host",
        "listen_port",
        "proxy_protocol_from",
        "metrics_listen",
        "workers",
    }
)
# Settings handed to asyncssh for each new connection (its acceptor's options).
SSH_OPTIONS = frozenset(
    {
        "login_timeout",
        "keepalive_interval",
        "keepalive_count_max",
        "kex_algs",
        "encryption_algs",
        "mac_algs",
        "signature_algs",
        "host_names",
    }
)
_SLOTS = frozenset(
    {
        "max_connections",
        "max_connections_per_source",
        "max_unauthenticated",
        "max_unauthenticated_per_source",
    }
)
_LOCKOUT = frozenset({"lockout_max_failures", "lockout_window", "lockout_duration"})
LIVE = frozenset(f.name for f in dataclasses.fields(BastionConfig)) - RESTART - {"extra"}


def changes(old: BastionConfig, new: BastionConfig) -> dict[str, tuple[Any, Any]]:
    return {
        name: (getattr(old, name), getattr(new, name))
        for name in sorted(LIVE | RESTART)
        if getattr(old, name) != getattr(new, name)
    }


def shown(value: Any) -> str:
    """A setting's value in a log line: no reprs, no ``None``."""
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value) or "(none)"
    if isinstance(value, float):
        return f"{value:g}"
    if value == "":
        return "(off)"
    return str(value)


def described(changed: dict[str, tuple[Any, Any]]) -> str:
    def one(name: str, value: Any) -> str:  # a database URL: its host and name only
        return safe_url(value) if name == "database" and value else shown(value)

    return "; ".join(f"{name} {one(name, a)} -> {one(name, b)}" for name, (a, b) in changed.items())


class Reloader:
    """Applies a new configuration to one running bastion."""

    def __init__(
        self,
        bastion: Bastion,
        acceptor: Any,
        ssh_options: Callable[[Any], dict[str, Any]],
        tune_reads: Callable[[int], None],
    ) -> None:
        self.bastion = bastion
        self.acceptor = acceptor
        self.ssh_options = ssh_options  # (an object with .config) -> asyncssh options
        self.tune_reads = tune_reads

    async def apply(self, new: BastionConfig) -> tuple[dict[str, tuple[Any, Any]], dict]:
        """Apply ``new``; returns (applied, needing a restart). Raises DTError, having
        changed nothing, when the new configuration cannot be served (a host key type
        the new signature_algs forbid)."""
        b = self.bastion
        old = b.config
        changed = changes(old, new)
        later = {k: v for k, v in changed.items() if k in RESTART}
        now = {k: v for k, v in changed.items() if k not in RESTART}
        effective = dataclasses.replace(new, **{k: getattr(old, k) for k in later})
        if "host_names" in now:  # re-signed for the new names (the files, off the loop)
            await b.workers.call(b.cluster.ensure_bastion_host_cert, effective.names())
        # Built (and so checked) before anything changes: a refusal leaves all as it was.
        options = self.ssh_options(types.SimpleNamespace(config=effective))
        b.config = effective
        self._set_options(options)
        logs.apply(effective.log_level, effective.log_format)
        if now.keys() & _SLOTS:
            b.slots.limits = SlotLimits(
                max_connections=effective.max_connections,
                max_per_source=effective.max_connections_per_source,
                max_unauthenticated=effective.unauthenticated_cap(),
                max_unauthenticated_per_source=effective.max_unauthenticated_per_source,
            )
        if now.keys() & _LOCKOUT:
            b.lockout = accounts.LockoutPolicy(
                effective.lockout_max_failures,
                effective.lockout_window,
                effective.lockout_duration,
            )
        b.workers.timeout = effective.storage_timeout
        b.registry.poll_interval = effective.revision_poll_interval
        b.registry.sweep_interval = effective.session_sweep_interval
        b.registry.freshness.stale_after = effective.state_stale_after
        b.registry.freshness.grace = effective.state_stale_grace
        self.tune_reads(effective.socket_read_size)
        # Everything else (drain_timeout, per-connection limits, api_step_timeout,
        # node_connect_timeout, ...) is read from b.config where it is used.
        return now, later

    def _set_options(self, options: dict[str, Any]) -> None:
        if hasattr(self.acceptor, "update"):  # asyncssh's acceptor
            self.acceptor.update(**options)
        else:  # the PROXY protocol acceptor hands its dict to each connection
            self.acceptor.options = options

    async def refresh_trust(self) -> str:
        """The user CA and the host certificate, read again; what is now in force."""
        b = self.bastion
        b._ca_pending = True  # look at the files even if the database named no change
        try:
            await b.refresh_user_ca()
        except DTError as exc:
            log.error("reload: could not read the user CA again: %s", exc.message)
        return b.cluster.ca.user_ca_fingerprint
