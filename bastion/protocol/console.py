"""Terminal output for dtadmin, dtclient and dt-bastion: the only module importing Rich.

People get Rich tables and spinners; scripts get ``--format json``. Errors always
end as one clear line on stderr and an exit code, never a traceback (set
``DT_DEBUG=1`` to see one when reporting a bug).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NoReturn

from rich.console import Console
from rich.table import Table

from bastion.protocol.errors import DTError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Format(StrEnum):
    """Output format of commands that print data."""

    text = "text"
    json = "json"


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    title: str | None = None,
    empty: str = "(none)",
) -> None:
    if not rows:
        out.print(empty)
        return
    table = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    out.print(table)


def emit(
    fmt: Format,
    data: Any,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    title: str | None = None,
    empty: str = "(none)",
) -> None:
    """What every data command does: JSON for scripts, a table for people."""
    if fmt is Format.json:
        print_json(data)
    else:
        print_table(columns, rows, title=title, empty=empty)


def when(ts: float | None) -> str:
    """A timestamp for a table cell: UTC, to the second, blank when unset."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def say(message: str) -> None:
    out.print(message, markup=False)


def note(message: str) -> None:
    """Something worth knowing that is not the command's output (goes to stderr)."""
    err.print(message, markup=False, style="yellow")


@contextlib.contextmanager
def spinner(message: str) -> Iterator[None]:
    """A spinner while a TPM or network step runs; silent when stderr is not a terminal."""
    if err.is_terminal:
        with err.status(message):
            yield
    else:
        yield


def fail(exc: DTError) -> NoReturn:
    err.print(f"error: {exc.message}", markup=False, style="bold red")
    raise SystemExit(exc.exit_code)


def run_cli(app: Callable[..., Any], prog: str) -> None:
    """Run a Typer app, turning every failure into one line and an exit code."""
    try:
        app(prog_name=prog, standalone_mode=True)
    except DTError as exc:
        fail(exc)
    except KeyboardInterrupt:
        err.print("interrupted", style="red")
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as exc:  # a bug: say so plainly, hide the traceback unless asked
        if os.environ.get("DT_DEBUG"):
            raise
        err.print(
            f"internal error: {type(exc).__name__}: {exc} (set DT_DEBUG=1 for details)",
            markup=False,
            style="bold red",
        )
        raise SystemExit(70) from None
