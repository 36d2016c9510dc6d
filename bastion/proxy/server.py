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
  :func:`policy.check_certificate` (our CA, valid now, serial issued here and not
  revoked, user exists and is unlocked), audits a refusal with its reason, and only
  then lets asyncssh do its own checks and verify the signature.
* :mod:`bastion.proxy.policy`: every forwarding decision, made per channel and again
  whenever the state changes (:mod:`bastion.proxy.sessions`).
* The node's host key: the client checks it end to end. The bastion also reads the
  node's clear-text side of the key exchange (until NEWKEYS) and refuses a session whose
  node presents a *user* certificate as its host key (:mod:`bastion.proxy.node_handshake`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections import defaultdict
from typing import Any

import asyncssh

from bastion import accounts, audit
from bastion.ca.certs import parse_cert
from bastion.ca.issuer import GroupCommitIssuer
from bastion.ca.keys import public_line
from bastion.cluster import Cluster
from bastion.config import BastionConfig
from bastion.protocol.errors import AccessDenied, DTError
from bastion.protocol.wire import LineReader
from bastion.proxy import node_handshake, policy
from bastion.proxy.api import ApiIdentity, ApiSession
from bastion.proxy.sessions import CountingForwarder, LiveSession, Registry, audit_fields

log = logging.getLogger("bastion.server")
SIGNUP_USER = "-dt-signup"
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
        self.registry = Registry(
            cluster.store, config.revision_poll_interval, config.session_sweep_interval
        )
        # Logins arriving together share one commit; the disk waits off the loop.
        self.issuer = GroupCommitIssuer(cluster.ca)
        self.authorized_keys = self._trust_user_ca()
        self._ca_retry: asyncio.TimerHandle | None = None
        self.registry.on_revision.append(self.refresh_user_ca)
        self.signup = accounts.Signup(cluster.store, cluster.name)
        self.lockout = accounts.LockoutPolicy(
            config.lockout_max_failures, config.lockout_window, config.lockout_duration
        )
        self.connections = 0
        self.per_source: dict[str, int] = defaultdict(int)
        self.auth_failures: dict[str, list[float]] = defaultdict(list)
        self.open: set[asyncssh.SSHServerConnection] = set()
        self._refusals_audited: dict[tuple[str, str], float] = {}

    def _trust_user_ca(self) -> Any:
        line = public_line(self.cluster.ca.user_ca.public_key())
        return asyncssh.import_authorized_keys(f'cert-authority,principals="-dt-jump" {line}\n')

    def refresh_user_ca(self) -> None:
        """After ``dtadmin ca rotate``: trust (and sign with) only the new user CA.

        Certificates of the old CA are already revoked in the database, so nothing is
        admitted meanwhile; if the rotation's files are not in place yet, look again
        shortly rather than waiting for the next change.
        """
        if self._ca_retry is not None:
            self._ca_retry.cancel()  # one retry chain, however many changes arrive
            self._ca_retry = None
        before = self.cluster.ca.user_ca_fingerprint
        if not self.cluster.refresh_user_ca():
            self._ca_retry = asyncio.get_running_loop().call_later(0.1, self.refresh_user_ca)
            return
        if self.cluster.ca.user_ca_fingerprint != before:
            self.authorized_keys = self._trust_user_ca()
            log.warning("user CA rotated: now trusting %s", self.cluster.ca.user_ca_fingerprint)

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
        """At shutdown, after the registry has ended the forwarded sessions: tell every
        remaining client why it is being dropped rather than just vanishing."""
        conns = list(self.open)
        for conn in conns:
            conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason)
        if conns:
            await asyncio.wait(
                [asyncio.ensure_future(c.wait_closed()) for c in conns], timeout=timeout
            )

    def too_many_failures(self, addr: str, now: float) -> bool:
        recent = [t for t in self.auth_failures.get(addr, ()) if t > now - 60]
        if recent:
            self.auth_failures[addr] = recent
        else:
            self.auth_failures.pop(addr, None)
        return len(recent) >= self.config.max_auth_failures_per_source

    def note_failure(self, addr: str) -> None:
        self.auth_failures[addr].append(time.monotonic())


class BastionServer(asyncssh.SSHServer):
    """One per SSH connection."""

    def __init__(self, bastion: Bastion, client_addr: str | None = None) -> None:
        self.client_addr = client_addr  # from a trusted PROXY protocol header
        self.bastion = bastion
        self.store = bastion.store
        self.conn: asyncssh.SSHServerConnection | None = None
        self.remote_addr: str | None = None
        self.identity: policy.Identity | None = None
        self.api_identity: ApiIdentity | None = None
        self._audited: set[str] = set()
        self._counted = False
        self._started = time.monotonic()

    # -- connection lifecycle -----------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self._started = time.monotonic()
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.remote_addr = self.client_addr or str(peer[0])
        b = self.bastion
        if b.connections >= b.config.max_connections:
            self._refuse(conn, "the bastion is at its connection limit; try again later")
            return
        if b.per_source[self.remote_addr] >= b.config.max_connections_per_source:
            self._refuse(conn, "too many connections from your address")
            return
        if b.too_many_failures(self.remote_addr, time.monotonic()):
            self._refuse(conn, "too many failed logins from your address; wait a minute")
            return
        b.connections += 1
        b.per_source[self.remote_addr] += 1
        b.open.add(conn)
        self._counted = True
        original = conn.validate_public_key
        conn.validate_public_key = functools.partial(self._validate_public_key, original)  # type: ignore[method-assign]
        # asyncssh dispatches channel opens by attribute name, so this instance's
        # handler can be wrapped (see _direct_tcpip_open).
        conn._process_direct_tcpip_open = functools.partial(  # type: ignore[attr-defined]
            self._direct_tcpip_open,
            conn._process_direct_tcpip_open,  # type: ignore[attr-defined]
        )
        _ack_promptly_until_authenticated(conn)

    def _audit_unauthenticated_end(self, exc: Exception | None) -> None:
        """Garbage and stalled handshakes get an audit event (DESIGN.md, Security rules);
        a plain connect-and-close (a port probe, a client that gave up) does not."""
        stalled = time.monotonic() - self._started >= self.bastion.config.login_timeout
        hung_up = exc is None or isinstance(exc, asyncssh.ConnectionLost | OSError)
        if hung_up and not stalled:
            return
        kind = "stalled" if stalled else "garbage"
        if self.bastion.should_audit_refusal(self.remote_addr or "?", time.monotonic(), kind):
            self._audit_once("auth.failed", f"connection closed before login: {exc}")

    def _refuse(self, conn: asyncssh.SSHServerConnection, reason: str) -> None:
        if self.bastion.should_audit_refusal(self.remote_addr or "?", time.monotonic()):
            self._audit_once("auth.failed", reason)
        conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, reason)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted and self.api_identity is None and not self._audited:
            self._audit_unauthenticated_end(exc)
        if self._counted:
            b = self.bastion
            if self.conn is not None:
                b.open.discard(self.conn)
            b.connections -= 1
            b.per_source[self.remote_addr or "?"] -= 1
            if b.per_source[self.remote_addr or "?"] <= 0:
                b.per_source.pop(self.remote_addr or "?", None)
            self._counted = False

    def _audit_once(self, event: str, reason: str, user: str | None = None) -> None:
        if reason in self._audited:
            return
        self._audited.add(reason)
        try:
            audit.record(
                self.store,
                event,
                success=False,
                message=reason,
                user=user,
                remote_addr=self.remote_addr,
            )
        except DTError:
            log.exception("could not audit %s", event)

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
        self.conn.set_authorized_keys(self.bastion.authorized_keys)
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return True

    async def _validate_public_key(
        self, original: Any, username: str, key_data: bytes, msg: bytes, signature: bytes
    ) -> bool:
        """See the certificate blob before asyncssh does (see module docstring)."""
        try:
            cert = parse_cert(_openssh_line(key_data))
            identity = policy.check_certificate(
                cert, self.store, self.bastion.cluster.ca.user_ca_fingerprint, time.time()
            )
            policy.check_source_address(cert, self.remote_addr)
        except DTError as exc:
            if msg:
                self.bastion.note_failure(self.remote_addr or "?")
            self._audit_once("auth.failed", exc.message, _user_of(key_data))
            return False
        ok = await original(username, key_data, msg, signature)
        if ok and msg:
            self.identity = identity
            self.api_identity = ApiIdentity(
                identity.user, "certificate", self.remote_addr, valid_before=cert.valid_before
            )
        elif not ok and msg:  # a bad signature counts against the address like any failure
            self.bastion.note_failure(self.remote_addr or "?")
            self._audit_once("auth.failed", "certificate refused by the SSH layer", identity.user)
        return bool(ok)

    def get_kbdint_challenge(
        self, username: str, lang: str, submethods: str
    ) -> tuple[str, str, str, list[tuple[str, bool]]]:
        if username == SIGNUP_USER:
            return ("dt-bastion signup", "", "", [("Signup token: ", False)])
        return ("dt-bastion login", "", "", [("Password: ", False), ("One-time code: ", True)])

    async def validate_kbdint_response(self, username: str, responses: list[str]) -> bool:
        addr = self.remote_addr or "?"
        if self.bastion.too_many_failures(addr, time.monotonic()):
            self._audit_once("auth.failed", "too many failed logins from this address", username)
            return False
        try:
            if username == SIGNUP_USER and len(responses) == 1:
                user = accounts.signup_token_user(self.store, responses[0].strip())
                self.api_identity = ApiIdentity(user, "signup", addr, responses[0].strip())
                return True
            if len(responses) != 2:
                return False
            user_record = await asyncio.to_thread(
                accounts.check_password_login,
                self.store,
                username,
                responses[0],
                responses[1],
                remote_addr=addr,
                policy=self.bastion.lockout,
            )
        except DTError as exc:
            self.bastion.note_failure(addr)
            if username == SIGNUP_USER:
                self._audit_once("auth.failed", f"signup: {exc.message}")
            return False
        self.api_identity = ApiIdentity(user_record.name, "password", addr)
        return True

    # -- channels ------------------------------------------------------------------------------------

    def session_requested(self) -> Any:
        return self._session

    async def _session(
        self, stdin: asyncssh.SSHReader, stdout: asyncssh.SSHWriter, stderr: asyncssh.SSHWriter
    ) -> None:
        chan = stdout.channel
        subsystem = chan.get_subsystem()
        identity = self.api_identity
        if subsystem == "dt-api" and identity is not None:
            if self.identity is not None and self.identity.force_command is not None:
                stderr.write(b"dt-api: certificates with force-command cannot use dt-api\r\n")
                chan.exit(1)
                return
            session = ApiSession(
                self.bastion.cluster,
                identity,
                step_timeout=self.bastion.config.api_step_timeout,
                signup=self.bastion.signup,
                issuer=self.bastion.issuer,
            )
            try:
                await session.run(LineReader(stdin), stdout)
            finally:
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

    def _direct_tcpip_open(self, original: Any, packet: Any) -> Any:
        """asyncssh refuses ``direct-tcpip`` for a certificate without
        ``permit-port-forwarding`` before connection_requested runs; look first, so
        that refusal is audited like every other (checklist #9)."""
        conn, identity = self.conn, self.identity
        if (
            conn is not None
            and identity is not None
            and not (
                conn.check_key_permission("port-forwarding")
                and conn.check_certificate_permission("port-forwarding")
            )
        ):
            try:
                audit.record(
                    self.store,
                    "session.denied",
                    success=False,
                    message="the certificate does not permit port forwarding",
                    user=identity.user,
                    device=identity.asset_tag,
                    remote_addr=self.remote_addr,
                )
            except DTError:  # asyncssh still refuses; only the record is missing
                log.exception("could not audit a port-forwarding refusal")
        return original(packet)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Any:
        now = time.time()
        identity = self.identity
        try:
            if identity is None:
                raise AccessDenied("log in with a certificate first (dtclient login)")
            node = policy.resolve_node(self.store, dest_host, dest_port)
            policy.check_node_access(self.store, identity, node, now)
        except DTError as exc:
            audit.record(
                self.store,
                "session.denied",
                success=False,
                message=exc.message,
                user=identity.user if identity else None,
                device=identity.asset_tag if identity else None,
                remote_addr=self.remote_addr,
                target=f"{dest_host}:{dest_port}",
            )
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, exc.message
            ) from None
        assert self.conn is not None
        chan = self.conn.create_tcp_channel()
        return chan, self._forward(chan, identity, node)

    async def _forward(self, chan: Any, identity: policy.Identity, node: Any) -> CountingForwarder:
        bastion = self.bastion
        live = LiveSession(identity, node, self.remote_addr, chan.close)
        loop = asyncio.get_running_loop()

        def node_side() -> CountingForwarder:
            forwarder = CountingForwarder(bastion.registry, live, upstream=False)
            self._watch_node_host_key(forwarder, live)
            return forwarder

        try:
            _, peer = await asyncio.wait_for(
                loop.create_connection(node_side, node.host, node.port),
                bastion.config.node_connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            reason = f"node {node.name} ({node.addr}) is unreachable: {_why(exc)}"
            audit.record(
                self.store,
                "session.denied",
                success=False,
                message=reason,
                user=identity.user,
                device=identity.asset_tag,
                remote_addr=self.remote_addr,
                node=node.name,
            )
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, reason) from None
        try:
            bastion.registry.add(live)
        except DTError as exc:  # no session goes unrecorded: hang up on the node
            log.error("cannot record a session to %s: %s", node.name, exc.message)
            peer.close()
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED,
                "the bastion cannot record this session right now; try again later",
            ) from None
        return CountingForwarder(bastion.registry, live, upstream=True, peer=peer)

    def _watch_node_host_key(self, node_side: CountingForwarder, live: LiveSession) -> None:
        def refuse_user_cert(blob: bytes) -> bool:
            reason = self._bad_node_host_key(blob, live)
            if reason is not None:
                self._audit_node_refusal(live, reason)
            return reason is not None

        def unreadable(why: str) -> None:
            self._audit_node_refusal(
                live, f"node {live.node.name} sent an SSH handshake the bastion cannot check: {why}"
            )

        node_handshake.watch(node_side, refuse_user_cert, unreadable)

    def _bad_node_host_key(self, blob: bytes, live: LiveSession) -> str | None:
        try:
            cert = parse_cert(_openssh_line(blob))
        except DTError:
            return None  # unreadable to us: the client's own check decides
        ca = self.bastion.cluster.ca
        names = {
            ca.host_ca_fingerprint: "the cluster's host CA",
            ca.user_ca_fingerprint: "the cluster's user CA",
        }
        try:
            policy.check_node_host_cert(cert, live.node, names)
        except DTError as exc:
            return exc.message
        return None

    def _audit_node_refusal(self, live: LiveSession, reason: str) -> None:
        log.warning("refusing session %s: %s", live.id, reason)
        try:
            audit.record(
                self.store,
                "session.denied",
                success=False,
                message=reason,
                **audit_fields(live),
            )
        except DTError:
            log.exception("could not audit the refusal of session %s", live.id)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    if isinstance(exc, OSError) and exc.errno:
        # asyncio puts "Connect call failed (addr)" in strerror; the errno says why
        return os.strerror(exc.errno)
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _ack_promptly_until_authenticated(conn: asyncssh.SSHServerConnection) -> None:
    """Acknowledge every handshake segment at once instead of after Linux's 40 ms
    delayed-ACK timer.

    OpenSSH's client leaves Nagle's algorithm on until it has authenticated, so each
    time it writes two small packets in a row (KEX init after KEXINIT, service request
    after NEWKEYS) the second waits for our ACK of the first; we answer neither (it is
    not our turn), so the kernel holds the ACK back and the handshake stalls twice
    for ~40 ms. TCP_QUICKACK, set as each segment is read, sends that ACK now. After
    authentication the client sets TCP_NODELAY itself, so this stops there.
    """
    sock = conn.get_extra_info("socket")
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if sock is None or quickack is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    original = conn.data_received

    def data_received(data: bytes, datatype: Any = None) -> None:
        if conn.get_extra_info("username") is None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            except OSError:
                pass
        else:
            del conn.data_received  # authenticated: the bulk path gets the plain method
        original(data, datatype)

    conn.data_received = data_received  # type: ignore[method-assign]


def _openssh_line(key_data: bytes) -> bytes:
    import base64

    name_len = int.from_bytes(key_data[:4], "big") if len(key_data) >= 4 else 0
    name = key_data[4 : 4 + name_len]
    return name + b" " + base64.b64encode(key_data)


def _user_of(key_data: bytes) -> str | None:
    try:
        return parse_cert(_openssh_line(key_data)).user
    except DTError:
        return None


def _options(bastion: Bastion, host_key_path: str, host_cert_path: str) -> dict[str, Any]:
    config = bastion.config
    return {
        "server_host_keys": [(host_key_path, host_cert_path)],
        "login_timeout": config.login_timeout,
        "keepalive_interval": config.keepalive_interval,
        "keepalive_count_max": config.keepalive_count_max,
        "agent_forwarding": False,
        "x11_forwarding": False,
        "allow_scp": False,
        "allow_pty": True,
        "line_editor": False,
        "encoding": None,
        "server_version": "dt-bastion",
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
