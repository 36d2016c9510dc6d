"""The certificate authority: signing policy applied to records, then recorded.

A certificate leaves this module only after its serial and its audit event are
committed together (one transaction), so a crash can never hand out a certificate
nobody recorded, and a full or read-only disk makes issuance fail closed.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import ssh

from bastion import audit
from bastion.authz import decide, limits, posture, rbac
from bastion.authz.facts import Facts
from bastion.authz.records import Device, IssuedCert, User
from bastion.ca.certs import (
    BACKDATE_SECONDS,
    PublicKey,
    sign_host_cert,
    sign_user_cert,
    user_cert_spec,
)
from bastion.ca.keys import fingerprint
from bastion.protocol.errors import (
    AccessDenied,
    CertificateError,
    DeviceNotTrusted,
    DTError,
    PostureDenied,
    RateLimited,
    StateError,
    StorageUnavailable,
)
from bastion.storage import StateStore

_SERIAL_ATTEMPTS = 8
# The database names the one user CA in force; a process still holding a rotated-out
# key must not sign with it (``dtadmin ca rotate``).
USER_CA_SETTING = "user_ca_fingerprint"
RETIRED_USER_CAS_SETTING = "retired_user_cas"
# The host CA and the audit key in force, named the same way: each host running a
# bastion holds its own copy of ``ca/`` (docs/getting-started.md, "Several bastions"),
# and one whose copy is not what the database names refuses to start.
HOST_CA_SETTING = "host_ca_fingerprint"
AUDIT_KEY_SETTING = "audit_key_fingerprint"
STALE_USER_CA = (
    "the user CA was rotated: this bastion's user CA key is not the one in force "
    "({named}), and it signs nothing until it has that key (ca/user_ca, copied from "
    "the host where `dtadmin ca rotate` ran); try again shortly"
)


def new_serial() -> int:
    """Random, non-zero 63-bit serial; uniqueness is enforced by the database."""
    return secrets.randbits(63) or 1


@dataclass(frozen=True, slots=True)
class UserCertRequest:
    """One user certificate to sign: what ``sign_user`` takes, as a value to queue."""

    user: str
    public_key: PublicKey
    ttl: int | None = None
    device: Device | None = None
    remote_addr: str | None = None
    actor: str | None = None
    now: float | None = None
    # The credential the request came with, decided again under the write lock: the
    # serial of the certificate renewing itself, or the password hash a password
    # connection authenticated with (None: an admin's or a test's direct request).
    renewal_of: int | None = None
    password_hash: str | None = None
    # Certificates this user may be issued per minute, counted in the transaction
    # that signs (dt-api sets max_certs_per_user_per_minute; None: no limit, an
    # admin's request).
    rate_limit: int | None = None
    # Bots: the certificate is for a bot user only (`dtadmin auth sign`), and the bot
    # token a request came with (its hash), decided again under the write lock.
    bot_only: bool = False
    bot_token_hash: str | None = None
    # The posture verdict device authentication gave ``device`` (Verdict.extension:
    # pass, warn, unchecked): the certificate's EXT_POSTURE, decided again here.
    posture: str | None = None


@dataclass(frozen=True, slots=True)
class Issued:
    certificate: ssh.SSHCertificate
    record: IssuedCert
    # Why the certificate carries no device extensions though the request named a
    # device: its posture, decided again in the signing transaction, withholds them.
    device_warning: str | None = None

    @property
    def openssh(self) -> str:
        return self.certificate.public_bytes().decode()


class CertificateAuthority:
    def __init__(
        self,
        store: StateStore,
        user_ca: ed25519.Ed25519PrivateKey,
        host_ca: ed25519.Ed25519PrivateKey,
    ) -> None:
        self.store = store
        self.host_ca = host_ca
        self.host_ca_fingerprint = fingerprint(host_ca.public_key())
        self.set_user_ca(user_ca)

    def set_user_ca(self, user_ca: ed25519.Ed25519PrivateKey) -> None:
        """Swap in the user CA a rotation installed (the bastion does this live)."""
        self.user_ca = user_ca
        self.user_ca_fingerprint = fingerprint(user_ca.public_key())

    # -- the decisions, read and made as the bastion makes them -------------------------------

    def check_user(self, name: str, now: float) -> User:
        return decide.check_user(self.store.facts(user=name, now=now), now, name)

    def permissions(self, user: User) -> rbac.Permissions:
        return decide.permissions(self.store.facts(user=user.name, now=time.time()))

    # -- signing -----------------------------------------------------------------------------

    def sign_user(
        self,
        user_name: str,
        public_key: PublicKey,
        *,
        ttl: int | None = None,
        device: Device | None = None,
        remote_addr: str | None = None,
        actor: str | None = None,
        now: float | None = None,
    ) -> Issued:
        return self.sign(
            UserCertRequest(user_name, public_key, ttl, device, remote_addr, actor, now)
        )

    def sign(self, request: UserCertRequest) -> Issued:
        [result] = self.sign_users([request])
        if isinstance(result, DTError):
            raise result
        return result

    def sign_users(self, requests: Sequence[UserCertRequest]) -> list[Issued | DTError]:
        """Sign several certificates with one commit (group commit); one result each.

        Checks, signing and recording run under one write lock, so a lock or an
        unenrollment that commits meanwhile cannot be outrun (checklist #25). Each
        request is a savepoint: a refused one is rolled back alone and its refusal
        recorded in the same transaction. Nothing is returned before the commit: if it
        fails, this raises and no certificate of the batch leaves.
        """
        results: list[Issued | DTError] = []
        with self.store.transaction(bump=False):
            current = self.store.get_setting(USER_CA_SETTING, self.user_ca_fingerprint)
            rotated = current != self.user_ca_fingerprint
            for request in requests:
                try:
                    if rotated:
                        raise StateError(STALE_USER_CA.format(named=current))
                    with self.store.savepoint():
                        results.append(self._issue(request))
                except StorageUnavailable:
                    raise  # the whole batch fails closed; nothing of it is committed
                except (AccessDenied, StateError, RateLimited) as exc:  # DeviceNotTrusted too
                    self._audit_refusal(exc, request)
                    results.append(exc)
                except CertificateError as exc:
                    results.append(exc)
        return results

    def _issue(self, request: UserCertRequest) -> Issued:
        now = time.time() if request.now is None else request.now
        device = request.device
        facts = self.store.facts(
            user=request.user,
            asset_tag=device.asset_tag if device else None,
            serial=request.renewal_of,
            now=now,
        )
        decide.check_user(facts, now, request.user)
        if request.bot_only or request.bot_token_hash is not None:
            decide.check_bot(facts, now, request.user)
        token = None
        if request.bot_token_hash is not None:
            token = self.store.find_token(request.bot_token_hash, "bot")
            decide.check_bot_token(token, facts, now)
        if request.rate_limit is not None:
            since = now - limits.ISSUANCE_WINDOW
            recent = self.store.count_user_certs(request.user, since=since)
            limits.check_issuance_rate(request.user, recent, request.rate_limit)
        if request.renewal_of is not None:
            decide.check_renewal(request.renewal_of, request.user, facts)
        if request.password_hash is not None:
            decide.check_password_connection(request.user, request.password_hash, facts, now)
        if device is not None:
            # The caller authenticated ``device`` before this transaction; an unenroll
            # or re-enroll since then gives a new credential, and the old proof must
            # not count for it.
            credential = device.credential.id if device.credential else None
            device = decide.check_device_login(device, request.user, credential, facts, now)
        withheld = None
        if device is not None:
            withheld = self._check_posture(request, facts, now)
            if withheld is not None:
                device = None
        perms = decide.permissions(facts)
        ttl = request.ttl
        if token is not None:
            # What a bot token gets never outlives the token: a token minted for an
            # hour gives an hour of access, not an hour plus a certificate's lifetime.
            left = int(token.expires - now)
            ttl = min(perms.default_ttl or perms.max_ttl, left) if ttl is None else min(ttl, left)
        issued = self._sign_and_record(
            request.user, request.public_key, perms, ttl, device, now, request.posture
        )
        if withheld is not None:
            issued = Issued(issued.certificate, issued.record, device_warning=withheld)
        audit.record(
            self.store,
            "cert.create",
            user=request.user,
            device=device.asset_tag if device else None,
            remote_addr=request.remote_addr,
            message=f"user certificate serial {issued.record.serial}",
            cert_type="user",
            serial=str(issued.record.serial),
            principals=list(issued.record.principals),
            valid_before=issued.record.valid_before,
            actor=request.actor,
            bot=True if perms.bot else None,
            via="bot token" if request.bot_token_hash is not None else None,
            now=now,
        )
        return issued

    @staticmethod
    def _check_posture(request: UserCertRequest, facts: Facts, now: float) -> str | None:
        """The device's posture as stored now (the check every later connection makes,
        :func:`posture.check_device_posture`): None when it stands; else why the device
        extensions are withheld, or PostureDenied where the stored verdict denies."""
        try:
            posture.check_device_posture(request.posture, facts, now)
        except DeviceNotTrusted as exc:
            stored = facts.device_posture
            if stored is not None and stored.verdict == "deny":
                raise PostureDenied(exc.message) from None
            return f"{exc.message}; this certificate carries no device extensions"
        return None

    def _sign_and_record(
        self,
        user_name: str,
        public_key: PublicKey,
        perms: rbac.Permissions,
        ttl: int | None,
        device: Device | None,
        now: float,
        posture_verdict: str | None = None,
    ) -> Issued:
        for _ in range(_SERIAL_ATTEMPTS):
            spec = user_cert_spec(
                user=user_name,
                perms=perms,
                serial=new_serial(),
                now=int(now),
                ttl=ttl,
                device=device,
                posture=posture_verdict if device is not None else None,
            )
            record = IssuedCert(
                serial=spec.serial,
                key_id=spec.key_id,
                user=user_name,
                cert_type="user",
                principals=spec.principals,
                valid_after=spec.valid_after,
                valid_before=spec.valid_before,
                public_key_fingerprint=fingerprint(public_key),
                device_id=device.id if device else None,
                issued=now,
            )
            if self.store.record_cert(record):
                return Issued(sign_user_cert(self.user_ca, public_key, spec), record)
        raise CertificateError("could not allocate a unique certificate serial")

    def _audit_refusal(
        self, exc: AccessDenied | StateError | RateLimited, request: UserCertRequest
    ) -> None:
        audit.record(
            self.store,
            "cert.create",
            success=False,
            message=exc.message,
            user=request.user,
            device=request.device.asset_tag if request.device else None,
            remote_addr=request.remote_addr,
            actor=request.actor,
        )

    def sign_host(
        self,
        public_key: PublicKey,
        principals: tuple[str, ...],
        *,
        ttl: int = 365 * 86400,
        actor: str | None = None,
        now: float | None = None,
    ) -> Issued:
        now = time.time() if now is None else now
        for _ in range(_SERIAL_ATTEMPTS):
            serial = new_serial()
            key_id = f"host-{principals[0] if principals else 'none'}-{serial}"
            cert = sign_host_cert(
                self.host_ca,
                public_key,
                principals=principals,
                serial=serial,
                key_id=key_id,
                valid_after=int(now) - BACKDATE_SECONDS,
                valid_before=int(now) + ttl,
            )
            record = IssuedCert(
                serial=serial,
                key_id=key_id,
                user="",
                cert_type="host",
                principals=principals,
                valid_after=int(now) - BACKDATE_SECONDS,
                valid_before=int(now) + ttl,
                public_key_fingerprint=fingerprint(public_key),
                issued=now,
            )
            with self.store.transaction(bump=False):
                if not self.store.record_cert(record):
                    continue
                audit.record(
                    self.store,
                    "cert.create",
                    message=f"host certificate serial {serial}",
                    cert_type="host",
                    serial=str(serial),
                    principals=list(principals),
                    actor=actor,
                    now=now,
                )
            return Issued(cert, record)
        raise CertificateError("could not allocate a unique certificate serial")
