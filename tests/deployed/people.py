"""A user at their own machine: `dtclient` in a real terminal (pexpect), stock `ssh`.

The password and one-time-code prompts are answered in a pty, as a person meets them
(a pipe takes another code path in dtclient). One-time codes come from the otpauth://
URI the signup shows, as an authenticator app would compute them.
"""

from __future__ import annotations

import functools
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pexpect
import pyotp

from tests.deployed.processes import BIN, LOGIN, PASSWORD, DeployedError, clean_env, stop

if TYPE_CHECKING:
    from tests.deployed.deployment import Deployment


@functools.cache
def asks_for_tokens() -> bool:
    """Whether this build's dtclient asks for tokens at a prompt (--token-file) rather
    than taking them only in argv (--token), as builds before it did."""
    help_text = subprocess.run(
        [str(BIN / "dtclient"), "signup", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean_env(), "COLUMNS": "200"},
    ).stdout
    return "--token-file" in help_text


@dataclass
class Person:
    """A user with their own home (DT_HOME), optionally a TPM, running `dtclient` in a
    terminal and stock `ssh` with the config `dtclient config` prints."""

    deployment: Deployment
    name: str
    tcti: str | None = None
    secret: str | None = None  # the TOTP secret, as an authenticator app would keep it
    last_step: int = 0  # TOTP steps are single use and must increase
    home: Path = field(init=False)
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.home = self.deployment.dir / "people" / self.name
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = clean_env()
        self.env["HOME"] = str(self.home)
        self.env["DT_HOME"] = str(self.home / ".dt")
        if self.tcti:
            self.env["DT_TPM_TCTI"] = self.tcti

    # -- dtclient in a terminal ----------------------------------------------------------

    def terminal(self, *args: str, timeout: float = 60) -> Terminal:
        return Terminal(
            str(BIN / "dtclient"),
            list(args),
            env=self.env,
            cwd=str(self.home),
            encoding="utf-8",
            timeout=timeout,
            dimensions=(50, 250),
        )

    def _finish(self, term: Terminal, what: str) -> str:
        term.expect(pexpect.EOF)
        term.close()
        out = plain(term.before or "")
        if term.exitstatus != 0:
            raise DeployedError(f"{what} exited {term.exitstatus}:\n{out}")
        return out

    def _code(self) -> str:
        """The next one-time code an authenticator app shows, never one already used."""
        assert self.secret, "sign up first"
        totp = pyotp.TOTP(self.secret)
        now = int(time.time() // totp.interval)
        step = max(self.last_step + 1, now)
        if step > now + 1:  # the bastion accepts one step either side; wait for the clock
            time.sleep((step - 1) * totp.interval - time.time() + 0.2)
        self.last_step = step
        return totp.at(step * totp.interval)

    def signup(self, token: str) -> None:
        """`dtclient signup`, pasting the token at its prompt where it asks for one."""
        args = ["signup", "--proxy", self.deployment.proxy, "--ca-pin", self.deployment.ca_pin]
        prompted = asks_for_tokens()
        term = self.terminal(*args) if prompted else self.terminal(*args, "--token", token)
        if prompted:
            term.expect("Signup token")
            term.sendline(token)
        term.expect(r"secret=([A-Z2-7]+)")
        self.secret = term.match.group(1)
        term.expect("New password")
        term.sendline(PASSWORD)
        term.expect("Repeat the password")
        term.sendline(PASSWORD)
        term.expect("One-time code")
        term.sendline(self._code())
        out = self._finish(term, "dtclient signup")
        if "Signed up" not in out:
            raise DeployedError(f"dtclient signup did not say it signed up:\n{out}")

    def login(self, *, password: bool = False, renew_only: bool = False) -> str:
        """`dtclient login`: password and one-time code at the prompts, or a renewal through
        the current certificate (what dtclient does while it is valid). A refused renewal
        asks for the password (builds since issue 13); ``renew_only`` stops there."""
        args = ["login", "--proxy", self.deployment.proxy, "--user", self.name]
        if password:
            args += ["--password", "--ca-pin", self.deployment.ca_pin]
        term = self.terminal(*args)
        asked = term.expect(["Password for", "Renewing"]) == 0
        if not asked:
            asked = term.expect([pexpect.EOF, "Password for"]) == 1
            if asked and renew_only:
                term.close(force=True)
                raise DeployedError(f"the renewal was refused:\n{plain(term.before or '')}")
            if not asked:
                term.close()
                out = plain(term.before or "")
                if term.exitstatus != 0:
                    raise DeployedError(f"dtclient login exited {term.exitstatus}:\n{out}")
                return out
        term.sendline(PASSWORD)
        term.expect("One-time code")
        term.sendline(self._code())
        return self._finish(term, "dtclient login")

    def try_login(self) -> tuple[bool, str]:
        """A renewal attempt whose refusal is an answer, not an error."""
        try:
            return True, self.login(renew_only=True)
        except DeployedError as exc:
            return False, str(exc)

    def enroll(self, token: str, asset_tag: str) -> str:
        """`dtclient device enroll`, pasting the token at its prompt where it asks for one."""
        args = ["device", "enroll", "--asset-tag", asset_tag]
        if asks_for_tokens():
            term = self.terminal(*args, "--token-file", "-")
            term.expect("token")
            term.sendline(token)
        else:
            term = self.terminal(*args, "--token", token)
        return self._finish(term, "dtclient device enroll")

    def dtclient(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(BIN / "dtclient"), *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if ok and proc.returncode != 0:
            raise DeployedError(
                f"dtclient {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
            )
        return proc

    # -- stock ssh -----------------------------------------------------------------------

    @property
    def ssh_config(self) -> Path:
        path = self.home / "ssh_config"
        if not path.exists():
            text = self.dtclient("config").stdout
            path.write_text(text + "\nHost *\n    BatchMode yes\n    ConnectTimeout 10\n")
        return path

    def ssh_args(self, node: str, *cmd: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), f"{LOGIN}@{node}", *cmd]

    def ssh(
        self, node: str = "node-1", *cmd: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.ssh_args(node, *(cmd or ("echo", "reached"))),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def can_reach(self, node: str = "node-1") -> bool:
        proc = self.ssh(node, "echo", "reached")
        return proc.returncode == 0 and "reached" in proc.stdout

    def hold(self, node: str = "node-1", seconds: int = 90) -> Held:
        """A live `ssh -J` session running ``sleep`` on the node, once it is through."""
        return self._hold(node, f"echo held; exec sleep {seconds}")

    def hold_until(self, path: Path, node: str = "node-1") -> Held:
        """A live `ssh -J` session that prints ``finished`` and ends once ``path``
        exists (the node is on this host, so the test decides when it ends)."""
        return self._hold(
            node, f"echo held; while [ ! -e {path} ]; do sleep 0.1; done; echo finished"
        )

    def _hold(self, node: str, command: str) -> Held:
        proc = subprocess.Popen(
            self.ssh_args(node, command),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the node runs the command, or ssh ends
        if line.strip() != "held":
            stop(proc)
            raise DeployedError(
                f"ssh -J did not get through: {proc.stderr.read() if proc.stderr else ''}"
            )
        return Held(proc)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def plain(text: str) -> str:
    """Terminal output without colours, cursor moves and carriage returns."""
    return ANSI.sub("", text)


class Terminal(pexpect.spawn):
    """`pexpect.spawn` whose failed expectations read as the product's own words."""

    def __init__(self, command: str, args: list[str], **kwargs: Any) -> None:
        super().__init__(command, args, **kwargs)
        self.what = " ".join([Path(command).name, *args[:2]])

    def expect(self, pattern: Any, *args: Any, **kwargs: Any) -> int:  # type: ignore[override]
        try:
            return super().expect(pattern, *args, **kwargs)
        except (pexpect.EOF, pexpect.TIMEOUT) as exc:
            seen = plain(self.before or "").strip()
            if isinstance(exc, pexpect.EOF):
                self.close()
                ended = f"it exited {self.exitstatus}"
            else:
                self.close(force=True)
                ended = f"nothing matched within {self.timeout} s"
            raise DeployedError(
                f"{self.what}: waited for {pattern!r} but {ended}; it printed:\n{seen[-1500:]}"
            ) from None


@dataclass
class Held:
    proc: subprocess.Popen

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_cut(self, timeout: float) -> float | None:
        """Seconds until the session ended, or None if it outlived ``timeout``."""
        start = time.monotonic()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return time.monotonic() - start

    def close(self) -> None:
        stop(self.proc)

    def stderr(self) -> str:
        """What ssh printed, once it ended."""
        return self.proc.stderr.read() if self.proc.stderr else ""
