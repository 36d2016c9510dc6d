"""The import-linter contracts in pyproject.toml name every module of the house.

They are lists of forbidden modules, so a new top-level module would slip past them
unnoticed; this keeps the lists whole. ``make lint`` runs the contracts themselves.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "bastion.protocol is the floor: it imports nothing else of the project": {"bastion.protocol"},
    "bastion.authz decides purely: the contract only, no storage, SSH, sockets or clock": {
        "bastion.protocol",
        "bastion.authz",
    },
    "dtclient imports nothing of bastion but the contract": {"bastion.protocol"},
    "dt-node-principals is light: the contract and the core only, for a node to install": {
        "bastion.protocol",
        "bastion.authz",
        "bastion.node_principals",
    },
}


def top_level_modules() -> set[str]:
    names = set()
    for path in (ROOT / "bastion").iterdir():
        if path.name.startswith(("_", ".")):
            continue
        if path.suffix == ".py" or (path / "__init__.py").exists():
            names.add(f"bastion.{path.stem}")
    return names


def test_every_module_of_the_house_is_named_in_each_contract():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = {c["name"]: c for c in config["contracts"]}
    assert set(contracts) == set(ALLOWED)
    for name, contract in contracts.items():
        forbidden = {m for m in contract["forbidden_modules"] if m.startswith("bastion.")}
        missing = top_level_modules() - ALLOWED[name] - forbidden
        assert not missing, f"{name}: add {sorted(missing)} to its forbidden_modules"
