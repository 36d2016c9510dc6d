"""Role decisions: trust mode strictness, logins, node labels."""

from __future__ import annotations

import pytest

from bastion.authz import rbac
from bastion.authz.records import Node, Role, User
from bastion.protocol.errors import UsageError

REQ = Role("req", device_trust_mode="required")
OFF = Role("off", device_trust_mode="off")
PLAIN = Role("plain")


@pytest.mark.parametrize(
    ("cluster", "roles", "expected"),
    [
        ("optional", [PLAIN], "optional"),
        ("off", [PLAIN], "off"),
        ("off", [REQ], "required"),
        ("required", [OFF], "required"),
        ("optional", [OFF], "optional"),
        # a missing or unknown setting never means "off"
        (None, [PLAIN], "required"),
        ("bogus", [OFF], "required"),
        ("off", [Role("weird", device_trust_mode="sometimes")], "required"),
    ],
)
def test_effective_trust_mode(cluster, roles, expected):
    assert rbac.effective_trust_mode(cluster, roles) == expected


def test_internal_logins_expand_from_user_traits():
    user = User("alice", ("access",), ("root", "ubuntu"))
    roles = [Role("access", logins=(rbac.INTERNAL_LOGINS,)), Role("x", logins=("deploy", "root"))]
    assert rbac.user_logins(user, roles) == ("root", "ubuntu", "deploy")


def test_max_ttl_is_the_shortest():
    assert rbac.max_ttl([Role("a", max_session_ttl=3600), Role("b")]) == 3600


@pytest.mark.parametrize(
    ("wanted", "labels", "ok"),
    [
        ({"*": ("*",)}, {}, True),
        ({"env": ("prod",)}, {"env": "prod"}, True),
        ({"env": ("prod",)}, {"env": "dev"}, False),
        ({"env": ("*",)}, {"team": "a"}, False),
        ({"env": ("prod",), "team": ("a",)}, {"env": "prod"}, False),
        ({}, {"env": "prod"}, False),
    ],
)
def test_node_labels(wanted, labels, ok):
    assert rbac.node_allowed([Role("r", node_labels=wanted)], Node("n", "h", 22, labels)) is ok


def test_preset_roles():
    names = {r.name for r in rbac.PRESET_ROLES}
    assert names == {"access", "auditor", "editor", "device-admin", "require-trusted-device"}
    by = {r.name: r for r in rbac.PRESET_ROLES}
    assert by["editor"].allows("device", "enroll") and by["device-admin"].allows("device", "enroll")
    assert not by["access"].allows("device", "enroll")
    assert by["require-trusted-device"].device_trust_mode == "required"


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "../etc", "é"])
def test_bad_names(bad):
    with pytest.raises(UsageError):
        rbac.check_name("user", bad)


@pytest.mark.parametrize("bad", ["Root", "-dt-jump", "a b", "x" * 40, ""])
def test_bad_logins(bad):
    with pytest.raises(UsageError):
        rbac.check_logins([bad])
