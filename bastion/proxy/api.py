"""The ``dt-api`` subsystem: login, certificates, node listing, signup and enrollment.

One :class:`ApiSession` per SSH channel. It reads JSON lines (bastion.protocol.wire), one
request at a time, each with a deadline, and answers each with exactly one message
or an ``error {code, message}``. What a session may do depends on how its SSH
connection authenticated:

* ``signup``: a signup token; only ``signup_begin`` / ``signup_finish``.
* ``password`` (password + TOTP): certificates, node listing, enrollment.
* ``certificate``: the same, for renewals and enrollment with a current certificate.

The session owns no sockets: it takes a reader and a writer, so tests drive it with
in-memory streams.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from bastion import audit
from bastion.authz import rbac
from bastion.authz.records import Device
from bastion.ca.authority import UserCertRequest
from bastion.ca.certs import load_public_key
from bastion.ca.issuer import GroupCommitIssuer
from bastion.cluster import Cluster
from bastion.enroll.authn import DeviceAuthentication
from bastion.enroll.ceremony import EnrollmentCeremony, device_view
from bastion.protocol import wire
from bastion.protocol.errors import AccessDenied, DTError, ProtocolError

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


class ApiSession:
    def __init__(
        self,
        cluster: Cluster,
        identity: ApiIdentity,
        *,
        step_timeout: float = STEP_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        signup: Any = None,
        issuer: GroupCommitIssuer | None = None,
    ) -> None:
        self.cluster = cluster
        # The bastion's shared issuer batches concurrent logins into one commit and
        # keeps the disk off the event loop; without one, sign in place.
        self.issuer = issuer
        self.store = cluster.store
        self.identity = identity
        self.step_timeout = step_timeout
        self.idle_timeout = idle_timeout
        self.signup = signup  # bastion.accounts.Signup-like: begin(token), finish(...)
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
        await wire.write_message(
            writer,
            wire.Welcome(
                version=wire.PROTOCOL_VERSION,
                cluster=self.cluster.name,
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
            answer = await handler(msg, reader, writer)
        except ProtocolError:
            raise
        except DTError as exc:
            await self._send_error(writer, exc)
            return
        await wire.write_message(writer, answer)

    def _handlers(self) -> dict[type, Any]:
        if self.identity.auth == "signup":
            return {wire.SignupBegin: self._signup_begin, wire.SignupFinish: self._signup_finish}
        return {
            wire.CertRequest: self._cert_request,
            wire.ListNodes: self._list_nodes,
            wire.Whoami: self._whoami,
            wire.EnrollBegin: self._enroll_begin,
            wire.EnrollFinish: self._enroll_finish,
        }

    async def _send_error(self, writer: Any, exc: DTError) -> None:
        try:
            await wire.write_message(writer, wire.error_from(exc))
        except (OSError, ConnectionError):
            pass

    def _audit_error(self, exc: DTError) -> None:
        try:
            audit.record(
                self.store,
                "api.error",
                success=False,
                message=exc.message,
                user=self.identity.user,
                remote_addr=self.identity.remote_addr,
                reason=exc.code,
            )
        except DTError:
            log.exception("could not audit a dt-api error")

    # -- certificates ----------------------------------------------------------------------

    async def _cert_request(self, msg: Any, reader: Any, writer: Any) -> Any:
        user = self.identity.user
        public_key = load_public_key(msg.public_key.encode())
        ca = self.cluster.ca
        perms = ca.permissions(ca.check_user(user, time.time()))
        device: Device | None = None
        warning = None
        if msg.device and perms.trust_mode != "off":
            try:
                device = await self._authenticate_device(msg, reader, writer)
            except ProtocolError:
                raise
            except DTError as exc:  # audited by the ceremony; the user gets a plain cert
                warning = (
                    f"device authentication failed: {exc.message}; "
                    "this certificate carries no device extensions"
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
            user, public_key, ttl=ttl, device=device, remote_addr=self.identity.remote_addr
        )
        if self.issuer is not None:
            issued = await self.issuer.sign(request)
        else:
            issued = ca.sign(request)
        return wire.CertIssued(
            certificate=issued.openssh,
            host_ca_keys=[self._host_ca_line()],
            cluster=self.cluster.name,
            roles=list(self.store.get_user(user).roles),
            logins=list(perms.logins),
            device_warning=warning,
        )

    async def _authenticate_device(self, msg: Any, reader: Any, writer: Any) -> Device | None:
        ceremony = DeviceAuthentication(
            self.store, self.identity.user, remote_addr=self.identity.remote_addr
        )
        await wire.write_message(writer, wire.DeviceChallenge(nonce=ceremony.challenge()))
        response = await wire.read_message(reader, self.step_timeout)
        if isinstance(response, wire.Error):
            return None  # the client could not use its TPM; it gets a plain certificate
        if not isinstance(response, wire.DeviceResponse):
            raise ProtocolError("dt-api: expected device_response after device_challenge")
        public_blob = msg.public_key.encode().split()[1]
        import base64

        try:
            blob = base64.b64decode(public_blob, validate=True)
        except ValueError:
            raise ProtocolError("dt-api: public_key is not an OpenSSH public key line") from None
        return ceremony.verify(response, blob)

    def _host_ca_line(self) -> str:
        from bastion.ca.keys import public_line

        return public_line(self.cluster.ca.host_ca.public_key())

    # -- nodes and identity -----------------------------------------------------------------

    async def _list_nodes(self, msg: Any, reader: Any, writer: Any) -> Any:
        roles = self._roles()
        nodes = [n for n in self.store.list_nodes() if rbac.node_allowed(roles, n)]
        return wire.Nodes(
            nodes=[
                {"name": n.name, "addr": n.host, "port": n.port, "labels": dict(n.labels)}
                for n in nodes
            ]
        )

    async def _whoami(self, msg: Any, reader: Any, writer: Any) -> Any:
        user = self.store.get_user(self.identity.user)
        perms = self.cluster.ca.permissions(user)
        devices = [
            device_view(d) for d in self.store.list_devices() if d.owner == user.name and d.enrolled
        ]
        return wire.Identity(
            user=user.name,
            roles=list(user.roles),
            logins=list(perms.logins),
            device_trust_mode=perms.trust_mode,
            device=devices[0] if devices else None,
        )

    def _roles(self) -> list[Any]:
        user = self.store.get_user(self.identity.user)
        return [r for r in (self.store.find_role(n) for n in user.roles) if r is not None]

    # -- enrollment ---------------------------------------------------------------------------

    async def _enroll_begin(self, msg: Any, reader: Any, writer: Any) -> Any:
        if self.store.active_lock("user", self.identity.user, time.time()):
            raise AccessDenied(f'user "{self.identity.user}" is locked')
        self._enrollment = EnrollmentCeremony(
            self.store, self.identity.user, remote_addr=self.identity.remote_addr
        )
        return self._enrollment.begin(msg)

    async def _enroll_finish(self, msg: Any, reader: Any, writer: Any) -> Any:
        if self._enrollment is None:
            raise ProtocolError("dt-api: enroll_finish without enroll_begin")
        ceremony, self._enrollment = self._enrollment, None
        device = ceremony.finish(msg)
        return wire.Enrolled(device=device_view(device))

    # -- signup ---------------------------------------------------------------------------------

    async def _signup_begin(self, msg: Any, reader: Any, writer: Any) -> Any:
        if self.signup is None:
            raise AccessDenied("signup is not available on this bastion")
        return self.signup.begin(msg, remote_addr=self.identity.remote_addr)

    async def _signup_finish(self, msg: Any, reader: Any, writer: Any) -> Any:
        if self.signup is None:
            raise AccessDenied("signup is not available on this bastion")
        return self.signup.finish(msg, remote_addr=self.identity.remote_addr)
