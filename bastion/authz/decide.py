"""Every allow and deny, decided once, over :class:`Facts` and ``now``.

The bastion (at connect, at every dt-api request, at every channel and whenever the
state moves), the CA (inside its recording transaction), device authentication and
the node-side ``dt-node-principals`` all call these functions; none has a copy of a
rule. A refusal raises :class:`AccessDenied` (or :class:`DeviceNotTrusted`) with the
reason a person reads.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from bastion.authz import posture, rbac
from bastion.authz.facts import Facts
from bastion.authz.records import Device, Node, Role, Token, User
from bastion.protocol.certs import (
    EXT_ASSET_TAG,
    EXT_CREDENTIAL_ID,
    EXT_DEVICE_ID,
    JUMP_PRINCIPAL,
    ParsedCert,
    valid_extension_value,
)
from bastion.protocol.errors import AccessDenied, DeviceNotTrusted

ENROLL_HINT = "(run: dtclient device enroll, then dtclient login)"
# Critical options OpenSSH defines; any other one must make the certificate unusable.
KNOWN_CRITICAL = frozenset({"force-command", "source-address", "verify-required"})


@dataclass(frozen=True, slots=True)
class CertClaims:
    """What a presented certificate says about its holder, once it passed
    :func:`check_certificate`. Kept for the connection's life and decided again."""

    user: str
    serial: int
    key_id: str
    key_fingerprint: str = ""
    ca_fingerprint: str = ""
    valid_before: int = 0
    device_id: str | None = None
    asset_tag: str | None = None
    credential_id: str | None = None
    permit_port_forwarding: bool = False
    force_command: str | None = None
    bot: bool = False  # the certificate says it is a bot user's (EXT_BOT)
    # The posture verdict the certificate was issued with (EXT_POSTURE; only beside the
    # device extensions), None: none.
    posture: str | None = None

    @property
    def has_device(self) -> bool:
        return self.device_id is not None


def claims_of(cert: ParsedCert) -> CertClaims:
    device = cert.device_extensions
    return CertClaims(
        user=cert.user or "",
        serial=cert.serial,
        key_id=cert.key_id,
        key_fingerprint=cert.key_fingerprint,
        ca_fingerprint=cert.ca_fingerprint,
        valid_before=cert.valid_before,
        device_id=device[EXT_DEVICE_ID] if device else None,
        asset_tag=device[EXT_ASSET_TAG] if device else None,
        credential_id=device[EXT_CREDENTIAL_ID] if device else None,
        permit_port_forwarding="permit-port-forwarding" in cert.extensions,
        force_command=cert.critical_options.get("force-command"),
        bot=cert.is_bot,
        posture=cert.posture,
    )


# -- roles -------------------------------------------------------------------------------


def known_roles(facts: Facts) -> list[Role]:
    """The roles that grant anything: an unknown or unreadable role grants nothing."""
    return [role for role in facts.roles if role is not None]


def trust_mode(facts: Facts) -> str:
    """The device-trust mode that applies to ``facts.user``: the strictest of the
    cluster's and every role's, with ``required-for-humans`` resolved for this user
    (``required`` for a person, ``optional`` for a bot user). No user, or any role that
    cannot be read, means ``required``."""
    if facts.user is None or any(role is None for role in facts.roles):
        return "required"
    mode = rbac.effective_trust_mode(facts.cluster_mode, known_roles(facts))
    return rbac.mode_for(mode, bot=facts.user.bot)


def permissions(facts: Facts) -> rbac.Permissions:
    """What a certificate for ``facts.user`` may carry (the user must exist)."""
    if facts.user is None:
        raise AccessDenied("no such user")
    perms = rbac.permissions(facts.user, known_roles(facts), facts.cluster_mode)
    return replace(perms, trust_mode=trust_mode(facts))


# -- users and credentials -------------------------------------------------------------------


def check_user(facts: Facts, now: float, name: str) -> User:
    """The user exists, is not locked (the lock's message is shown), and every role
    it holds can be read. A role the cluster does not have (removed, or corrupt in the
    database) is the one rule for unknown roles everywhere: nothing is granted."""
    if facts.user is None or facts.user.name != name:
        raise AccessDenied(f'user "{name}" does not exist (or no longer exists)')
    lock = facts.user_lock
    if lock is not None and lock.active(now):
        reason = f": {lock.message}" if lock.message else ""
        raise AccessDenied(f'user "{name}" is locked{reason}')
    for role_name, role in zip(facts.user.roles, facts.roles, strict=False):
        if role is None:
            raise AccessDenied(
                f'user "{name}" has role "{role_name}", which this cluster does not define '
                "or cannot read; nothing is granted until an admin fixes the user's roles"
            )
    return facts.user


def check_certificate(cert: ParsedCert, facts: Facts, now: float) -> CertClaims:
    """May this certificate authenticate at all? Its signature was verified by the
    parser; here: our current CA, valid now, for this bastion, and exactly the
    certificate this cluster issued under that serial, to a user who may log in."""
    if cert.cert_type != "user":
        raise AccessDenied("a host certificate cannot log in")
    if facts.user_ca_fingerprint is not None and cert.ca_fingerprint != facts.user_ca_fingerprint:
        raise AccessDenied(f"certificate is signed by an unknown CA ({cert.ca_fingerprint})")
    if not cert.valid_at(now):
        raise AccessDenied("certificate has expired or is not yet valid (run: dtclient login)")
    unknown = set(cert.critical_options) - KNOWN_CRITICAL
    if unknown:
        raise AccessDenied(f"certificate has an unknown critical option {sorted(unknown)[0]!r}")
    if JUMP_PRINCIPAL not in cert.principals:
        raise AccessDenied("certificate was not issued for this bastion")
    if not valid_extension_value(cert.user):
        raise AccessDenied("certificate names no dt-bastion user")
    claims = claims_of(cert)
    check_issued(claims, facts)
    check_bot_claim(claims, check_user(facts, now, claims.user))
    return claims


def check_bot_claim(claims: CertClaims, user: User) -> None:
    """A certificate says it is a bot's exactly when its user is a bot: a bot's
    certificate never stands for a person of the same name, nor the other way round."""
    if claims.bot != user.bot:
        kind = "bot" if claims.bot else "person"
        raise AccessDenied(f'certificate was issued to a {kind}, and "{user.name}" is not one')


# -- bots ----------------------------------------------------------------------------------


def check_bot(facts: Facts, now: float, name: str) -> User:
    """``name`` is a bot user that may be issued certificates now (auth sign, bot
    tokens): it exists, is unlocked, its roles can be read, and it is a bot."""
    user = check_user(facts, now, name)
    if not user.bot:
        raise AccessDenied(
            f'"{name}" is a person, not a bot: people get certificates with dtclient login '
            "(password, one-time code and, where required, their device)"
        )
    return user


def check_not_bot(user: User | None, what: str) -> None:
    """What only people do: sign up, log in with a password, enroll a device."""
    if user is not None and user.bot:
        raise AccessDenied(f'"{user.name}" is a bot user; a bot cannot {what}')


def check_bot_token(token: Token | None, facts: Facts, now: float) -> User:
    """A bot token (looked up by its hash) stands now, for a bot that may be issued
    certificates. Decided at authentication, before every dt-api request and again by
    the CA inside its signing transaction."""
    if token is None or token.kind != "bot":
        raise AccessDenied("bot token is not valid (unknown, mistyped or revoked)")
    if token.expires <= now:
        raise AccessDenied(
            f'the bot token of "{token.subject}" has expired; an admin mints a new one '
            "(dtadmin bots token NAME)"
        )
    if facts.user is None or facts.user.name != token.subject:
        raise AccessDenied(f'bot token belongs to "{token.subject}", which no longer exists')
    return check_bot(facts, now, token.subject)


def check_issued(claims: CertClaims, facts: Facts) -> None:
    """The serial was issued here, to this user, for this key and device, and stands.

    A certificate made with the CA key outside the CA (a stolen key, a second signer)
    can reuse an issued serial; it still differs from the record in its key or device.
    """
    issued = facts.issued
    if (
        issued is None
        or issued.serial != claims.serial
        or issued.cert_type != "user"
        or issued.user != claims.user
    ):
        raise AccessDenied(f"certificate serial {claims.serial} was not issued by this cluster")
    if issued.revoked is not None:
        raise AccessDenied(f"certificate serial {claims.serial} has been revoked")
    if (
        (issued.public_key_fingerprint and issued.public_key_fingerprint != claims.key_fingerprint)
        or issued.device_id != claims.device_id
        or (issued.key_id and issued.key_id != claims.key_id)
    ):
        raise AccessDenied(
            f"certificate serial {claims.serial} does not match the certificate issued "
            "under that serial"
        )


def check_cert_connection(claims: CertClaims, facts: Facts, now: float) -> None:
    """A connection that authenticated with a certificate may go on: the certificate
    is still issued, unrevoked and of the CA in force, and its user may log in."""
    if facts.user_ca_fingerprint is not None and claims.ca_fingerprint != facts.user_ca_fingerprint:
        raise AccessDenied("the user CA was rotated; this certificate is no longer trusted")
    check_issued(claims, facts)
    check_bot_claim(claims, check_user(facts, now, claims.user))


def check_renewal(serial: int, user: str, facts: Facts) -> None:
    """The certificate a renewal presents still stands (decided by the CA under its
    write lock, after the bastion's own re-check, so no revocation slips between)."""
    issued = facts.issued
    if issued is None or issued.serial != serial or issued.user != user:
        raise AccessDenied(f"certificate serial {serial} was not issued by this cluster")
    if issued.cert_type != "user" or issued.revoked is not None:
        raise AccessDenied(f"certificate serial {serial} has been revoked")


def check_password_connection(
    user: str, password_hash: str | None, facts: Facts, now: float
) -> None:
    """A connection that authenticated with a password may go on only while the user
    exists, is unlocked and still has the password it authenticated with."""
    record = check_user(facts, now, user)
    if password_hash is None or record.password_hash != password_hash:
        raise AccessDenied(f'the password of user "{user}" was changed or reset; log in again')


def cert_expired(claims: CertClaims, now: float) -> bool:
    return now >= claims.valid_before


def disconnect_expired_cert(facts: Facts) -> bool:
    """Whether a connection's sessions end when its certificate expires (any role says
    so, see :func:`rbac.disconnect_expired_cert`). A role that cannot be read is the
    strictest outcome: they end."""
    if any(role is None for role in facts.roles):
        return True
    return rbac.disconnect_expired_cert(known_roles(facts))


def check_live_connection(claims: CertClaims, facts: Facts, now: float) -> None:
    """A certificate connection may stay open: :func:`check_cert_connection`, and once
    its certificate has expired, only while no role ends sessions then."""
    check_cert_connection(claims, facts, now)
    _check_expiry_ends(claims, facts, now)


def _check_expiry_ends(claims: CertClaims, facts: Facts, now: float) -> None:
    if cert_expired(claims, now) and disconnect_expired_cert(facts):
        raise AccessDenied(
            "the certificate has expired and your roles end its sessions then "
            "(disconnect_expired_cert; run: dtclient login)"
        )


def check_not_expired(claims: CertClaims, now: float) -> None:
    """Nothing new starts on an expired certificate: no channel, no dt-api request.
    (What is already running goes on unless :func:`check_live_connection` says no.)"""
    if cert_expired(claims, now):
        raise AccessDenied(
            "the certificate has expired; nothing new opens on this connection "
            "(run: dtclient login)"
        )


def check_channel_open(claims: CertClaims, facts: Facts, node: Node | None, now: float) -> None:
    """A new forwarded channel: everything :func:`check_node_access` asks, on a
    certificate that has not expired."""
    try:
        check_not_expired(claims, now)
    except AccessDenied as exc:
        raise _to_node(node, exc) from None
    check_node_access(claims, facts, node, now)


def check_live_session(claims: CertClaims, facts: Facts, node: Node | None, now: float) -> None:
    """A forwarded session may go on (decided whenever the state moves, and once its
    node connect returns): node access as at open, and an expired certificate ends it
    where a role says so."""
    check_node_access(claims, facts, node, now)
    try:
        _check_expiry_ends(claims, facts, now)
    except AccessDenied as exc:
        raise _to_node(node, exc) from None


def _to_node(node: Node | None, exc: AccessDenied) -> AccessDenied:
    name = node.name if node is not None else "?"
    return type(exc)(f"access denied to {name}: {exc.message}")


def check_source_address(cert: ParsedCert, client_addr: str | None) -> None:
    """The certificate's ``source-address`` admits the client's address.

    asyncssh enforces this too, but refuses a malformed list only deep inside its own
    parsing and a mismatch at the query stage, neither of which we would audit; deciding
    here gives every such refusal its reason and its audit event.
    """
    value = cert.critical_options.get("source-address")
    if value is None:
        return
    try:
        nets = [ipaddress.ip_network(p.strip(), strict=False) for p in value.split(",")]
    except ValueError:
        raise AccessDenied(f"certificate has a malformed source-address {value[:80]!r}") from None
    try:
        addr = ipaddress.ip_address(client_addr or "")
    except ValueError:
        raise AccessDenied("the client's address is unknown, so source-address fails") from None
    mapped = getattr(addr, "ipv4_mapped", None)
    if not any(addr in net or (mapped is not None and mapped in net) for net in nets):
        raise AccessDenied(f"certificate is not valid from {addr} (source-address {value[:80]})")


# -- devices -----------------------------------------------------------------------------------


def check_device(claims: CertClaims, facts: Facts, now: float) -> str:
    """Device trust for a presented certificate, decided now. Returns the effective
    mode; raises DeviceNotTrusted.

    A certificate that names a device stands only while that device is enrolled, to
    this user, unlocked, whatever the mode: `dtadmin device unenroll` of a stolen
    laptop ends its certificates in optional mode too (and the node helper has always
    held such a certificate to its device). And only while its posture stands
    (:func:`posture.check_device_posture`): its last measured boot did not fail, the
    certificate carries a verdict where a posture policy checks the boot, and the
    device keeps attesting where a policy asks it to."""
    mode = trust_mode(facts)
    if claims.has_device and facts.device_lock is not None and facts.device_lock.active(now):
        raise DeviceNotTrusted(f'device "{claims.asset_tag}" is locked')
    if not claims.has_device:
        if mode == "required":
            raise DeviceNotTrusted(f"a trusted device is required {ENROLL_HINT}")
        return mode
    device = facts.device
    if device is None or device.id != claims.device_id or device.asset_tag != claims.asset_tag:
        raise DeviceNotTrusted(f'device "{claims.asset_tag}" is not in the inventory {ENROLL_HINT}')
    _check_enrolled_for(device, claims.user, claims.credential_id, facts, now)
    posture.check_device_posture(claims.posture, facts, now)
    return mode


def check_device_login(
    device: Device, user: str, credential_id: str | None, facts: Facts, now: float
) -> Device:
    """A device may vouch for ``user`` now (device authentication, and the CA again
    inside its transaction): the stored device is the same one, enrolled to this user
    with this credential, and not locked. Returns the device as stored now."""
    fresh = facts.device
    if fresh is None or fresh.id != device.id or not fresh.enrolled or fresh.credential is None:
        raise DeviceNotTrusted(f'device "{device.asset_tag}" is not enrolled')
    _check_enrolled_for(fresh, user, credential_id, facts, now)
    return fresh


def _check_enrolled_for(
    device: Device, user: str, credential_id: str | None, facts: Facts, now: float
) -> None:
    if not device.enrolled or device.credential is None:
        raise DeviceNotTrusted(f'device "{device.asset_tag}" is not enrolled {ENROLL_HINT}')
    if device.owner != user:
        raise DeviceNotTrusted(f'device "{device.asset_tag}" is enrolled by another user')
    if device.credential.id != credential_id:
        raise DeviceNotTrusted(
            f'device "{device.asset_tag}" was re-enrolled since this credential was issued '
            "(run: dtclient login)"
        )
    if facts.device_lock is not None and facts.device_lock.active(now):
        raise DeviceNotTrusted(f'device "{device.asset_tag}" is locked')
    wanted = rbac.required_attestation(known_roles(facts))
    if not rbac.attestation_at_least(device.credential.attestation_type, wanted):
        raise DeviceNotTrusted(
            f'device "{device.asset_tag}" was enrolled with {device.credential.attestation_type} '
            f"attestation; your roles require {wanted} (an admin trusts its TPM vendor's EK "
            "CA with dtadmin trust-root add, then you enroll again)"
        )


def check_may_enroll(facts: Facts) -> None:
    """A bot has no TPM of its own to prove: it enrolls no device, by token or not."""
    check_not_bot(facts.user, "enroll a device")


def may_self_enroll(facts: Facts) -> bool:
    return rbac.allows(known_roles(facts), "device", "enroll")


def check_enrollment_by(device: Device, user: str, *, by_token: bool) -> None:
    """May ``user`` enroll ``device`` (its inventory record)?

    Nobody takes over a device another user has enrolled. A device an admin assigned
    to an owner (``dtadmin device add --owner``) is enrolled by that owner only, even
    with a valid token: a token reaches whoever holds it, the owner names who should.
    """
    if device.enrolled and device.owner and device.owner != user:
        raise AccessDenied(f'device "{device.asset_tag}" is already enrolled by another user')
    if by_token and device.owner and device.owner != user:
        raise AccessDenied(
            f'device "{device.asset_tag}" is registered to another user; its enrollment '
            "token serves only its owner"
        )


# -- nodes -------------------------------------------------------------------------------------


def check_node_access(claims: CertClaims, facts: Facts, node: Node | None, now: float) -> None:
    """Everything at once, phrased for the user: `access denied to node-1: <reason>`."""
    try:
        if node is None:
            raise AccessDenied("the node was removed from the inventory")
        check_cert_connection(claims, facts, now)
        if not claims.permit_port_forwarding:
            raise AccessDenied("the certificate does not permit port forwarding")
        check_device(claims, facts, now)
        if not rbac.node_allowed(known_roles(facts), node):
            raise AccessDenied("your roles do not allow this node")
    except AccessDenied as exc:
        raise _to_node(node, exc) from None


def check_node_host_cert(cert: ParsedCert, node: Node, ca_names: dict[str, str]) -> None:
    """A certificate a node presents as its host key is at least a host certificate.

    Whether it is *this* node's (host CA, principals) stays the client's end-to-end
    check. A user certificate is a host key nowhere, whoever signed it, so the bastion
    refuses it itself (checklist #3). ``ca_names`` names the cluster's CAs by
    fingerprint, for the message.
    """
    if cert.cert_type != "host":
        signer = ca_names.get(cert.ca_fingerprint, f"CA {cert.ca_fingerprint}")
        raise AccessDenied(
            f"node {node.name} presented a user certificate as its host key "
            f"(key id {cert.key_id[:64]!r}, signed by {signer})"
        )


# -- the node-side helper --------------------------------------------------------------------


def node_principals(
    login: str,
    cert: ParsedCert,
    *,
    ca_fingerprints: set[str],
    require_device: bool,
    facts: Facts | None,
    now: float,
    issued_known: bool = True,
    device_trust_mode: str | None = None,
) -> tuple[str, ...]:
    """What ``dt-node-principals`` prints for sshd: the login, or raises with why not.

    Without the cluster state (``facts`` None) it can check only the certificate; with
    it, the same rules as the bastion's (the cluster's and the user's roles' device-trust
    modes, locks, the device enrolled now), so a node never admits what the bastion would
    refuse. ``require_device`` makes the node stricter than the cluster, never laxer.
    ``issued_known`` False: the facts carry no issued-certificate records (the state a
    cluster publishes for nodes, :mod:`bastion.authz.published`); revocation then
    reaches the node through its KRL instead. ``device_trust_mode`` (the node's own
    setting, when given) supersedes ``require_device``: ``required-for-humans`` admits a
    bot's certificate without device extensions (the CA marks it, and signs it only for
    a bot user); with facts, the stricter of it and the cluster's modes decides.
    """
    node_mode = (
        device_trust_mode
        if device_trust_mode is not None
        else ("required" if require_device else "optional")
    )
    require_device = rbac.mode_for(node_mode, bot=cert.is_bot) == "required"
    if cert.cert_type != "user":
        raise AccessDenied("not a user certificate")
    if cert.ca_fingerprint not in ca_fingerprints:
        raise AccessDenied(f"certificate signed by an untrusted CA {cert.ca_fingerprint}")
    if not cert.valid_at(now):
        raise AccessDenied("certificate is not valid now")
    if login not in cert.principals:
        raise AccessDenied(f"login {login!r} is not a principal of the certificate")
    if require_device and cert.device_extensions is None:
        raise AccessDenied("device trust is required and the certificate has no device extensions")
    if facts is not None:
        claims = claims_of(cert)
        if not valid_extension_value(cert.user):
            raise AccessDenied("certificate names no dt-bastion user")
        if issued_known:
            check_issued(claims, facts)
        check_bot_claim(claims, check_user(facts, now, claims.user))
        # A certificate that names a device is held to it; otherwise the node's own
        # mode counts as much as the cluster's (the stricter wins).
        mode = "required" if claims.has_device else rbac.strictest(node_mode, facts.cluster_mode)
        check_device(claims, replace(facts, cluster_mode=mode), now)
    return (login,)
