"""The bastion's decisions, pure over records: who a certificate is, where it may go.

No sockets, no asyncssh: the server asks these functions and turns a refusal into
an SSH failure whose text the user sees. Every decision is made again against the
current state whenever the state's revision moves (live revocation), so a device
unenrolled after its certificate was signed is refused from that moment on.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from bastion.authz import rbac
from bastion.authz.records import Node
from bastion.ca.certs import (
    EXT_ASSET_TAG,
    EXT_CREDENTIAL_ID,
    EXT_DEVICE_ID,
    EXT_VALUE_RE,
    JUMP_PRINCIPAL,
    ParsedCert,
)
from bastion.protocol.errors import AccessDenied, DeviceNotTrusted
from bastion.storage import Store

ENROLL_HINT = "(run: dtclient device enroll, then dtclient login)"
# Critical options OpenSSH defines; any other one must make the certificate unusable.
KNOWN_CRITICAL = {"force-command", "source-address", "verify-required"}


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is connected, as the certificate (checked against our records) says."""

    user: str
    serial: int
    key_id: str
    device_id: str | None = None
    asset_tag: str | None = None
    credential_id: str | None = None
    permit_port_forwarding: bool = False
    force_command: str | None = None

    @property
    def has_device(self) -> bool:
        return self.device_id is not None


def check_certificate(
    cert: ParsedCert, store: Store, user_ca_fingerprint: str, now: float
) -> Identity:
    """May this certificate authenticate at all? Raises AccessDenied with the reason."""
    if cert.cert_type != "user":
        raise AccessDenied("a host certificate cannot log in")
    if cert.ca_fingerprint != user_ca_fingerprint:
        raise AccessDenied(f"certificate is signed by an unknown CA ({cert.ca_fingerprint})")
    if not cert.valid_at(now):
        raise AccessDenied("certificate has expired or is not yet valid (run: dtclient login)")
    unknown = set(cert.critical_options) - KNOWN_CRITICAL
    if unknown:
        raise AccessDenied(f"certificate has an unknown critical option {sorted(unknown)[0]!r}")
    if JUMP_PRINCIPAL not in cert.principals:
        raise AccessDenied("certificate was not issued for this bastion")
    user = cert.user
    if not user or not EXT_VALUE_RE.fullmatch(user):
        raise AccessDenied("certificate names no dt-bastion user")
    issued = store.find_cert(cert.serial)
    if issued is None or issued.user != user or issued.cert_type != "user":
        raise AccessDenied(f"certificate serial {cert.serial} was not issued by this cluster")
    if issued.revoked is not None:
        raise AccessDenied(f"certificate serial {cert.serial} has been revoked")
    identity = _identity(cert, user)
    check_user(store, identity, now)
    return identity


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


def _identity(cert: ParsedCert, user: str) -> Identity:
    device = cert.device_extensions
    return Identity(
        user=user,
        serial=cert.serial,
        key_id=cert.key_id,
        device_id=device[EXT_DEVICE_ID] if device else None,
        asset_tag=device[EXT_ASSET_TAG] if device else None,
        credential_id=device[EXT_CREDENTIAL_ID] if device else None,
        permit_port_forwarding="permit-port-forwarding" in cert.extensions,
        force_command=cert.critical_options.get("force-command"),
    )


def check_user(store: Store, identity: Identity, now: float) -> None:
    """The user exists and is not locked; the certificate was not revoked since."""
    if store.find_user(identity.user) is None:
        raise AccessDenied(f'user "{identity.user}" no longer exists')
    lock = store.active_lock("user", identity.user, now)
    if lock is not None:
        reason = f": {lock.message}" if lock.message else ""
        raise AccessDenied(f'user "{identity.user}" is locked{reason}')
    issued = store.find_cert(identity.serial)
    if issued is None or issued.revoked is not None:
        raise AccessDenied(f"certificate serial {identity.serial} has been revoked")


def trust_mode(store: Store, user: str) -> str:
    record = store.find_user(user)
    if record is None:
        return "required"
    roles = [store.find_role(name) for name in record.roles]
    if any(role is None for role in roles):
        return "required"  # a role we cannot read must not weaken anything
    return rbac.effective_trust_mode(store.get_setting("device_trust_mode"), roles)  # type: ignore[arg-type]


def check_device(store: Store, identity: Identity, now: float) -> str:
    """Device trust, decided now. Returns the effective mode; raises DeviceNotTrusted."""
    mode = trust_mode(store, identity.user)
    if identity.has_device:
        assert identity.asset_tag is not None
        if store.active_lock("device", identity.asset_tag, now) is not None:
            raise DeviceNotTrusted(f'device "{identity.asset_tag}" is locked')
    if mode != "required":
        return mode
    if not identity.has_device:
        raise DeviceNotTrusted(f"a trusted device is required {ENROLL_HINT}")
    assert identity.asset_tag is not None
    device = store.find_device(identity.asset_tag)
    if device is None or device.id != identity.device_id:
        raise DeviceNotTrusted(
            f'device "{identity.asset_tag}" is not in the inventory {ENROLL_HINT}'
        )
    if not device.enrolled or device.credential is None:
        raise DeviceNotTrusted(f'device "{identity.asset_tag}" is not enrolled {ENROLL_HINT}')
    if device.owner != identity.user:
        raise DeviceNotTrusted(f'device "{identity.asset_tag}" is enrolled by another user')
    if device.credential.id != identity.credential_id:
        raise DeviceNotTrusted(
            f'device "{identity.asset_tag}" was re-enrolled since this certificate was issued '
            "(run: dtclient login)"
        )
    return mode


def check_node_host_cert(cert: ParsedCert, node: Node, ca_names: dict[str, str]) -> None:
    """A certificate a node presents as its host key is at least a host certificate.

    Whether it is *this* node's (host CA, principals) stays the client's end-to-end
    check. A user certificate is a host key nowhere, whoever signed it, so the bastion
    refuses it itself (checklist #3): the refusal gets its reason in the audit log, and a
    client that skips host key checks is not let through. ``ca_names`` names the
    cluster's CAs by fingerprint, for the message.
    """
    if cert.cert_type != "host":
        signer = ca_names.get(cert.ca_fingerprint, f"CA {cert.ca_fingerprint}")
        raise AccessDenied(
            f"node {node.name} presented a user certificate as its host key "
            f"(key id {cert.key_id[:64]!r}, signed by {signer})"
        )


def resolve_node(store: Store, dest_host: str, dest_port: int) -> Node:
    """The inventory node a direct-tcpip request means, or AccessDenied: no open relay.

    A node is named by its inventory name (port 22, what `ssh -J` sends, or its real
    port) or by its exact inventory address and port. Nothing else.
    """
    node = store.find_node(dest_host)
    if node is not None and dest_port in (22, node.port):
        return node
    host = dest_host.strip("[]")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        pass
    node = store.find_node_by_addr(host, dest_port)
    if node is not None:
        return node
    raise AccessDenied(f"access denied to {dest_host}:{dest_port}: not a node in the inventory")


def check_node_access(store: Store, identity: Identity, node: Node, now: float) -> None:
    """Everything at once, phrased for the user: `access denied to node-1: <reason>`."""
    try:
        check_user(store, identity, now)
        if not identity.permit_port_forwarding:
            raise AccessDenied("the certificate does not permit port forwarding")
        check_device(store, identity, now)
        user = store.get_user(identity.user)
        roles = [r for r in (store.find_role(n) for n in user.roles) if r is not None]
        if not rbac.node_allowed(roles, node):
            raise AccessDenied("your roles do not allow this node")
    except AccessDenied as exc:
        raise type(exc)(f"access denied to {node.name}: {exc.message}") from None
