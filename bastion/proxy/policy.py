"""The bastion's side of each decision: read the facts, let the core decide.

Every function here reads one :class:`~bastion.authz.facts.Facts` snapshot from the
store and calls :mod:`bastion.authz.decide`; none holds a rule of its own. They are
blocking (storage), so the asyncssh shell calls them off the event loop.
"""

from __future__ import annotations

import base64
import ipaddress
import time

from bastion.authz import decide, posture, refusals
from bastion.authz.decide import CertClaims, check_node_host_cert, check_source_address
from bastion.authz.facts import Facts
from bastion.authz.records import Node
from bastion.protocol.certs import EXT_ASSET_TAG, ParsedCert
from bastion.protocol.errors import AccessDenied
from bastion.storage import StateStore

# What a connection that authenticated with a certificate is, for its whole life.
Identity = CertClaims

__all__ = [
    "Identity",
    "check_certificate",
    "check_device",
    "check_live_session",
    "check_node_access",
    "check_node_host_cert",
    "open_channel",
    "openssh_line",
    "check_source_address",
    "device_warning",
    "explain_certificate",
    "recheck_live_connection",
    "recheck_password",
    "resolve_node",
    "trust_mode",
]


def check_certificate(
    cert: ParsedCert, store: StateStore, user_ca_fingerprint: str, now: float
) -> CertClaims:
    """May this certificate authenticate at all? Raises AccessDenied with the reason.

    ``user_ca_fingerprint`` is the CA this process has loaded; the database's own
    record of the CA in force is checked too (a rotation another process committed).
    """
    if cert.ca_fingerprint != user_ca_fingerprint:
        raise AccessDenied(f"certificate is signed by an unknown CA ({cert.ca_fingerprint})")
    asset_tag = (cert.device_extensions or {}).get(EXT_ASSET_TAG)
    facts = store.facts(user=cert.user, serial=cert.serial, asset_tag=asset_tag, now=now)
    return decide.check_certificate(cert, facts, now)


def recheck_live_connection(store: StateStore, claims: CertClaims, now: float) -> None:
    """The certificate a connection authenticated with still stands, and an expired
    one ends the connection where a role says so (``disconnect_expired_cert``)."""
    facts = store.facts(user=claims.user, serial=claims.serial, now=now)
    decide.check_live_connection(claims, facts, now)


def recheck_password(store: StateStore, user: str, password_hash: str | None, now: float) -> None:
    """A password connection's user still exists, is unlocked, and has the password
    the connection authenticated with."""
    decide.check_password_connection(user, password_hash, store.facts(user=user, now=now), now)


def trust_mode(store: StateStore, user: str) -> str:
    return decide.trust_mode(store.facts(user=user, now=time.time()))


def check_device(store: StateStore, identity: CertClaims, now: float) -> str:
    """Device trust, decided now. Returns the effective mode; raises DeviceNotTrusted."""
    facts = store.facts(user=identity.user, asset_tag=identity.asset_tag, now=now)
    return decide.check_device(identity, facts, now)


def check_node_access(
    store: StateStore, identity: CertClaims, node: Node | None, now: float
) -> None:
    """Everything at once, phrased for the user: `access denied to node-1: <reason>`."""
    decide.check_node_access(identity, _facts_for(store, identity, now), node, now)


def open_channel(
    store: StateStore, identity: CertClaims, dest_host: str, dest_port: int, now: float
) -> Node:
    """The node a new direct-tcpip channel may go to, or AccessDenied: an inventory
    node, everything :func:`check_node_access` asks, and a certificate not expired."""
    with store.read_transaction():
        node = resolve_node(store, dest_host, dest_port)
        facts = _facts_for(store, identity, now)
    decide.check_channel_open(identity, facts, node, now)
    return node


def check_live_session(
    store: StateStore, identity: CertClaims, node: Node, now: float
) -> float | None:
    """A forwarded session may go on (its node still the same inventory entry),
    decided whenever the state moves and again once its node connect returned.

    Returns until when this decision stands without a state change: the device's
    continuous-attestation deadline (``posture.attestation_deadline``; good quotes move
    it without moving the revision), or None when no policy asks for one."""
    with store.read_transaction():
        current = store.find_node(node.name)
        if current is None or current.addr != node.addr:
            raise AccessDenied(f"node {node.name} was removed from the inventory")
        facts = _facts_for(store, identity, now)
    decide.check_live_session(identity, facts, current, now)
    return posture.attestation_deadline(facts) if identity.has_device else None


def _facts_for(store: StateStore, identity: CertClaims, now: float) -> Facts:
    return store.facts(
        user=identity.user, serial=identity.serial, asset_tag=identity.asset_tag, now=now
    )


def openssh_line(key_data: bytes) -> bytes:
    """The key blob asyncssh hands us, as the OpenSSH line :func:`parse_cert` reads."""
    name_len = int.from_bytes(key_data[:4], "big") if len(key_data) >= 4 else 0
    name = key_data[4 : 4 + name_len]
    return name + b" " + base64.b64encode(key_data)


def resolve_node(store: StateStore, dest_host: str, dest_port: int) -> Node:
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


def explain_certificate(
    store: StateStore, cert: ParsedCert, reason: str, now: float
) -> refusals.Refusal | None:
    """What the holder of this refused certificate may be told (once it proved the
    key), or None: not a certificate this cluster issued, so nothing is said."""
    asset_tag = (cert.device_extensions or {}).get(EXT_ASSET_TAG)
    facts = store.facts(user=cert.user, serial=cert.serial, asset_tag=asset_tag, now=now)
    if not refusals.is_ours(cert, facts):
        return None
    return refusals.reason_for_holder(cert, facts, now) or refusals.Refusal(reason)


def device_warning(store: StateStore, identity: CertClaims, now: float) -> str | None:
    """Said at login when this accepted certificate reaches no node for want of a
    trusted device (see :func:`refusals.device_warning`)."""
    facts = store.facts(user=identity.user, asset_tag=identity.asset_tag, now=now)
    return refusals.device_warning(identity, facts, now)
