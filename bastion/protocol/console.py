"""Terminal output for dtadmin, dtclient and dt-bastion: the only module importing Rich.

People get Rich tables and spinners; scripts get ``--format json``. Errors always
end as one clear line on stderr and an exit code, never a traceback (set
``DT_DEBUG=1`` to see one when reporting a bug).

``--format json`` is a contract, the same for every command: a list is a top-level
JSON array of objects; a time is an RFC 3339 UTC string (``rfc3339``); a serial
or any other 64-bit number is a string, since ``jq`` and JavaScript round a JSON
number above 2**53. A table piped off a terminal becomes tab-separated lines
(header first) that never wrap, for ``cut`` and ``awk``.
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
from rich.markup import escape
from rich.table import Table

from bastion.protocol.errors import DTError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Format(StrEnum):
    """Output format of commands that print data."""

    text = "text"
    json = "json"


def rfc3339(ts: float | None) -> str | None:
    """A time for JSON output: RFC 3339 in UTC to the second, None when unset."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def _cell(value: Any) -> str:
    """One table cell; a tab or newline inside would break the TSV a script reads."""
    if value is None:
        return ""
    return " ".join(str(value).split()) if not out.is_terminal else str(value)


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    title: str | None = None,
    empty: str = "(none)",
) -> None:
    if not rows:
        out.print(empty, markup=False)
        return
    if not out.is_terminal:
        sys.stdout.write("\t".join(columns) + "\n")
        for row in rows:
            sys.stdout.write("\t".join(_cell(v) for v in row) + "\n")
        sys.stdout.flush()
        return
    table = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(escape(_cell(v)) for v in row))
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
