"""Terminal output for dtadmin, dtclient and dt-bastion: the only module importing Rich.

People get Rich tables and spinners; scripts get ``--format json``. Errors always
end as one clear line on stderr and an exit code, never a traceback (set
``DT_DEBUG=1`` to see one when reporting a bug).

``--format json`` is a contract, the same for every command: a list is a top-level
JSON array of objects; a time is an RFC 3339 UTC string (``rfc3339``); a serial
or any other 64-bit number is a string, since ``jq`` and JavaScript round a JSON
number above 2**53. A table piped off a terminal becomes tab-separated lines
(header first) that never wrap, for ``cut`` and ``awk``.

Rich is imported only when something is drawn for a person (a table or a spinner on a
terminal, a coloured note); plain output, ``--help`` and ``--version`` never load it,
so every command starts quickly (tests/test_cli_conventions.py guards it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NoReturn

from bastion.protocol.errors import DTError

if TYPE_CHECKING:
    import typer
    from rich.console import Console


@functools.cache
def _console(stderr: bool) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def __getattr__(name: str) -> Any:
    """``console.out`` and ``console.err``: the Rich consoles, made when first used."""
    if name in ("out", "err"):
        return _console(name == "err")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_terminal(stream: Any) -> bool:
    """What Rich would decide, without importing it for piped output."""
    if os.environ.get("FORCE_COLOR") or os.environ.get("TTY_COMPATIBLE") == "1":
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


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
    return " ".join(str(value).split()) if not _is_terminal(sys.stdout) else str(value)


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    title: str | None = None,
    empty: str = "(none)",
) -> None:
    if not rows:
        say(empty)
        return
    if not _is_terminal(sys.stdout):
        sys.stdout.write("\t".join(columns) + "\n")
        for row in rows:
            sys.stdout.write("\t".join(_cell(v) for v in row) + "\n")
        sys.stdout.flush()
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(escape(_cell(v)) for v in row))
    _console(False).print(table)


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
    """A line of output, exactly as given (no markup, no emoji codes replaced)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _to_stderr(message: str, style: str) -> None:
    if _is_terminal(sys.stderr):
        _console(True).print(message, markup=False, emoji=False, style=style)
    else:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def note(message: str) -> None:
    """Something worth knowing that is not the command's output (goes to stderr)."""
    _to_stderr(message, "yellow")


_spinning: list[Any] = []  # the spinners running now (Rich Status), innermost last


@contextlib.contextmanager
def spinner(message: str) -> Iterator[None]:
    """A spinner while a TPM or network step runs; silent when stderr is not a terminal.

    A prompt asked while it runs (a host CA to trust, a password the bastion asks for)
    goes through ``prompting``, which stops it first: it never draws over a prompt.
    """
    if not _is_terminal(sys.stderr):
        yield
        return
    status = _console(True).status(message)
    status.start()
    _spinning.append(status)
    try:
        yield
    finally:
        _spinning.remove(status)
        status.stop()


@contextlib.contextmanager
def prompting() -> Iterator[None]:
    """While a person answers a prompt: no spinner draws, and Ctrl-C ends it at once.

    Prompts can be asked from inside the event loop (asyncssh asks for host trust and
    keyboard-interactive answers there), where asyncio's own SIGINT handler would only
    cancel a task and leave ``input()`` waiting for Enter; the default handler raises
    KeyboardInterrupt in the prompt itself.
    """
    import signal
    import threading

    paused = list(_spinning)
    for status in paused:
        status.stop()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    for status in paused:  # not after Ctrl-C: nothing draws over the last words
        status.start()


def fail(exc: DTError) -> NoReturn:
    _to_stderr(f"error: {exc.message}", "bold red")
    raise SystemExit(exc.exit_code)


# -- the command line: the same conventions for dtclient, dtadmin and dt-bastion ---------------

HELP_OPTIONS = ["-h", "--help"]


def cli_app(help: str, **settings: Any) -> typer.Typer:
    """The root Typer app of a dt-bastion command: ``-h`` and ``--help``, shell completion
    (``--install-completion``), help text printed as written (no Rich markup, so
    ``[bastion]`` stays ``[bastion]``), no pretty tracebacks; ``run_cli`` adds ``--version``.
    """
    import typer

    options: dict[str, Any] = {
        "help": help,
        "no_args_is_help": True,
        "pretty_exceptions_enable": False,
        "add_completion": True,
        "rich_markup_mode": None,
        "context_settings": {"help_option_names": HELP_OPTIONS},
    }
    return typer.Typer(**{**options, **settings})


def version_text(prog: str) -> str:
    from bastion import __version__

    return f"{prog} {__version__}"


def _plain_help(command: Any) -> None:
    """Help as written, for every subcommand too (Typer sets markup per sub-app)."""
    if hasattr(command, "rich_markup_mode"):
        command.rich_markup_mode = None
    for sub in getattr(command, "commands", {}).values():
        _plain_help(sub)


def _version_option(prog: str) -> Any:
    from typer.core import TyperOption

    def show(ctx: Any, _param: Any, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            say(version_text(prog))
            ctx.exit(0)

    return TyperOption(
        param_decls=["--version"],
        type=bool,
        is_flag=True,
        default=False,
        expose_value=False,
        is_eager=True,
        callback=show,
        help="Show the version and exit.",
    )


def run_cli(app: typer.Typer, prog: str) -> None:
    """Run a Typer app, turning every failure into one line and an exit code."""
    if sys.argv[1:] == ["--version"]:  # the common case, without building the commands
        say(version_text(prog))
        raise SystemExit(0)
    try:
        import typer.main

        command = typer.main.get_command(app)
        _plain_help(command)
        command.params.append(_version_option(prog))
        command.main(prog_name=prog, standalone_mode=True)
    except DTError as exc:
        fail(exc)
    except KeyboardInterrupt:
        _to_stderr("interrupted", "red")
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as exc:  # a bug: say so plainly, hide the traceback unless asked
        if os.environ.get("DT_DEBUG"):
            raise
        _to_stderr(
            f"internal error: {type(exc).__name__}: {exc} (set DT_DEBUG=1 for details)",
            "bold red",
        )
        raise SystemExit(70) from None
