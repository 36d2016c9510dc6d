"""What every dtadmin command shares: the state directory, the acting admin, output."""

from __future__ import annotations

import contextlib
import getpass
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion import audit
from bastion.cluster import Cluster, default_state_dir
from bastion.storage import StateStore, database_url

StateOpt = Annotated[
    Path | None,
    typer.Option(
        "--state",
        help="Cluster state directory (default: $DT_STATE or /var/lib/dt-bastion).",
        show_default=False,
    ),
]


def state_dir(ctx: typer.Context, override: Path | None = None) -> Path:
    if override is not None:
        return override
    root = ctx.find_root()
    value = (root.obj or {}).get("state") if isinstance(root.obj, dict) else None
    return Path(value) if value else default_state_dir()


def database(ctx: typer.Context) -> str | None:
    """The PostgreSQL URL: ``--database``, else $DT_DATABASE; None: SQLite."""
    root = ctx.find_root()
    value = (root.obj or {}).get("database") if isinstance(root.obj, dict) else None
    return database_url(value)


def open_cluster(ctx: typer.Context, override: Path | None = None) -> Cluster:
    cluster = Cluster.open(state_dir(ctx, override), database=database(ctx))
    ctx.call_on_close(cluster.close)
    return cluster


@contextlib.contextmanager
def audited(store: StateStore, event: str, **fields: Any) -> Iterator[None]:
    """A change and its audit event, committed together or not at all."""
    with store.transaction():
        yield
        audit.record(store, event, **fields)


def actor() -> str:
    """Who is running dtadmin, for the audit log (the real user behind sudo)."""
    return os.environ.get("SUDO_USER") or _login_name()


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def split_csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def new_app(help_text: str) -> typer.Typer:
    return typer.Typer(help=help_text, no_args_is_help=True, pretty_exceptions_enable=False)
