"""What people expect of every command line (dtclient, dtadmin, dt-bastion): --version,
-h as well as --help, shell completion, help printed as written (a `[bastion]` is not
eaten as markup), and a client that starts without loading what only a connection needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bastion import __version__

BIN = Path(os.environ.get("DT_TEST_BIN") or Path(sys.executable).parent)
COMMANDS = ("dtclient", "dtadmin", "dt-bastion")


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@pytest.mark.parametrize("prog", COMMANDS)
def test_version(prog: str):
    proc = run(prog, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{prog} {__version__}\n"


@pytest.mark.parametrize("prog", COMMANDS)
def test_h_is_help_and_help_lists_version_and_completion(prog: str):
    long, short = run(prog, "--help"), run(prog, "-h")
    assert long.returncode == 0 and short.returncode == 0, short.stderr
    assert short.stdout == long.stdout
    for option in ("--version", "--install-completion", "--show-completion", "-h, --help"):
        assert option in long.stdout, f"{prog} --help lacks {option}:\n{long.stdout}"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("dtclient", "device", "-h"), "enroll"),
        (("dtadmin", "users", "-h"), "add"),
        (("dt-bastion", "serve", "-h"), "--listen"),
    ],
)
def test_h_works_on_subcommands(argv: tuple[str, ...], expected: str):
    proc = run(*argv)
    assert proc.returncode == 0 and expected in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    ("prog", "words", "expected"),
    [
        ("dtclient", "dtclient lo", {"login", "logout"}),
        ("dtadmin", "dtadmin users ", {"add", "ls", "rm"}),
        ("dt-bastion", "dt-bastion s", {"serve"}),
    ],
)
def test_shell_completion(prog: str, words: str, expected: set[str]):
    var = "_" + prog.replace("-", "_").upper() + "_COMPLETE"
    cword = str(len(words.split()) - (0 if words.endswith(" ") else 1))
    proc = run(prog, env={var: "complete_bash", "COMP_WORDS": words, "COMP_CWORD": cword})
    assert proc.returncode == 0, proc.stderr
    assert expected <= set(proc.stdout.split()), proc.stdout
    # With shell detection on, typer reads --show-completion as a flag and asks
    # shellingham for the parent shell: under make's /bin/sh (any recipe with quotes)
    # that is "sh", which has no script. Typer's own switch makes it take "bash".
    script = run(
        prog, "--show-completion", "bash",
        env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
    ).stdout  # fmt: skip
    assert f"_{prog.replace('-', '_')}_completion" in script, script


def test_help_text_is_printed_as_written():
    # `--config`'s help says "TOML file with [bastion] settings"; Rich markup ate the
    # `[bastion]`, leaving "TOML file with  settings".
    out = run("dt-bastion", "serve", "--help").stdout
    assert "TOML file with [bastion] settings" in out, out


HEAVY = ("asyncssh", "cryptography", "tpm2_pytss", "rich", "pydantic", "asyncio", "qrcode")


@pytest.mark.parametrize(
    "argv",
    [("--version",), ("--help",), ("ls", "--help"), ("ssh", "--help"), ("login", "--help")],
)
def test_dtclient_starts_without_loading_what_only_a_connection_needs(argv: tuple[str, ...]):
    # -X importtime lists every module the real entry point imports (no timing asserted).
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(BIN / "dtclient"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = {
        line.rpartition("|")[2].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert not heavy, f"dtclient {' '.join(argv)} imports {heavy[:10]}"


def test_asyncssh_is_imported_without_the_slow_liboqs_search():
    # asyncssh asks ctypes.util.find_library for liboqs; absent, that ran ldconfig, gcc
    # and ld (50-150 ms a run). client.sshlib answers from the linker cache instead.
    import ctypes.util

    from client import sshlib

    assert ctypes.util.find_library is sshlib._standard, "find_library was left patched"
    assert sshlib.find_library("c") == ctypes.util.find_library("c")  # found as before
    assert sshlib.find_library("dt-bastion-no-such-library") is None
