"""The SSH front of the bastion: authentication, the dt-api channel, forwarding.

Who checks what:

* asyncssh: the SSH protocol (strict key exchange on), the certificate's signature,
  validity window and source-address, via a ``cert-authority,principals="-dt-jump"``
  line for our user CA, so the SSH user name a client presents does not matter.
* ``BastionServer._validate_public_key``: asyncssh does not expose certificate
  extensions, and its ``SSHServer`` callbacks never see the certificate
  (``validate_ca_key`` gets only the signing key, ``validate_public_key`` only plain
  keys). The one place the raw blob passes is the connection's own
  ``validate_public_key(username, key_data, msg, signature)``, called for the query and
  for the signed request alike. ``connection_made`` wraps that bound method: the
  wrapper parses ``key_data`` with cryptography (:func:`parse_cert`), applies
  :func:`policy.check_certificate` (our CA, valid now, exactly the certificate issued
  under that serial and not revoked, user exists and is unlocked), audits a refusal
  with its reason (a refusal of a mere query only once the connection ends without
  logging in), and only then lets asyncssh do its own checks and verify the signature.
  A certificate this cluster issued but refuses now is let through the query, its
  signature checked here, and only its proven holder told why in an auth banner
  (:mod:`bastion.authz.refusals`); keyboard-interactive is then no longer offered.
* :meth:`BastionServer.terminate`: the one way a live connection is cut (lock,
  revocation, rotation, removal, expiry, shutdown), with the reason in the SSH
  disconnect message and, first, on each dt-api channel.
* :mod:`bastion.authz.limits` and :mod:`bastion.proxy.admission`: the flood limits
  (pre-login slots, failed logins, channels, password checks, issuance rate).
* :mod:`bastion.proxy.connections`: the credential a connection authenticated with,
  decided again before every dt-api request and channel, whenever the state changes,
  and when its certificate expires; a connection that fails is closed.
* :mod:`bastion.proxy.policy`: every forwarding decision, made per channel
  (:mod:`bastion.proxy.forwarding`) and again whenever the state changes
  (:mod:`bastion.proxy.sessions`).

None of these callbacks touches the database on the event loop: every read and write
goes through :mod:`bastion.proxy.workers`.
* The node's host key: the client checks it end to end. The bastion also reads the
  node's clear-text side of the key exchange (until NEWKEYS) and refuses a session whose
  node presents a *user* certificate as its host key (:mod:`bastion.proxy.node_handshake`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, cast

import asyncssh
import asyncssh.public_key
from asyncssh.constants import MSG_DISCONNECT
from asyncssh.packet import Boolean, String

from bastion import accounts
from bastion.authz import decide, freshness, limits
from bastion.authz.limits import SlotLimits
from bastion.ca.authority import STALE_USER_CA, USER_CA_SETTING
from bastion.ca.certs import parse_cert
from bastion.ca.issuer import GroupCommitIssuer
from bastion.ca.keys import public_line
from bastion.cluster import Cluster
from bastion.config import BastionConfig
from bastion.protocol.certs import ParsedCert
from bastion.protocol.errors import AccessDenied, DTError, UsageError
from bastion.protocol.wire import REFUSAL_TAG, LineReader
from bastion.proxy import connections, policy, quickack
from bastion.proxy.admission import ConnectionSlots, RefusalDigest
from bastion.proxy.api import ApiIdentity, ApiSession
from bastion.proxy.connections import Connections, Credential, CredentialRevoked
from bastion.proxy.forwarding import open_forward
from bastion.proxy.refused import refuse_before_kex
from bastion.proxy.sessions import CUT_WAIT, LiveSession, Registry
from bastion.proxy.workers import Workers

log = logging.getLogger("bastion.server")
SIGNUP_USER = "-dt-signup"
BOT_USER = "-dt-bot"  # a bot's job presenting a bot token (dtclient login --bot-token)
SERVER_VERSION = "dt-bastion"  # the version line: SSH-2.0-dt-bastion
# Connections whose refused keys are audited in full, per address (and user the
# certificate claims) and minute; the rest are counted into one row (a flood of
# refused keys is not a flood of rows).
KEY_REFUSAL_ROWS = 10
USAGE = (
    "This is a dt-bastion jump host: it offers no shell.\r\n"
    "Reach a node with:  ssh -J {host} LOGIN@NODE   (see: dtclient ls)\r\n"
)


class Bastion:
    """Shared state of one running bastion: cluster, config, registry, counters."""

    def __init__(self, cluster: Cluster, config: BastionConfig) -> None:
        self.cluster = cluster
        self.store = cluster.store
        self.config = config
        self.cluster_name = cluster.name  # read once: it never changes
        self.workers = Workers(cluster.store, timeout=config.storage_timeout)
        self.registry = Registry(
            cluster.store,
            config.revision_poll_interval,
            config.session_sweep_interval,
            workers=self.workers,
            stale_after=config.state_stale_after,
            stale_grace=config.state_stale_grace,
        )
        self.authenticated = Connections(self.workers)
        # Logins arriving together share one commit; the disk waits off the loop.
        self.issuer = GroupCommitIssuer(cluster.ca)
        self.authorized_keys = self._trust_user_ca()
        self._ca_pending = False
        self._ca_named: object = None  # the user CA the database names, while pending
        # When the state moves: the CA first, then connections, then live sessions;
        # on every poll, certificates that just expired (and a rotation half seen).
        self.registry.on_revision.append(self.refresh_user_ca)
        self.registry.on_revision.append(self.authenticated.recheck)
        self.registry.on_poll.append(self.authenticated.check_expired)
        self.registry.on_poll.append(self._refresh_pending_user_ca)
        self.registry.on_blind.append(self._end_blind)
        self.signup = accounts.Signup(cluster.store, self.cluster_name)
        self.lockout = accounts.LockoutPolicy(
            config.lockout_max_failures, config.lockout_window, config.lockout_duration
        )
        # Flood limits (bastion.authz.limits decides; these count).
        self.slots = ConnectionSlots(
            SlotLimits(
                max_connections=config.max_connections,
                max_per_source=config.max_connections_per_source,
                max_unauthenticated=config.unauthenticated_cap(),
                max_unauthenticated_per_source=config.max_unauthenticated_per_source,
            )
        )
        self.digest = RefusalDigest(self.workers.audit_soon)
        self.registry.on_poll.append(self.digest.flush)
        self.password_checks = 0  # waiting for or in argon2 (max_pending_password_checks)
        self.auth_failures: dict[str, list[float]] = defaultdict(list)
        self.other_failures: dict[str, int] = {}  # the other bastions' (last minute)
        self.failure_id = secrets.token_hex(6)  # this process's rows in source_failures
        self._next_failure_prune = 0.0
        self.registry.on_poll.append(self._refresh_failures)
        self.open: set[asyncssh.SSHServerConnection] = set()
        # Told how each connection logged in ("certificate", "password", "signup"):
        # the service's metrics (bastion.service.metrics).
        self.on_login: list[Callable[[str], None]] = []
        self._refusals_audited: dict[tuple[str, str], float] = {}

    def _trust_user_ca(self) -> Any:
        line = public_line(self.cluster.ca.user_ca.public_key())
        return asyncssh.import_authorized_keys(f'cert-authority,principals="-dt-jump" {line}\n')

    async def refresh_user_ca(self) -> None:
        """After ``dtadmin ca rotate``: trust (and sign with) only the new user CA.

        Certificates of the old CA are already revoked in the database, so nothing is
        admitted meanwhile; if the rotation's files are not in place yet, look again at
        the next poll rather than waiting for the next change.
        """
        before = self.cluster.ca.user_ca_fingerprint
        # A cheap read first: the revision moves for every change, a rotation is rare,
        # and the ceremony lane (argon2) can be busy with other people's logins.
        named = await self.workers.read(lambda store: store.get_setting(USER_CA_SETTING, before))
        if named == before and not self._ca_pending:
            return
        was_pending, self._ca_named = self._ca_pending, named
        self._ca_pending = not await self.workers.call(self.cluster.refresh_user_ca)
        if self._ca_pending and not was_pending:
            log.error(
                "the cluster's user CA is now %s but this host's ca/user_ca is not that key: "
                "this bastion signs no certificate and admits none of the new CA until "
                "ca/user_ca and ca/user_ca.pub are copied here from the host where "
                "`dtadmin ca rotate` ran (it loads them by itself)",
                named,
            )
        if self.cluster.ca.user_ca_fingerprint != before:
            self.authorized_keys = self._trust_user_ca()
            log.warning("user CA rotated: now trusting %s", self.cluster.ca.user_ca_fingerprint)

    def unhealthy(self) -> str | None:
        """Why a load balancer should send this bastion no one (for /healthz): blind,
        or holding a user CA key that is not the one in force."""
        if self.registry.freshness.stale:
            return f"blind: {freshness.BLIND}"
        if self._ca_pending:
            return "ca: " + STALE_USER_CA.format(named=self._ca_named)
        return None

    async def _refresh_pending_user_ca(self, now: float) -> None:
        if self._ca_pending:
            await self.refresh_user_ca()

    def close(self) -> None:
        """After sessions and connections are over: answer what the issuer holds and
        write what the workers hold, then stop both (before the cluster closes)."""
        self.digest.flush(time.time(), everything=True)
        self.issuer.close()
        self.workers.close()

    def should_audit_refusal(self, addr: str, now: float, kind: str = "limit") -> bool:
        """One audit event per address per minute for each kind of pre-login refusal
        (limits, garbage, stalls): a flood of refused connections must not become a
        flood of audit rows (disk)."""
        last = self._refusals_audited.get((kind, addr))
        if last is not None and now - last < 60:
            return False
        if len(self._refusals_audited) > 10000:
            self._refusals_audited.clear()
        self._refusals_audited[(kind, addr)] = now
        return True

    async def disconnect_all(self, reason: str, timeout: float = 5.0) -> None:
        """At shutdown (before the registry stops): every connection is ended the way a
        lock ends one (:meth:`BastionServer.terminate`, each ``session.end`` saying
        why), so each client hears ``reason`` in a disconnect message rather than
        seeing its channels vanish."""
        conns = list(self.open)
        servers = [c.get_owner() for c in conns]
        await asyncio.gather(
            *(
                server.terminate(reason, audit_it=False)
                for server in servers
                if isinstance(server, BastionServer)
            )
        )
        if conns:
            await asyncio.wait(
                [asyncio.ensure_future(c.wait_closed()) for c in conns], timeout=timeout
            )

    async def _end_blind(self) -> None:
        """Blind past the grace (bastion.authz.freshness): every logged-in connection is
        ended the way a lock ends one, the client told why; the rows are queued until
        the database takes them."""
        servers = [c.get_owner() for c in list(self.open)]
        await asyncio.gather(
            *(
                server.terminate(freshness.BLIND_CUT)
                for server in servers
                if isinstance(server, BastionServer) and server.api_identity is not None
            )
        )

    # -- failed authentications per address, cluster-wide (storage.source_failures) ----
    # Decided on memory: this bastion's own failures (auth_failures, monotonic stamps)
    # plus the other bastions' of the last minute (other_failures), read from the
    # store on every turn of the watcher. Each failure is written off the loop.

    def recent_failures(self, addr: str, now: float) -> int:
        recent = [t for t in self.auth_failures.get(addr, ()) if t > now - 60]
        if recent:
            self.auth_failures[addr] = recent
        else:
            self.auth_failures.pop(addr, None)
        return len(recent) + self.other_failures.get(addr, 0)

    def too_many_failures(self, addr: str, now: float) -> bool:
        return self.recent_failures(addr, now) >= self.config.max_auth_failures_per_source

    def note_failure(self, addr: str) -> float:
        """Count a failed authentication against ``addr``; returns its stamp (see
        :meth:`forgive`)."""
        stamp = time.monotonic()
        self.auth_failures[addr].append(stamp)
        self.workers.write_soon(
            lambda store: store.record_source_failure(addr, time.time(), self.failure_id, stamp)
        )
        return stamp

    def forgive(self, addr: str, stamps: list[float]) -> None:
        """A connection that logged in after keys were refused at the query stage
        (ssh-agent offers plain keys first): those refusals no longer count."""
        failures = self.auth_failures.get(addr)
        for stamp in stamps:
            if failures and stamp in failures:
                failures.remove(stamp)
        if stamps:
            self.workers.write_soon(
                lambda store: store.forgive_source_failures(self.failure_id, stamps)
            )

    async def _refresh_failures(self, now: float) -> None:
        """The other bastions' failures of the last minute (and, now and then, old rows
        pruned). A database that does not answer leaves the last view in place."""
        try:
            self.other_failures = await self.workers.read(
                lambda store: store.count_source_failures(since=now - 60, exclude=self.failure_id)
            )
        except DTError:
            return
        if now >= self._next_failure_prune:
            self._next_failure_prune = now + 60
            self.workers.write_soon(lambda store: store.prune_source_failures(now - 120))


class BastionServer(asyncssh.SSHServer):
    """One per SSH connection."""

    # Set when the client sent SSH_MSG_DISCONNECT (see _hear_disconnect).
    _peer_disconnected = False

    def __init__(self, bastion: Bastion, client_addr: str | None = None) -> None:
        self.client_addr = client_addr  # from a trusted PROXY protocol header
        self.bastion = bastion
        self.store = bastion.store
        self.conn: asyncssh.SSHServerConnection | None = None
        self.remote_addr: str | None = None
        self.identity: policy.Identity | None = None
        self.api_identity: ApiIdentity | None = None
        self.registered: connections.Connection | None = None
        self.ending: str | None = None  # why this connection is being closed
        # Open dt-api session channels, each with its stderr (told why at a cut).
        self._api_channels: dict[Any, asyncssh.SSHWriter[bytes]] = {}
        # Why no password is asked for any more (a proven certificate was refused).
        self.no_password: str | None = None
        self._audited: set[str] = set()
        self._counted = False
        self._logged_in = False
        self._started = time.monotonic()
        # Keys refused at the query stage (failure stamp or None: a plain key, reason,
        # user): forgiven if this connection logs in, else audited at its end.
        self._refused_queries: list[tuple[float | None, str, str | None]] = []

    # -- connection lifecycle -----------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self._started = time.monotonic()
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.remote_addr = self.client_addr or str(peer[0])
        b = self.bastion
        if b.registry.freshness.stale:
            # Blind: nothing can be decided, so no key exchange is spent on it (a
            # flood of them while the database is away costs next to nothing). The
            # client is told why; audited once per blind period (state.stale, and
            # state.confirmed counts these), not once per connection.
            b.registry.freshness.refused += 1
            self._audited.add("blind")
            refuse_before_kex(
                conn, SERVER_VERSION, asyncssh.DISC_SERVICE_NOT_AVAILABLE, freshness.BLIND
            )
            return
        try:  # limits.admit_connection: failures, per address, pre-login slots
            victim = b.slots.admit(
                self,
                self.remote_addr,
                b.recent_failures(self.remote_addr, time.monotonic()),
                b.config.max_auth_failures_per_source,
            )
        except DTError as exc:  # told before any key exchange: see bastion.proxy.refused
            self._refuse(conn, exc.message, before_kex=True)
            return
        if isinstance(victim, BastionServer):
            victim.evict()
        b.open.add(conn)
        self._counted = True
        original = conn.validate_public_key
        conn.validate_public_key = functools.partial(self._validate_public_key, original)  # type: ignore[method-assign]
        # asyncssh dispatches channel opens by attribute name, so this instance's
        # handlers can be wrapped (see _direct_tcpip_open, _session_open).
        conn._process_direct_tcpip_open = functools.partial(  # type: ignore[method-assign]
            self._direct_tcpip_open,
            conn._process_direct_tcpip_open,
        )
        conn._process_session_open = functools.partial(  # type: ignore[method-assign]
            self._session_open,
            conn._process_session_open,
        )
        quickack.until_authenticated(conn)
        self._hear_disconnect(conn)

    def auth_completed(self) -> None:
        """Logged in: the slot is no longer a pre-login one, and keys refused at the
        query stage on the way (ssh-agent offers plain keys first) were no failure."""
        self._logged_in = True
        self.bastion.slots.logged_in(self)
        for listener in self.bastion.on_login:
            listener(self.api_identity.auth if self.api_identity else "unknown")
        stamps = [q[0] for q in self._refused_queries if q[0] is not None]
        self.bastion.forgive(self.remote_addr or "?", stamps)
        self._refused_queries.clear()

    def evict(self) -> None:
        """The bastion is full and a newcomer from an address holding fewer pre-login
        slots took this one (limits.admit_connection); login_timeout would have come."""
        addr = self.remote_addr or "?"
        self._audited.add("evicted")  # not also "closed before login"
        self.bastion.digest.note(
            "evicted",
            addr,
            time.time(),
            message="unfinished login closed: the bastion is full and gave its slot "
            "to a newcomer from an address holding fewer",
            summary=f"{{n}} more unfinished logins from {addr} closed to make room "
            "in the last minute",
            remote_addr=addr,
        )
        if self.conn is not None:
            self.conn.disconnect(
                asyncssh.DISC_TOO_MANY_CONNECTIONS,
                "the bastion is full and gave this unfinished login's slot to another; "
                "connect again and log in promptly",
            )

    def _hear_disconnect(self, conn: asyncssh.SSHServerConnection) -> None:
        """asyncssh turns a client's SSH_MSG_DISCONNECT into an error carrying the
        client's reason text, just like one of its own; note which it was, so that
        text is recorded as the client's words (quoted), never as the bastion's reason.
        (asyncssh dispatches packets through ``_packet_handlers``; this connection
        gets its own copy.)"""
        handlers = dict(conn._packet_handlers)
        process = handlers[MSG_DISCONNECT]

        def heard(owner: Any, pkttype: int, pktid: int, packet: Any) -> Any:
            self._peer_disconnected = True
            return process(owner, pkttype, pktid, packet)

        handlers[MSG_DISCONNECT] = heard
        conn._packet_handlers = handlers

    def _audit_unauthenticated_end(self, exc: Exception | None) -> None:
        """Garbage and stalled handshakes get an audit event (DESIGN.md, Security rules);
        a plain connect-and-close (a port probe, a client that gave up) does not."""
        stalled = time.monotonic() - self._started >= self.bastion.config.login_timeout
        said: asyncssh.DisconnectError | None = None
        if self._peer_disconnected and isinstance(exc, asyncssh.DisconnectError):
            said = exc
        hung_up = (
            exc is None
            or isinstance(exc, asyncssh.ConnectionLost | OSError)
            or (said is not None and said.code == asyncssh.DISC_BY_APPLICATION)
        )
        if hung_up and not stalled:
            return
        kind = "stalled" if stalled else "garbage"
        if said is not None:  # the client's own text, quoted (repr) as the client's
            reason = f"client disconnected before login: {said.reason!r} (code {said.code})"
        else:
            reason = f"connection closed before login: {exc}"
        if self.bastion.should_audit_refusal(self.remote_addr or "?", time.monotonic(), kind):
            self._audit_once("auth.failed", reason)

    def _refuse(
        self, conn: asyncssh.SSHServerConnection, reason: str, *, before_kex: bool = False
    ) -> None:
        if self.bastion.should_audit_refusal(self.remote_addr or "?", time.monotonic()):
            self._audit_once("auth.failed", reason)
        if before_kex:
            refuse_before_kex(conn, SERVER_VERSION, asyncssh.DISC_TOO_MANY_CONNECTIONS, reason)
        else:
            conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self.bastion.authenticated.discard(self.registered)
        if self._counted and not self._logged_in:
            self._summarise_refused_queries()
        if self._counted and self.api_identity is None and not self._audited:
            self._audit_unauthenticated_end(exc)
        if self._counted:
            b = self.bastion
            if self.conn is not None:
                b.open.discard(self.conn)
            b.slots.release(self)
            self._counted = False

    def _summarise_refused_queries(self) -> None:
        """Keys refused at the query stage, on record only now that the connection
        ended without logging in: the first refusal of the connection (for the first
        few such connections from one address, and user claimed, in a minute), the rest
        counted into one row when the minute is over (RefusalDigest)."""
        refused, self._refused_queries = self._refused_queries, []
        if not refused:
            return
        addr = self.remote_addr or "?"
        _, reason, user = refused[0]
        self._audited.add("refused keys")
        claimed = f" (user {user!r})" if user else ""
        self.bastion.digest.note(
            "keys",
            f"{addr}{claimed}",
            time.time(),
            burst=KEY_REFUSAL_ROWS,
            message=reason,
            summary=f"{{n}} more refused keys from {addr}{claimed} in the last minute",
            count=len(refused),
            user=user,
            remote_addr=addr,
        )

    def _audit_once(self, event: str, reason: str, user: str | None = None) -> None:
        """From synchronous callbacks: the row is written soon, off the loop."""
        if reason in self._audited:
            return
        self._audited.add(reason)
        self.bastion.workers.audit_soon(
            event, success=False, message=reason, user=user, remote_addr=self.remote_addr
        )

    async def _audit_refusal(self, event: str, reason: str, user: str | None = None) -> None:
        """A refusal, on record before the client hears it (unless the database is
        locked: then the row follows)."""
        if reason in self._audited:
            return
        self._audited.add(reason)
        await self.bastion.workers.audit(
            event, success=False, message=reason, user=user, remote_addr=self.remote_addr
        )

    async def audit_denied(
        self, event: str, reason: str, identity: policy.Identity | None, **fields: Any
    ) -> None:
        await self.bastion.workers.audit(
            event,
            success=False,
            message=reason,
            user=identity.user if identity else None,
            device=identity.asset_tag if identity else None,
            remote_addr=self.remote_addr,
            **fields,
        )

    # -- the credential, decided again ------------------------------------------------------

    async def _admit(self, credential: Credential) -> bool:
        """Register the connection, then decide once more: a change that committed
        while it authenticated (a lock during argon2) is seen here, and any later one
        by the watcher, which now knows the connection."""
        self.registered = self.bastion.authenticated.add(credential, self.terminate)
        try:
            await self.bastion.workers.read(connections.recheck, credential, time.time())
        except DTError as exc:
            self.bastion.authenticated.discard(self.registered)
            self.registered = None
            await self._audit_refusal("auth.failed", exc.message, credential.user)
            return False
        return True

    async def check_credential(self) -> None:
        """Before every dt-api request and session: the credential this connection
        authenticated with still stands (CredentialRevoked: the connection is closed),
        and a certificate has not expired (AccessDenied: nothing new opens)."""
        if self.ending is not None:
            raise CredentialRevoked(self.ending)
        registered = self.registered
        if registered is None:
            return  # a signup connection: its token is single use
        now = time.time()
        await self.bastion.workers.read(connections.recheck, registered.credential, now)
        if registered.credential.claims is not None:
            decide.check_not_expired(registered.credential.claims, now)

    async def terminate(
        self, reason: str, *, audit_it: bool = True, session_reason: str | None = None
    ) -> None:
        """Close this connection, not only its channels, and say why: the one way the
        bastion cuts a live connection (a lock, revocation, CA rotation, user removal,
        a password reset, an expired certificate, shutdown; a session cut alone, e.g.
        by an unenrollment, ends here too when it was all the connection had, see
        :meth:`close_forward`).

        Its forwarded sessions are ended on record (``session.terminated`` and
        ``connection.terminated``, unless ``audit_it`` is False: then only each
        ``session.end``; ``session_reason`` is what those rows say, by default
        "access denied to NODE: <reason>"), its dt-api channels get a stderr line and an
        ``exit-signal`` with the reason, and then the client gets an SSH disconnect
        message with it: ``ssh -J``/``-W`` and PuTTY print that ("Received disconnect
        from ...: dt-bastion closed this connection: <reason>"). The disconnect goes
        out before the forwarded channels close (:func:`disconnect`)."""
        if self.ending is not None:
            return
        self.ending = reason
        bastion = self.bastion
        bastion.authenticated.discard(self.registered)
        credential = self.registered.credential if self.registered else None
        claims = credential.claims if credential else None
        sessions = bastion.registry.sessions_of(self)
        cut = bastion.registry.cut(
            [(s, session_reason or f"access denied to {s.node.name}: {reason}") for s in sessions],
            audit_it=audit_it,
            close=False,  # the disconnect below closes them, right after its message
        )
        if audit_it:
            await asyncio.gather(  # both rows in one commit, then the channels close
                cut,
                bastion.workers.audit(
                    "connection.terminated",
                    wait=CUT_WAIT,
                    success=False,
                    message=reason,
                    user=credential.user if credential else None,
                    device=claims.asset_tag if claims else None,
                    remote_addr=self.remote_addr,
                    auth=credential.auth if credential else None,
                    serial=str(claims.serial) if claims else None,
                ),
            )
        else:
            await cut
        log.warning(
            "closing a connection of %s: %s", credential.user if credential else "?", reason
        )
        self._hang_up(reason)

    def _hang_up(self, reason: str) -> None:
        """Tell each session channel, then disconnect with the reason (no await in
        between: the client reads all of it in one go)."""
        for chan, stderr in list(self._api_channels.items()):
            with contextlib.suppress(OSError):  # already closing
                stderr.write(f"dt-bastion: {reason}\r\n".encode())
                _exit_signal(chan, f"dt-bastion: {reason}")
        self._api_channels.clear()
        if self.conn is not None:
            disconnect(self.conn, f"dt-bastion closed this connection: {reason}")

    def close_forward(self, chan: Any, live: LiveSession) -> None:
        """A forwarded session was cut (:meth:`Registry.cut`). A ``direct-tcpip``
        channel carries no reason of its own; if it was all this connection had open
        (``ssh -J``/``-W`` opens exactly one), the connection goes with it, so that the
        client gets the reason in a disconnect message. Otherwise only it closes."""
        reason = live.terminated_reason or "the session was closed"
        if (
            self.ending is None
            and self.conn is not None
            and not self._api_channels
            and not self.bastion.registry.sessions_of(self)
        ):
            self.ending = reason
            self.bastion.authenticated.discard(self.registered)
            log.warning("closing a connection whose only session was cut: %s", reason)
            self.bastion.workers.audit_soon(
                "connection.terminated",
                success=False,
                message=f"its only session was cut: {reason}",
                user=live.identity.user,
                device=live.identity.asset_tag,
                remote_addr=self.remote_addr,
                auth="certificate",
                serial=str(live.identity.serial),
            )
            self._hang_up(reason)
            return
        chan.close()

    # -- authentication ----------------------------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        assert self.conn is not None
        # RFC 4253 section 10: userauth only after the client asked for the ssh-userauth
        # service. asyncssh 2.24 does not check this itself (it tracks it, though).
        if getattr(self.conn, "_auth_in_progress", True) is False:
            raise asyncssh.ProtocolError("userauth request before the ssh-userauth service")
        # Terrapin (CVE-2023-48795): without strict key exchange an attacker on the path
        # can delete handshake messages unnoticed under chacha20-poly1305 or EtM MACs.
        # Every maintained client has it (OpenSSH 9.6, distro backports, asyncssh), so
        # a client without it is refused with the fix, before anything is trusted.
        if getattr(self.conn, "_strict_kex", True) is False:
            raise asyncssh.ProtocolError(
                "your SSH client does not support strict key exchange (Terrapin, "
                "CVE-2023-48795); upgrade it (OpenSSH 9.6 or later, or a patched build)"
            )
        if self.bastion.registry.freshness.stale:
            # Blind since this connection was let in (newcomers are refused at
            # connection_made). Audited once per blind period, as there.
            self.bastion.registry.freshness.refused += 1
            self._audited.add("blind")
            raise asyncssh.ServiceNotAvailable(freshness.BLIND)
        self.conn.set_authorized_keys(self.bastion.authorized_keys)
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        """Offered to every user name, known or not, until this connection proved a
        certificate the bastion refuses (see _refused_key): no password helps then."""
        return self.no_password is None

    async def _validate_public_key(
        self, original: Any, username: str, key_data: bytes, msg: bytes, signature: bytes
    ) -> bool:
        """See the certificate blob before asyncssh does (see module docstring).

        A refused certificate counts against the address at the query stage too (600
        queries with certificates of throw-away CAs once counted as nothing); past the
        limit the connection is closed. A plain key does not count: ssh-agent and
        OpenSSH offer them as a matter of course, and refusing one costs no more than
        any packet. A query's refusal is audited only if the connection ends without
        logging in, summarised (see _summarise_refused_queries).

        A certificate this cluster issued but refuses now (expired, revoked, of a
        rotated CA, its user locked or removed) is answered at the query stage like a
        good one, so that the client signs; once that signature proves its key, the
        holder is told why in an auth banner and keyboard-interactive is no longer
        offered (:mod:`bastion.authz.refusals`). Anyone else hears nothing.
        """
        addr = self.remote_addr or "?"
        if self.bastion.too_many_failures(addr, time.monotonic()):
            assert self.conn is not None
            self._refuse(self.conn, limits.TOO_MANY_FAILURES)
            return False
        cert = None
        try:
            cert = parse_cert(policy.openssh_line(key_data))
            ca_fingerprint, now = self.bastion.cluster.ca.user_ca_fingerprint, time.time()
            identity = await self.bastion.workers.read(
                lambda store: policy.check_certificate(cert, store, ca_fingerprint, now)
            )
            policy.check_source_address(cert, self.remote_addr)
        except DTError as exc:
            ours = cert if isinstance(exc, AccessDenied) else None  # not a busy database
            return await self._refused_key(ours, key_data, msg, signature, exc.message)
        if msg and (refused := _signature_refused(signature, self.bastion.config)):
            self.bastion.note_failure(self.remote_addr or "?")
            await self._audit_refusal("auth.failed", refused, identity.user)
            return False
        ok = await original(username, key_data, msg, signature)
        if ok and msg:
            if not await self._admit(Credential(identity.user, "certificate", claims=identity)):
                return False
            self.identity = identity
            self.api_identity = ApiIdentity(
                identity.user,
                "certificate",
                self.remote_addr,
                valid_before=cert.valid_before,
                serial=cert.serial,
            )
            await self._warn_about_device(identity)
        elif not ok and msg:  # a bad signature counts against the address like any failure
            self.bastion.note_failure(self.remote_addr or "?")
            await self._audit_refusal(
                "auth.failed", "certificate refused by the SSH layer", identity.user
            )
        return bool(ok)

    async def _refused_key(
        self,
        cert: ParsedCert | None,
        key_data: bytes,
        msg: bytes,
        signature: bytes,
        reason: str,
    ) -> bool:
        """A key or certificate the checks refused (``reason``, for the audit log);
        ``cert`` is the parsed certificate if its holder may be told why."""
        addr, user = self.remote_addr or "?", _user_of(key_data)
        told = None
        if cert is not None:
            now = time.time()
            try:
                told = await self.bastion.workers.read(
                    lambda store: policy.explain_certificate(store, cert, reason, now)
                )
            except DTError:
                told = None  # the database did not answer: say nothing, refuse
        if not msg:
            stamp = self.bastion.note_failure(addr) if _is_certificate(key_data) else None
            self._refused_queries.append((stamp, reason, user))
            # Ours: answered like a good one, so that the client proves the key.
            return told is not None
        # The signed request: counted once (its query, if any, already counted).
        query = next((q for q in self._refused_queries if q[1:] == (reason, user)), None)
        if query is not None:
            self._refused_queries.remove(query)
        if query is None or query[0] is None:
            self.bastion.note_failure(addr)
        proven = (
            told is not None
            and _signature_refused(signature, self.bastion.config) is None
            and self._proves_key(key_data, msg, signature)
        )
        await self._audit_refusal("auth.failed", reason, user)
        if proven and told is not None:
            self.no_password = told.message
            self._banner(f"certificate refused: {told.message}")
        return False

    def _proves_key(self, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        """The signature over this session (RFC 4252 section 7) is by the key inside
        the certificate: the caller holds its private key."""
        session_id = getattr(self.conn, "_session_id", None)
        if not isinstance(session_id, bytes):
            return False
        try:
            key = asyncssh.public_key.decode_ssh_certificate(key_data).key
            return bool(key.verify(String(session_id) + msg, signature))
        except ValueError:  # KeyImportError, PacketDecodeError: not a proof
            return False

    async def _warn_about_device(self, identity: policy.Identity) -> None:
        """Logged in, but no node will take this certificate for want of a trusted
        device: say so now (dt-api, to enroll, still works)."""
        try:
            warning = await self.bastion.workers.read(policy.device_warning, identity, time.time())
        except DTError:
            return  # the first channel decides and says why
        if warning:
            self._banner(warning)

    def _banner(self, text: str) -> None:
        """One auth banner line (stock OpenSSH prints it unless run with -q)."""
        if self.conn is None:
            return
        line = "".join(ch if ch.isprintable() else "?" for ch in text)[:400]
        try:
            self.conn.send_auth_banner(f"dt-bastion: {line}\r\n")
        except OSError:
            pass  # authentication already complete

    def get_kbdint_challenge(
        self, username: str, lang: str, submethods: str
    ) -> tuple[str, str, str, list[tuple[str, bool]]]:
        if username == SIGNUP_USER:
            return ("dt-bastion signup", "", "", [("Signup token: ", False)])
        if username == BOT_USER:
            return ("dt-bastion bot", "", "", [("Bot token: ", False)])
        return ("dt-bastion login", "", "", [("Password: ", False), ("One-time code: ", True)])

    async def validate_kbdint_response(
        self, username: str, responses: Sequence[str]
    ) -> bool | tuple[str, str, str, list[tuple[str, bool]]]:
        if not responses:
            return False  # the answer to a refusal's reason (above): nothing to check
        addr = self.remote_addr or "?"
        if self.bastion.too_many_failures(addr, time.monotonic()):
            await self._audit_refusal(
                "auth.failed", "too many failed logins from this address", username
            )
            return False
        workers, bound = self.bastion.workers, self.bastion.config.login_timeout
        try:
            if username == SIGNUP_USER and len(responses) == 1:
                token = responses[0].strip()
                user = await workers.call(accounts.signup_token_user, self.store, token)
                self.api_identity = ApiIdentity(user, "signup", addr, token)
                return True
            if username == BOT_USER and len(responses) == 1:
                return await self._bot_token_login(responses[0].strip(), addr)
            if len(responses) != 2:
                return False
            login = functools.partial(
                accounts.check_password_login,
                self.store,
                username,
                responses[0],
                responses[1],
                remote_addr=addr,
                policy=self.bastion.lockout,
            )
            user_record = await self._check_password(login, username, bound)
            if user_record is None:
                return False  # turned away, busy: no failure of the client's
        except DTError as exc:
            self.bastion.note_failure(addr)
            if username == SIGNUP_USER:
                await self._audit_refusal("auth.failed", f"signup: {exc.message}")
            if exc.disclose:  # proved (token, or password and code): say why, then refuse
                return ("dt-bastion refused the login", exc.message, REFUSAL_TAG + exc.code, [])
            return False  # a bot token's refusal is audited as token.use
        # The hash it was checked against: a reset or a new password ends this connection.
        password_hash = user_record.password_hash
        if not await self._admit(Credential(user_record.name, "password", None, password_hash)):
            return False
        self.api_identity = ApiIdentity(
            user_record.name, "password", addr, password_hash=password_hash
        )
        return True

    async def _bot_token_login(self, secret: str, addr: str) -> bool:
        """A bot's job with its bot token: the connection may ask for certificates for
        that bot only, while the token stands (decided again before every request)."""
        workers = self.bastion.workers
        bot, token_hash = await workers.call(
            functools.partial(accounts.bot_token_user, self.store, secret, remote_addr=addr)
        )
        if not await self._admit(Credential(bot, "bot-token", token_hash=token_hash)):
            return False
        self.api_identity = ApiIdentity(bot, "bot-token", addr, token_hash=token_hash)
        return True

    async def _check_password(self, login: Any, username: str, bound: float) -> Any:
        """argon2 on the workers' call lane, at most max_pending_password_checks at
        once (limits.check_password_queue): beyond that the attempt is turned away now,
        the client told why, rather than queued behind the others; None then.
        Certificate logins never wait here (they use the read lane)."""
        b = self.bastion
        try:
            limits.check_password_queue(b.password_checks, b.config.max_pending_password_checks)
        except DTError as exc:
            addr = self.remote_addr or "?"
            self._audited.add("busy")
            b.digest.note(
                "busy",
                addr,
                time.time(),
                message=f"password login turned away: {exc.message}",
                summary=f"{{n}} more password logins from {addr} turned away (busy) "
                "in the last minute",
                user=username,
                remote_addr=addr,
            )
            if self.conn is not None:
                self.conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, exc.message)
            return None
        b.password_checks += 1
        try:
            return await b.workers.call(login, timeout=bound)
        finally:
            b.password_checks -= 1

    # -- channels ------------------------------------------------------------------------------------

    def session_requested(self) -> Any:
        return self._session

    async def _session(
        self, stdin: asyncssh.SSHReader, stdout: asyncssh.SSHWriter, stderr: asyncssh.SSHWriter
    ) -> None:
        # A session channel of this server: asyncssh types SSHWriter.channel as the base.
        chan = cast(asyncssh.SSHServerChannel[bytes], stdout.channel)
        subsystem = chan.get_subsystem()
        identity = self.api_identity
        if subsystem == "dt-api" and identity is not None:
            if self.identity is not None and self.identity.force_command is not None:
                stderr.write(b"dt-api: certificates with force-command cannot use dt-api\r\n")
                chan.exit(1)
                return
            if not await self._may_open_api(stderr):
                chan.exit(1)
                return
            session = ApiSession(
                self.bastion.cluster,
                identity,
                workers=self.bastion.workers,
                cluster_name=self.bastion.cluster_name,
                step_timeout=self.bastion.config.api_step_timeout,
                signup=self.bastion.signup,
                issuer=self.bastion.issuer,
                recheck=self.check_credential,
                terminate=self.terminate,
                max_certs_per_minute=self.bastion.config.max_certs_per_user_per_minute,
                digest=self.bastion.digest,
            )
            self._api_channels[chan] = stderr
            try:
                await session.run(LineReader(stdin), stdout)
            finally:
                if self._api_channels.pop(chan, None) is not None:
                    with contextlib.suppress(OSError):  # the connection went away
                        chan.exit(0)
            return
        command = chan.get_command()
        # repr(): client-chosen text must not be able to forge lines in logs
        what = (
            f"subsystem {subsystem!r}"
            if subsystem
            else (f"command {command!r}" if command else "a shell")
        )
        self._audit_once(
            "session.denied",
            f"{what} refused: the bastion offers no shell",
            identity.user if identity else None,
        )
        host = self.bastion.config.names()[0]
        stderr.write(USAGE.format(host=host).encode())
        chan.exit(1)

    async def _may_open_api(self, stderr: asyncssh.SSHWriter) -> bool:
        """A new dt-api session, like any channel, only on a credential that stands."""
        try:
            await self.check_credential()
        except DTError as exc:
            await self.audit_denied("session.denied", f"dt-api: {exc.message}", self.identity)
            stderr.write(f"dt-api: {exc.message}\r\n".encode())
            if isinstance(exc, CredentialRevoked):
                await self.terminate(exc.message)
            return False
        return True

    def _direct_tcpip_open(self, original: Any, packet: Any) -> Any:
        """asyncssh refuses ``direct-tcpip`` for a certificate without
        ``permit-port-forwarding`` before connection_requested runs; look first, so
        that refusal is audited like every other (checklist #9)."""
        self._check_channel_room("direct-tcpip")
        conn, identity = self.conn, self.identity
        if (
            conn is not None
            and identity is not None
            and not (
                conn.check_key_permission("port-forwarding")
                and conn.check_certificate_permission("port-forwarding")
            )
        ):
            self.bastion.workers.audit_soon(
                "session.denied",
                success=False,
                message="the certificate does not permit port forwarding",
                user=identity.user,
                device=identity.asset_tag,
                remote_addr=self.remote_addr,
            )
        return original(packet)

    def _session_open(self, original: Any, packet: Any) -> Any:
        self._check_channel_room("session")
        return original(packet)

    def _check_channel_room(self, kind: str) -> None:
        """At most max_channels_per_connection channels at once (one connection opened
        2,000 dt-api channels): beyond it the open fails with the reason, and the
        refusals are audited one row per user and minute (RefusalDigest)."""
        cap = self.bastion.config.max_channels_per_connection
        try:  # asyncssh holds a channel here from its open until both sides closed it
            limits.check_channel_open(len(getattr(self.conn, "_channels", ())), cap)
        except DTError as exc:
            user = self.api_identity.user if self.api_identity else None
            self.bastion.digest.note(
                "channels",
                user or self.remote_addr or "?",
                time.time(),
                event="session.denied",
                message=f"{kind} channel refused: {exc.message}",
                summary=f"{{n}} more channels of {user} refused (limit {cap}) in the last minute",
                user=user,
                device=self.identity.asset_tag if self.identity else None,
                remote_addr=self.remote_addr,
            )
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, exc.message) from None

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Any:
        """Every decision is made in :func:`forwarding.open_forward`, off the loop,
        before the channel is confirmed."""
        assert self.conn is not None
        chan = self.conn.create_tcp_channel()
        return chan, open_forward(self, chan, self.identity, dest_host, dest_port)


def disconnect(conn: asyncssh.SSHServerConnection, reason: str) -> None:
    """SSH_MSG_DISCONNECT with the reason, then close; its channels close with it.

    asyncssh's own ``disconnect()`` first sends each channel's CHANNEL_CLOSE. An
    OpenSSH ``ssh -W`` (what ``-J`` runs) exits the moment its one channel is freed, so
    unless both packets happened to arrive in one read it never printed the reason.
    The disconnect message goes first here."""
    if conn.is_closed():
        return
    send = getattr(conn, "_send_disconnect", None)
    force_close = getattr(conn, "_force_close", None)
    if send is None or force_close is None:  # pragma: no cover (another asyncssh)
        conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason)
        return
    send(asyncssh.DISC_BY_APPLICATION, reason, asyncssh.DEFAULT_LANG)
    force_close(None)


def _exit_signal(chan: Any, msg: str) -> None:
    """An ``exit-signal`` (TERM) with the reason, leaving the channel open for the
    disconnect that follows: asyncssh's ``exit_with_signal`` also closes it, and a
    client reading the channel would then see an EOF before the reason."""
    send = getattr(chan, "_send_request", None)
    if send is None:  # pragma: no cover
        return
    send(b"exit-signal", String("TERM"), Boolean(False), String(msg), String(""))


def _is_certificate(key_data: bytes) -> bool:
    """The key's algorithm name (its first SSH string) names a certificate."""
    length = int.from_bytes(key_data[:4], "big")
    return key_data[4 : 4 + length].endswith(b"-cert-v01@openssh.com")


def _user_of(key_data: bytes) -> str | None:
    try:
        return parse_cert(policy.openssh_line(key_data)).user
    except DTError:
        return None


def _signature_refused(signature: bytes, config: BastionConfig) -> str | None:
    """asyncssh verifies a user's signature under any algorithm the key allows (ssh-rsa,
    SHA-1, for an RSA key); ``signature_algs`` only shapes what it advertises. So the
    signature's own algorithm name is checked here."""
    length = int.from_bytes(signature[:4], "big")
    alg = signature[4 : 4 + length].decode("ascii", "replace")
    if len(signature) >= 4 and alg in config.signature_algs:
        return None
    allowed = ", ".join(config.signature_algs)
    return f"signature algorithm {alg!r} is not accepted (allowed: {allowed})"


def _host_keys(host_key_path: str, host_cert_path: str, config: BastionConfig) -> list[Any]:
    """The host key and its certificate, offered only under ``signature_algs`` (an RSA
    host key would otherwise also be offered as ssh-rsa, SHA-1)."""
    allowed = set(config.signature_algs)
    keypairs = asyncssh.load_keypairs([(host_key_path, host_cert_path)])
    for keypair in keypairs:
        keypair.host_key_algorithms = [
            alg
            for alg in keypair.host_key_algorithms
            if alg.decode("ascii").removesuffix("-cert-v01@openssh.com") in allowed
        ]
    offered = [keypair for keypair in keypairs if keypair.host_key_algorithms]
    if not offered:
        raise UsageError(
            f"the bastion's host key {host_key_path} is of a type signature_algs does not "
            f"allow ({', '.join(config.signature_algs)})"
        )
    return offered


def _options(bastion: Bastion, host_key_path: str, host_cert_path: str) -> dict[str, Any]:
    config = bastion.config
    return {
        "server_host_keys": _host_keys(host_key_path, host_cert_path, config),
        # Named in config (BastionConfig.kex_algs, ...): asyncssh's defaults include SHA-1.
        "kex_algs": list(config.kex_algs),
        "encryption_algs": list(config.encryption_algs),
        "mac_algs": list(config.mac_algs),
        "signature_algs": list(config.signature_algs),
        "login_timeout": config.login_timeout,
        "keepalive_interval": config.keepalive_interval,
        "keepalive_count_max": config.keepalive_count_max,
        "agent_forwarding": False,
        "x11_forwarding": False,
        "allow_scp": False,
        "allow_pty": True,
        "line_editor": False,
        "encoding": None,
        "server_version": SERVER_VERSION,
        "config": None,
    }


async def start_server(bastion: Bastion, host_key_path: str, host_cert_path: str) -> Any:
    """Listen; returns an acceptor with ``.sockets``, ``.close()`` and ``.wait_closed()``."""
    config = bastion.config
    options = _options(bastion, host_key_path, host_cert_path)
    if config.proxy_protocol_from:
        from bastion.proxy.proxied import ProxyProtocolAcceptor

        return await ProxyProtocolAcceptor.start(bastion, options)
    return await asyncssh.create_server(
        lambda: BastionServer(bastion),
        config.listen_host,
        config.listen_port,
        reuse_address=True,
        **options,
    )
