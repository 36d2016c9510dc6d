"""The state interface: SQLiteStore implements StateStore, and the shells need no more.

A PostgreSQL store is written against the protocol; these tests keep the protocol and
the SQLite store from drifting apart, and keep the shells from reaching past it.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from pathlib import Path

import pytest

from bastion import storage
from bastion.storage import DB_NAME, SQLiteStore, StateStore, Store, role_from_spec, role_to_spec

ROOT = Path(__file__).resolve().parents[1]
CONTEXT_MANAGERS = {"transaction", "read_transaction", "savepoint"}
# SQLite's own, outside the protocol: the file a second connection opens, the
# directory of the keys beside it, and the sqlite-utils handle migrations and a few
# tests use.
SQLITE_ONLY = {"path", "state_dir", "db", "open", "memory"}
# PostgreSQL's own: its URL (never with a password) and the sweep's grace.
POSTGRES_ONLY = {"path", "state_dir", "url", "open", "dead_after"}


def protocol_members() -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(StateStore).items()
        if callable(member) and not name.startswith("_")
    }


def test_old_imports_still_work():
    assert Store is SQLiteStore and DB_NAME == "cluster.db"
    assert role_from_spec(role_to_spec(role_from_spec({"name": "r"}))).name == "r"
    assert set(storage.__all__) >= {"Store", "DB_NAME", "role_to_spec", "role_from_spec"}


def _postgres_store():
    from bastion.storage.postgres import PostgresStore

    return PostgresStore


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("name", sorted(protocol_members()))
def test_each_store_has_every_protocol_member_with_its_signature(name, backend):
    want = protocol_members()[name]
    cls = SQLiteStore if backend == "sqlite" else _postgres_store()
    have = inspect.signature(getattr(cls, name))

    def shape(sig: inspect.Signature) -> list[tuple]:
        return [(p.name, p.kind, p.default, p.annotation) for p in sig.parameters.values()]

    assert shape(have) == shape(want), f"{name}{have} differs from StateStore.{name}{want}"
    if name in CONTEXT_MANAGERS:
        assert want.return_annotation == "AbstractContextManager[None]"
        assert have.return_annotation == "Iterator[None]"  # a @contextmanager
    else:
        assert have.return_annotation == want.return_annotation, name


def test_each_store_is_a_state_store(any_store):
    store = any_store
    try:
        assert isinstance(store, StateStore)
        with store.transaction(), store.savepoint():
            pass
        with store.read_transaction():
            pass
        assert isinstance(store.transaction(), contextlib.AbstractContextManager)
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_every_public_store_method_is_in_the_protocol(backend):
    """A method added to one store without the protocol is one the other store lacks."""
    cls = SQLiteStore if backend == "sqlite" else _postgres_store()
    own = SQLITE_ONLY if backend == "sqlite" else POSTGRES_ONLY
    public = {n for n in dir(cls) if not n.startswith("_")} - own
    assert public == set(protocol_members())


def test_the_shells_use_only_the_protocol():
    """Every ``store.<name>`` the shells write is a protocol member."""
    used: dict[str, set[str]] = {}
    for path in [*ROOT.glob("bastion/**/*.py"), *ROOT.glob("client/**/*.py")]:
        if path.is_relative_to(ROOT / "bastion" / "storage"):
            continue
        for name in re.findall(r"\bstore\.([A-Za-z_]\w*)", path.read_text()):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    # Not even a backend's own (path, db, url): the shells run on either store.
    unknown = {n: sorted(p) for n, p in used.items() if n not in protocol_members()}
    assert not unknown, f"store calls outside StateStore: {unknown}"
