"""Users, roles and what they grant: pure decisions over records, no I/O.

The preset roles mirror the seed's. ``effective_trust_mode`` is the one place that
decides whether a trusted device is needed; anything it cannot read means
``required`` (DESIGN.md, Security rules: never fall back to ``off``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bastion.authz.records import (
    ATTESTATION_TYPES,
    LOGIN_RE,
    NAME_RE,
    TRUST_MODES,
    Node,
    Role,
    Rule,
    User,
)
from bastion.protocol.errors import UsageError

INTERNAL_LOGINS = "{{internal.logins}}"

_ALL_VERBS = ("list", "read", "create", "update", "delete")

PRESET_ROLES: tuple[Role, ...] = (
    Role(
        name="access",
        logins=(INTERNAL_LOGINS,),
        node_labels={"*": ("*",)},
        description="SSH to every node with the logins from the user's traits",
        preset=True,
    ),
    Role(
        name="auditor",
        rules=(Rule(("audit",), ("list", "read")),),
        description="Read the audit log",
        preset=True,
    ),
    Role(
        name="editor",
        rules=(
            Rule(("user", "role", "node", "lock", "cluster"), _ALL_VERBS),
            Rule(("device",), ("enroll",)),
        ),
        description="Manage users, roles and nodes; may enroll their own devices",
        preset=True,
    ),
    Role(
        name="device-admin",
        rules=(Rule(("device", "device_token", "trust_root"), (*_ALL_VERBS, "enroll")),),
        description="Manage devices and enrollment tokens; may enroll their own devices",
        preset=True,
    ),
    Role(
        name="require-trusted-device",
        device_trust_mode="required",
        description="Grants nothing; requires a trusted device for all access",
        preset=True,
    ),
)

_STRICTNESS = {mode: i for i, mode in enumerate(TRUST_MODES)}
HUMANS_ONLY = "required-for-humans"
# Bot certificates are short-lived: a CI job asks for a new one (bot token) each run.
BOT_DEFAULT_TTL = 3600
BOT_MAX_TTL = 4 * 3600


def check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits, '.', '_', '@' or '-'"
        )
    return name


# The SSH user names the bastion keeps for itself (signup and bot tokens, the jump
# principal): a person or bot of such a name would be asked for a token, never a password.
RESERVED_USER_PREFIX = "-dt-"


def check_user_name(kind: str, name: object) -> str:
    name = check_name(kind, name)
    if name.startswith(RESERVED_USER_PREFIX):
        raise UsageError(
            f"invalid {kind} name {name!r}: names starting {RESERVED_USER_PREFIX!r} are "
            "reserved for the bastion's own SSH user names (-dt-signup, -dt-bot)"
        )
    return name


def check_logins(logins: Iterable[str]) -> tuple[str, ...]:
    out = []
    for login in logins:
        if not isinstance(login, str) or not LOGIN_RE.fullmatch(login):
            raise UsageError(f"invalid login {login!r}: not a valid Unix user name")
        out.append(login)
    return tuple(dict.fromkeys(out))


def check_trust_mode(mode: object) -> str:
    if mode not in TRUST_MODES:
        raise UsageError(f"invalid device trust mode {mode!r}: use one of {', '.join(TRUST_MODES)}")
    return str(mode)


def stricter(a: str, b: str) -> str:
    return a if _STRICTNESS[a] >= _STRICTNESS[b] else b


def effective_trust_mode(cluster_mode: object, roles: Iterable[Role]) -> str:
    """The strictest of the cluster's mode and every role's; unknown means required."""
    mode = cluster_mode if cluster_mode in _STRICTNESS else "required"
    for role in roles:
        if role.device_trust_mode is None:
            continue
        role_mode = role.device_trust_mode if role.device_trust_mode in _STRICTNESS else "required"
        mode = stricter(str(mode), role_mode)
    return str(mode)


def mode_for(mode: object, *, bot: bool) -> str:
    """The mode that applies to one user: ``required-for-humans`` is ``required`` for a
    person and ``optional`` for a bot user; anything unknown is ``required``."""
    if mode not in _STRICTNESS:
        return "required"
    if mode == HUMANS_ONLY:
        return "optional" if bot else "required"
    return str(mode)


def strictest(*modes: object) -> str:
    """The strictest of several raw mode settings (unknown means required)."""
    out = "off"
    for mode in modes:
        out = stricter(out, str(mode) if mode in _STRICTNESS else "required")
    return out


def disconnect_expired_cert(roles: Iterable[Role]) -> bool:
    """Whether sessions end when their certificate expires: any role that says so,
    and any role that does not say but requires a trusted device."""
    for role in roles:
        wanted = role.disconnect_expired_cert
        if wanted is None:  # an unreadable mode counts as required, as everywhere
            wanted = role.device_trust_mode not in (None, "off", "optional")
        if wanted:
            return True
    return False


def user_logins(user: User, roles: Iterable[Role]) -> tuple[str, ...]:
    """The Unix logins a user's certificate carries, expanding ``{{internal.logins}}``."""
    out: list[str] = []
    for role in roles:
        for login in role.logins:
            out.extend(user.logins if login == INTERNAL_LOGINS else (login,))
    return tuple(dict.fromkeys(out))


def max_ttl(roles: Iterable[Role], default: int = 12 * 3600) -> int:
    """The shortest ``max_session_ttl`` of the user's roles (every role must allow it)."""
    ttls = [r.max_session_ttl for r in roles if r.max_session_ttl > 0]
    return min(ttls) if ttls else default


def allows(roles: Iterable[Role], resource: str, verb: str) -> bool:
    return any(role.allows(resource, verb) for role in roles)


def _labels_match(wanted: Mapping[str, tuple[str, ...]], labels: Mapping[str, str]) -> bool:
    if not wanted:
        return False
    for key, values in wanted.items():
        if key == "*":
            if "*" not in values:
                return False
            continue
        if key not in labels or not ("*" in values or labels[key] in values):
            return False
    return True


def node_allowed(roles: Iterable[Role], node: Node) -> bool:
    """True if any role's ``node_labels`` selects this node (all its keys must match)."""
    return any(_labels_match(role.node_labels, node.labels) for role in roles)


@dataclass(frozen=True, slots=True)
class Permissions:
    """Everything a certificate may say about a user, computed once from the roles."""

    logins: tuple[str, ...]
    max_ttl: int
    trust_mode: str
    permit_port_forwarding: bool
    permit_pty: bool
    permit_agent_forwarding: bool
    permit_x11_forwarding: bool
    permit_user_rc: bool
    # A bot user's certificates say so (key id and extension) and are short-lived.
    bot: bool = False
    # The lifetime when none is asked for (0: max_ttl).
    default_ttl: int = 0


def permissions(user: User, roles: list[Role], cluster_mode: object) -> Permissions:
    longest = max_ttl(roles)
    default = 0
    if user.bot:
        longest = min(longest, BOT_MAX_TTL)
        default = min(longest, BOT_DEFAULT_TTL)
    return Permissions(
        bot=user.bot,
        default_ttl=default,
        logins=user_logins(user, roles),
        max_ttl=longest,
        trust_mode=mode_for(effective_trust_mode(cluster_mode, roles), bot=user.bot),
        permit_port_forwarding=any(r.permit_port_forwarding for r in roles),
        permit_pty=any(r.permit_pty for r in roles),
        permit_agent_forwarding=any(r.permit_agent_forwarding for r in roles),
        permit_x11_forwarding=any(r.permit_x11_forwarding for r in roles),
        permit_user_rc=any(r.permit_user_rc for r in roles),
    )


def check_attestation(level: object) -> str:
    if level not in ATTESTATION_TYPES:
        raise UsageError(
            f"invalid device attestation {level!r}: use one of {', '.join(ATTESTATION_TYPES)}"
        )
    return str(level)


def required_attestation(roles: Iterable[Role]) -> str | None:
    """The strictest ``device_attestation`` of the user's roles (an unknown level
    means the strictest there is)."""
    wanted = None
    for role in roles:
        level = role.device_attestation
        if level is None:
            continue
        rank = (
            ATTESTATION_TYPES.index(level)
            if level in ATTESTATION_TYPES
            else len(ATTESTATION_TYPES) - 1
        )
        if wanted is None or rank > ATTESTATION_TYPES.index(wanted):
            wanted = ATTESTATION_TYPES[rank]
    return wanted


def attestation_at_least(level: str, wanted: str | None) -> bool:
    if wanted is None:
        return True
    return level in ATTESTATION_TYPES and ATTESTATION_TYPES.index(level) >= ATTESTATION_TYPES.index(
        wanted
    )
