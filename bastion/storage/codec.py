"""How values are written into SQLite columns: compact, sorted JSON, and role specs.

One encoding, so a value written by one bastion compares equal byte for byte when
read by another, and `dtadmin get roles/NAME` shows exactly what is stored.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from bastion.authz.records import Role, Rule


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def role_to_spec(role: Role) -> dict[str, Any]:
    spec = asdict(role)
    spec["rules"] = [{"resources": list(r.resources), "verbs": list(r.verbs)} for r in role.rules]
    spec["logins"] = list(role.logins)
    spec["node_labels"] = {k: list(v) for k, v in role.node_labels.items()}
    return spec


def role_from_spec(spec: dict[str, Any]) -> Role:
    spec = dict(spec)
    spec["logins"] = tuple(spec.get("logins", ()))
    spec["node_labels"] = {k: tuple(v) for k, v in spec.get("node_labels", {}).items()}
    spec["rules"] = tuple(
        Rule(tuple(r["resources"]), tuple(r["verbs"])) for r in spec.get("rules", ())
    )
    return Role(**spec)
