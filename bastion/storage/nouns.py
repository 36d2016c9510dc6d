"""Every noun of the store joined into one class, and what spans nouns (``facts``).

Both stores are this class over their connection layer: ``SQLiteStore(Nouns,
SQLiteBase)`` and ``PostgresStore(Nouns, PostgresBase)``.
"""

from __future__ import annotations

from bastion.authz.facts import Facts
from bastion.authz.records import Role
from bastion.protocol.errors import StateError
from bastion.storage.audit_log import AuditStore
from bastion.storage.certs import CertStore
from bastion.storage.devices import DeviceStore
from bastion.storage.locks import LockStore
from bastion.storage.logins import LoginStore
from bastion.storage.nodes import NodeStore
from bastion.storage.open_sessions import OpenSessionStore
from bastion.storage.posture import PostureStore
from bastion.storage.roles import RoleStore
from bastion.storage.settings import SettingsStore, parse_setting
from bastion.storage.source_failures import SourceFailureStore
from bastion.storage.tokens import TokenStore
from bastion.storage.trust_roots import TrustRootStore
from bastion.storage.users import UserStore


class Nouns(
    SettingsStore,
    UserStore,
    RoleStore,
    DeviceStore,
    PostureStore,
    NodeStore,
    LockStore,
    TokenStore,
    CertStore,
    TrustRootStore,
    LoginStore,
    OpenSessionStore,
    SourceFailureStore,
    AuditStore,
):
    """Every noun module's methods, over any connection layer."""

    def facts(
        self,
        *,
        user: str | None,
        now: float,
        serial: int | None = None,
        asset_tag: str | None = None,
    ) -> Facts:
        """What the decision core needs about ``user`` (and a certificate serial and a
        device, with its posture), read in one snapshot. Anything unreadable comes back
        as the strictest value: a corrupt setting as no mode (required), a corrupt role
        as None, a corrupt posture policy as its raw text (which the core reads as a
        policy that denies), a corrupt posture record as a denying one."""
        with self.read_transaction():
            raw = self._raw_settings(
                "device_trust_mode", "user_ca_fingerprint", "posture_policy"
            )  # one read
            try:
                mode = parse_setting("device_trust_mode", raw.get("device_trust_mode", "null"))
            except StateError:
                mode = None
            ca = parse_setting("user_ca_fingerprint", raw.get("user_ca_fingerprint", "null"))
            try:
                cluster_posture = parse_setting("posture_policy", raw.get("posture_policy", "null"))
            except StateError:
                cluster_posture = raw["posture_policy"]  # not a mapping: read as unreadable
            record = self.find_user(user) if user else None
            roles: list[Role | None] = []
            for name in record.roles if record else ():
                try:
                    roles.append(self.find_role(name))
                except StateError:
                    roles.append(None)
            device, device_posture = (
                self._device_and_posture(asset_tag) if asset_tag else (None, None)
            )  # one read for both
            return Facts(
                cluster_mode=mode,
                user_ca_fingerprint=ca if isinstance(ca, str) else None,
                user=record,
                roles=tuple(roles),
                user_lock=self.active_lock("user", user, now) if user else None,
                issued=self.find_cert(serial) if serial is not None else None,
                device=device,
                device_lock=self.active_lock("device", asset_tag, now) if asset_tag else None,
                cluster_posture=cluster_posture,
                device_posture=device_posture,
            )
