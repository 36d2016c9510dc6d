"""What a decision reads: one consistent snapshot of the state, as typed records.

A shell reads a :class:`Facts` in one read transaction (``StateStore.facts``) and
hands it, with ``now``, to the functions in :mod:`bastion.authz.decide`. Nothing here
reads a clock, a socket or a database, so a rule is tested with plain values, and the
bastion, the CA, the ceremonies and the node helper cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from bastion.authz.records import Device, DevicePosture, IssuedCert, Lock, Role, User


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything one decision may look at, all read at the same moment.

    ``roles`` follows ``user.roles`` in order, with ``None`` for a role the state does
    not have or cannot read: such a role grants nothing and requires a trusted device
    (the strictest outcome, everywhere).
    """

    cluster_mode: object = "required"  # the raw setting; anything unreadable means required
    user_ca_fingerprint: str | None = None  # the user CA the database names now
    user: User | None = None
    roles: tuple[Role | None, ...] = ()
    user_lock: Lock | None = None
    issued: IssuedCert | None = None  # the record of the serial presented, if any
    device: Device | None = None  # the device named (by asset tag), as stored now
    device_lock: Lock | None = None
    # The cluster's posture policy (setting ``posture_policy``), raw: a value that does
    # not parse means the strictest policy (bastion.authz.posture).
    cluster_posture: object = None
    device_posture: DevicePosture | None = None  # the named device's posture as stored
