"""The ``dt-api`` subsystem: login, certificates, node listing, signup and enrollment.

One :class:`ApiSession` per SSH channel. It reads JSON lines (bastion.protocol.wire), one
request at a time, each with a deadline, and answers each with exactly one message
or an ``error {code, message}``. What a session may do depends on how its SSH
connection authenticated:

* ``signup``: a signup token; only ``signup_begin`` / ``signup_finish``.
* ``password`` (password + TOTP): certificates, node listing, enrollment.
* ``certificate``: the same, for renewals and enrollment with a current certificate.
* ``bot-token``: a bot's job with its bot token: certificates (never with a device),
  node listing and whoami, for that bot only.

Before every request the credential the connection authenticated with is decided
again (``recheck``): a certificate revoked, its CA rotated out, the user locked or
removed, or the password changed since a password login, and the request is refused
and the whole connection closed (``terminate``). No request can turn a credential that
no longer stands into a fresh certificate.

The session owns no sockets: it takes a reader and a writer, so tests drive it with
in-memory streams. Nor does it touch the database on the event loop: reads, ceremony
steps and audit rows go through :mod:`bastion.proxy.workers`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bastion.authz import decide, limits, rbac
from bastion.authz.facts import Facts
from bastion.authz.records import Device
from bastion.ca.authority import UserCertRequest
from bastion.ca.certs import load_public_key
from bastion.ca.issuer import GroupCommitIssuer
from bastion.ca.keys import public_line
from bastion.cluster import Cluster
from bastion.enroll.authn import DeviceAuthentication
from bastion.enroll.ceremony import EnrollmentCeremony, device_view, enrolled_view
from bastion.protocol import wire
from bastion.protocol.errors import (
    AccessDenied,
    DeviceUnavailable,
    DTError,
    PostureDenied,
    ProtocolError,
    RateLimited,
)
from bastion.proxy import attestation
from bastion.proxy.admission import RefusalDigest
from bastion.proxy.connections import CredentialRevoked
from bastion.proxy.workers import Workers

log = logging.getLogger("bastion.api")

SERVER_NAME = "dt-bastion/0.1"
STEP_TIMEOUT = 30.0
IDLE_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class ApiIdentity:
    """Who is on the other end, as the SSH layer established it."""

    user: str
    auth: str  # "password" | "certificate" | "signup"
    remote_addr: str | None = None
    signup_token: str | None = None
    # For certificate logins: renewals never outlive the certificate that asked.
    valid_before: int | None = None
    # For password logins: the hash the password was checked against.
    password_hash: str | None = None
    # For certificate logins: the serial of the certificate that authenticated.
    serial: int | None = None
    # For bot-token logins: the hash of the token, decided again by the CA.
    token_hash: str | None = None


class ApiSession:
    def __init__(
        self,
        cluster: Cluster,
        identity: ApiIdentity,
        *,
        workers: Workers,
        cluster_name: str | None = None,
        step_timeout: float = STEP_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        signup: Any = None,
        issuer: GroupCommitIssuer | None = None,
        recheck: Callable[[], Awaitable[None]] | None = None,
        terminate: Callable[[str], Awaitable[None]] | None = None,
        max_certs_per_minute: int = 0,
        digest: RefusalDigest | None = None,
    ) -> None:
        self.cluster = cluster
        # The bastion's shared issuer batches concurrent logins into one commit and
        # keeps the disk off the event loop; without one, sign on a worker.
        self.issuer = issuer
        self.store = cluster.store  # what the ceremonies use, on the workers' call lane
        self.workers = workers
        self.cluster_name = cluster_name
        self.identity = identity
        self.step_timeout = step_timeout
        self.idle_timeout = idle_timeout
        self.signup = signup  # bastion.accounts.Signup-like: begin(token), finish(...)
        # Raises CredentialRevoked (then ``terminate`` closes the connection) or
        # AccessDenied (this request only); see the module docstring.
        self.recheck = recheck
        self.terminate = terminate
        # Certificates per user per minute (0: none); refusals summarised in ``digest``.
        self.max_certs_per_minute = max_certs_per_minute
        self.digest = digest
        self._enrollment: EnrollmentCeremony | None = None

    # -- the loop --------------------------------------------------------------------------

    async def run(self, reader: Any, writer: Any) -> None:
        """Serve until EOF, an idle timeout, or a protocol error (answered, then closed)."""
        try:
            hello = await wire.read_message(reader, self.step_timeout)
            await self._hello(hello, writer)
            while True:
                try:
                    msg = await wire.read_message(reader, self.idle_timeout)
                except EOFError:
                    return
                await self._dispatch(msg, reader, writer)
        except EOFError:
            return
        except CredentialRevoked:
            return  # answered, audited and the connection closed (_dispatch)
        except ProtocolError as exc:
            self._audit_error(exc)
            await self._send_error(writer, exc)
        except (ConnectionError, asyncio.CancelledError):
            raise

    async def _hello(self, msg: Any, writer: Any) -> None:
        if not isinstance(msg, wire.Hello):
            raise ProtocolError("dt-api: the first message must be hello")
        if msg.version != wire.PROTOCOL_VERSION:
            raise ProtocolError(
                f"dt-api: protocol version {msg.version} is not supported "
                f"(this bastion speaks {wire.PROTOCOL_VERSION}); upgrade dtclient"
            )
        if self.cluster_name is None:
            self.cluster_name = await self.workers.read(
                lambda store: store.get_setting("cluster_name", "")
            )
        await wire.write_message(
            writer,
            wire.Welcome(
                version=wire.PROTOCOL_VERSION,
                cluster=self.cluster_name or "",
                server=SERVER_NAME,
                user=self.identity.user if self.identity.auth != "signup" else None,
                auth=self.identity.auth,
            ),
        )

    async def _dispatch(self, msg: Any, reader: Any, writer: Any) -> None:
        handler = self._handlers().get(type(msg))
        if handler is None:
            raise ProtocolError(f"dt-api: unexpected message {wire.type_name(msg)!r} here")
        try:
            await self._recheck()
            answer = await handler(msg, reader, writer)
        except ProtocolError:
            raise
        except CredentialRevoked as exc:
            await self._send_error(writer, exc)
            if self.terminate is not None:
                await self.terminate(exc.message)
            raise
        except DTError as exc:
            await self._send_error(writer, exc)
            return
        await wire.write_message(writer, answer)

    async def _recheck(self) -> None:
        if self.recheck is not None:
            await self.recheck()

    def _handlers(self) -> dict[type, Any]:
        if self.identity.auth == "signup":
            return {wire.SignupBegin: self._signup_begin, wire.SignupFinish: self._signup_finish}
        if self.identity.auth == "bot-token":
            return {
                wire.CertRequest: self._cert_request,
                wire.ListNodes: self._list_nodes,
                wire.Whoami: self._whoami,
            }
        return {
            wire.CertRequest: self._cert_request,
            wire.ListNodes: self._list_nodes,
            wire.Whoami: self._whoami,
            wire.EnrollBegin: self._enroll_begin,
            wire.EnrollFinish: self._enroll_finish,
            wire.AttestBegin: functools.partial(attestation.serve, self),  # dtclient agent
        }

    async def _send_error(self, writer: Any, exc: DTError) -> None:
        try:
            await wire.write_message(writer, wire.error_from(exc))
        except (OSError, ConnectionError):
            pass

    def _audit_error(self, exc: DTError) -> None:
        self.workers.audit_soon(
            "api.failed",
            success=False,
            message=exc.message,
            user=self.identity.user,
            remote_addr=self.identity.remote_addr,
            reason=exc.code,
        )

    async def _facts(self) -> Facts:
        """The user as the state has them now, the user allowed to log in."""
        user, now = self.identity.user, time.time()
        facts = await self.workers.read(lambda store: store.facts(user=user, now=now))
        decide.check_user(facts, now, user)
        return facts

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """A ceremony step (reads, CPU, writes) on the workers' call lane."""
        return await self.workers.call(
            functools.partial(fn, *args, **kwargs), timeout=self.step_timeout
        )

    # -- certificates ----------------------------------------------------------------------

    async def _cert_request(self, msg: Any, reader: Any, writer: Any) -> Any:
        user = self.identity.user
        public_key = load_public_key(msg.public_key.encode())
        facts = await self._facts()
        await self._check_issuance_rate()
        perms = decide.permissions(facts)
        device: Device | None = None
        warning = None
        proof: DeviceAuthentication | None = None
        if msg.device and perms.trust_mode != "off" and not perms.bot:
            proof = DeviceAuthentication(
                self.store, self.identity.user, remote_addr=self.identity.remote_addr
            )
            try:
                device = await self._authenticate_device(proof, facts, msg, reader, writer)
            except (ProtocolError, PostureDenied):
                raise  # a posture that denies: no certificate at all (audited)
            except DTError as exc:  # audited by the ceremony; the user gets a plain cert
                warning = (
                    f"device authentication failed: {exc.message}; "
                    "this certificate carries no device extensions"
                )
            else:
                warning = proof.warning
        if device is None and perms.trust_mode == "required" and perms.bot:
            warning = (
                "device trust is required for everyone here, bots included: this bot's "
                "certificate opens no node unless the mode is required-for-humans"
            )
        if device is None and perms.trust_mode == "required" and warning is None:
            warning = (
                "device trust is required for your roles and this certificate carries no "
                "trusted device: enroll this device (dtclient device enroll) and log in again"
            )
        ttl = msg.ttl_seconds
        if self.identity.valid_before is not None:  # a renewal: cap at the presenting cert
            remaining = int(self.identity.valid_before - time.time())
            ttl = remaining if ttl is None else min(ttl, remaining)
        request = UserCertRequest(
            user,
            public_key,
            ttl=ttl,
            device=device,
            remote_addr=self.identity.remote_addr,
            # Decided once more inside the signing transaction: a revocation that
            # commits after the re-check below cannot be outrun.
            renewal_of=self.identity.serial if self.identity.auth == "certificate" else None,
            password_hash=self.identity.password_hash if self.identity.auth == "password" else None,
            rate_limit=self.max_certs_per_minute or None,
            bot_token_hash=self.identity.token_hash if self.identity.auth == "bot-token" else None,
            posture=proof.verdict.extension if device and proof and proof.verdict else None,
        )
        # Again: the device round trip took as long as the client liked.
        await self._recheck()
        if self.issuer is not None:
            issued = await self.issuer.sign(request)
        else:
            issued = await self._call(self.cluster.ca.sign, request)
        assert facts.user is not None
        verdict = proof.verdict if proof is not None else None
        if issued.device_warning is not None:  # the CA withheld the device after all
            device, warning, verdict = None, issued.device_warning, None
        return wire.CertIssued(
            certificate=issued.openssh,
            host_ca_keys=[self._host_ca_line()],
            cluster=self.cluster_name or "",
            roles=list(facts.user.roles),
            logins=list(perms.logins),
            device_warning=warning,
            # What the client agent needs to keep a device-trusted session attested,
            # and the verdict a posture policy gave (None where none looked).
            attest_interval=proof.attest_interval if device and proof else None,
            posture=verdict.status if verdict and verdict.status != "unchecked" else None,
        )

    async def _check_issuance_rate(self) -> None:
        """A first look, with a read: a flood of requests is refused before it costs a
        device round trip or a place in the CA's transaction, where the count is
        decided again (``rate_limit``) for requests that came together."""
        limit, user, now = self.max_certs_per_minute, self.identity.user, time.time()
        if not limit:
            return
        recent = await self.workers.read(
            lambda store: store.count_user_certs(user, since=now - limits.ISSUANCE_WINDOW)
        )
        try:
            limits.check_issuance_rate(user, recent, limit)
        except RateLimited as exc:
            if self.digest is not None:
                self.digest.note(
                    "certs",
                    user,
                    now,
                    event="cert.create",
                    message=exc.message,
                    summary=f"{{n}} more certificate requests of {user} refused "
                    f"(limit {limit} a minute) in the last minute",
                    user=user,
                    remote_addr=self.identity.remote_addr,
                )
            raise

    async def _authenticate_device(
        self, ceremony: DeviceAuthentication, facts: Facts, msg: Any, reader: Any, writer: Any
    ) -> Device | None:
        # What to quote comes from the user's facts read for this request (no second
        # read per login); verify decides on facts read again after the TPM answers, so
        # a policy set in between is applied, and a log it needs but nobody asked for
        # counts as none (it fails closed).
        challenge = ceremony.challenge_message(facts=facts)
        await wire.write_message(writer, challenge)
        response = await wire.read_message(reader, self.step_timeout)
        if isinstance(response, wire.Error):  # the client could not use its TPM
            self.workers.audit_soon(
                "device.authenticate",
                success=False,
                message=f"the client's TPM did not answer: {response.message[:200]!r}",
                user=self.identity.user,
                remote_addr=self.identity.remote_addr,
                reason=DeviceUnavailable.code,
            )
            raise DeviceUnavailable(
                f"this device's TPM did not answer ({response.message}); the device stays "
                "enrolled: log in again once it does"
            )
        if not isinstance(response, wire.DeviceResponse):
            raise ProtocolError("dt-api: expected device_response after device_challenge")
        public_blob = msg.public_key.encode().split()[1]
        try:
            blob = base64.b64decode(public_blob, validate=True)
        except ValueError:
            raise ProtocolError("dt-api: public_key is not an OpenSSH public key line") from None
        device: Device = await self._call(ceremony.verify, response, blob)
        return device

    def _host_ca_line(self) -> str:
        return public_line(self.cluster.ca.host_ca.public_key())

    # -- nodes and identity -----------------------------------------------------------------

    async def _list_nodes(self, msg: Any, reader: Any, writer: Any) -> Any:
        roles = decide.known_roles(await self._facts())
        nodes = [
            n
            for n in await self.workers.read(lambda store: store.list_nodes())
            if rbac.node_allowed(roles, n)
        ]
        return wire.Nodes(
            nodes=[
                {"name": n.name, "addr": n.host, "port": n.port, "labels": dict(n.labels)}
                for n in nodes
            ]
        )

    async def _whoami(self, msg: Any, reader: Any, writer: Any) -> Any:
        facts = await self._facts()
        user = facts.user
        assert user is not None
        perms = decide.permissions(facts)
        devices = [
            device_view(d)
            for d in await self.workers.read(lambda store: store.list_devices())
            if d.owner == user.name and d.enrolled
        ]
        return wire.Identity(
            user=user.name,
            roles=list(user.roles),
            logins=list(perms.logins),
            device_trust_mode=perms.trust_mode,
            device=devices[0] if devices else None,
        )

    # -- enrollment ---------------------------------------------------------------------------

    async def _enroll_begin(self, msg: Any, reader: Any, writer: Any) -> Any:
        await self._facts()  # a locked user enrolls nothing
        self._enrollment = await self._call(
            EnrollmentCeremony,
            self.store,
            self.identity.user,
            remote_addr=self.identity.remote_addr,
        )
        return await self._call(self._enrollment.begin, msg)

    async def _enroll_finish(self, msg: Any, reader: Any, writer: Any) -> Any:
        if self._enrollment is None:
            raise ProtocolError("dt-api: enroll_finish without enroll_begin")
        ceremony, self._enrollment = self._enrollment, None
        device = await self._call(ceremony.finish, msg)
        return wire.Enrolled(device=enrolled_view(device, ceremony.verdict))

    # -- signup ---------------------------------------------------------------------------------

    async def _signup_begin(self, msg: Any, reader: Any, writer: Any) -> Any:
        if self.signup is None:
            raise AccessDenied("signup is not available on this bastion")
        return await self._call(self.signup.begin, msg, remote_addr=self.identity.remote_addr)

    async def _signup_finish(self, msg: Any, reader: Any, writer: Any) -> Any:
        if self.signup is None:
            raise AccessDenied("signup is not available on this bastion")
        return await self._call(self.signup.finish, msg, remote_addr=self.identity.remote_addr)
