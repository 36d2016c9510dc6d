"""The product as an admin deploys it, and nothing else.

`dt-bastion serve` is the only long-lived process holding the cluster database; the
admin runs short `dtadmin` commands beside it, users run `dtclient` in a real
terminal (pexpect) and stock `ssh -J`, nodes are stock `sshd`, TPMs are swtpm. This
module never imports the product and never opens its database: every fact it
reports comes from a command's output (`dtadmin ... --format json`). A test helper
that held its own connection would keep SQLite's locks alive for the bastion and hide
exactly the bugs this tier exists to catch.

The commands come from DT_TEST_BIN (see processes.py), so the same tests can be
pointed at another build. bench/soak.py builds on the same classes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.deployed.people import Person
from tests.deployed.processes import (
    BIN,
    DB_NAME,
    LOGIN,
    SSHD,
    DeployedError,
    clean_env,
    free_port,
    stop,
    wait_for,
    wait_for_port,
)

# -- the cluster, as the admin runs it ----------------------------------------------------------


@dataclass
class Node:
    name: str
    port: int
    dir: Path
    proc: subprocess.Popen


@dataclass
class Bastion:
    port: int
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Deployment(contextlib.ExitStack):
    """One cluster: its state dir, `dt-bastion serve`, sshd nodes, and the admin's `dtadmin`.

    Everything lives under ``workdir``; every process is stopped on exit, in reverse
    order of starting.
    """

    def __init__(self, workdir: Path, *, cluster: str = "deployed.test") -> None:
        super().__init__()
        self.dir = workdir
        self.cluster = cluster
        self.state = workdir / "state"
        self.bastion: Bastion | None = None
        self.env = clean_env()
        self.env["DT_STATE"] = str(self.state)
        self._bastion_runs = 0

    def __enter__(self) -> Deployment:
        super().__enter__()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.admin("init", "--cluster", self.cluster)
        return self

    # -- dtadmin ----------------------------------------------------------------

    def admin(
        self, *args: str, ok: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run one `dtadmin` the way an admin does; fail on a non-zero exit unless ``ok=False``."""
        proc = subprocess.run(
            [str(BIN / "dtadmin"), *args],
            env=self.env,
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if ok and proc.returncode != 0:
            raise DeployedError(
                f"dtadmin {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def admin_json(self, *args: str) -> Any:
        return json.loads(self.admin(*args, "--format", "json").stdout)

    @functools.cached_property
    def ca_pin(self) -> str:
        """The host CA fingerprint users pin (`dtclient ... --ca-pin`), as the admin shares it."""
        return self.admin_json("ca", "export", "--type", "host")["fingerprint"]

    def add_user(self, name: str, roles: str = "access") -> str:
        """`dtadmin users add`; returns the signup token it prints."""
        out = self.admin("users", "add", name, "--roles", roles, "--logins", LOGIN).stdout
        return token_in(out, "dtadmin users add")

    def add_device(self, asset_tag: str, owner: str) -> str:
        """`dtadmin device add --enroll`; returns the enrollment token it prints."""
        out = self.admin(
            "device", "add", "--asset-tag", asset_tag, "--owner", owner, "--enroll"
        ).stdout
        return token_in(out, "dtadmin device add --enroll")

    def sign_up(self, name: str, roles: str = "access", *, tcti: str | None = None) -> Person:
        """A new user as the guide has it: `dtadmin users add`, then `dtclient signup` and
        `dtclient login` (password and one-time code) in their own terminal."""
        token = self.add_user(name, roles)
        person = Person(self, name, tcti=tcti)
        person.signup(token)
        person.login()
        return person

    def enroll(self, person: Person, asset_tag: str) -> None:
        """`dtadmin device add --enroll`, `dtclient device enroll` with that token and the
        person's TPM, and a fresh `dtclient login` so the certificate carries the device."""
        token = self.add_device(asset_tag, person.name)
        out = person.enroll(token, asset_tag)
        if "enrolled" not in out:
            raise DeployedError(f"dtclient device enroll did not say it enrolled:\n{out}")
        person.login()

    def lock_user(self, user: str) -> str:
        return self._lock("--user", user)

    def lock_device(self, asset_tag: str) -> str:
        return self._lock("--device", asset_tag)

    def _lock(self, *args: str) -> str:
        out = self.admin("lock", *args).stdout
        match = re.search(r"lock id (\S+?)\)", out)
        if match is None:
            raise DeployedError(f"dtadmin lock printed no lock id:\n{out}")
        return match.group(1)

    def audit(self, type: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
        args = ["audit", "ls", "--limit", "100000"]
        if type:
            args += ["--type", type]
        if user:
            args += ["--user", user]
        return self.admin_json(*args)

    # -- the processes ------------------------------------------------------------

    def add_node(self, name: str = "node-1") -> Node:
        """A stock sshd trusting the user CA, with a host certificate from `dtadmin host sign`,
        put in the inventory with `dtadmin nodes add`."""
        d = self.dir / name
        d.mkdir()
        key = d / "ssh_host_ed25519_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True
        )
        self.admin("host", "sign", f"{key}.pub", "--principals", f"{name},127.0.0.1,localhost")
        user_ca = self.admin_json("ca", "export", "--type", "user")["public_key"]
        (d / "user_ca.pub").write_text(user_ca + "\n")
        port = free_port()
        (d / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {key}\n"
            f"HostCertificate {key}-cert.pub\nTrustedUserCAKeys {d}/user_ca.pub\n"
            f"PidFile {d}/sshd.pid\nStrictModes no\nUsePAM no\nAuthorizedKeysFile none\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nMaxStartups 200\nMaxSessions 100\n"
            "LogLevel VERBOSE\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.callback(stop, proc)
        wait_for_port(port, proc, f"sshd {name}")
        self.admin("nodes", "add", name, "--addr", f"127.0.0.1:{port}", "--labels", "env=test")
        return Node(name, port, d, proc)

    def start_bastion(self, *extra_args: str, env: dict[str, str] | None = None) -> Bastion:
        """`dt-bastion serve` on a free port (the same port again after a restart);
        SIGTERM drains sessions left open for 2 s (``--set drain_timeout=N`` for more);
        ``env``: variables added to its environment (NOTIFY_SOCKET, as systemd sets)."""
        if self.bastion is not None and self.bastion.proc.poll() is None:
            raise DeployedError("the bastion is already running")
        if self.bastion is None:  # stopped before whatever was started before it
            self.callback(self.stop_bastion)
        port = self.bastion.port if self.bastion is not None else free_port()
        self._bastion_runs += 1
        log_path = self.dir / f"bastion-{self._bastion_runs}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(BIN / "dt-bastion"), "serve", "--state", str(self.state),
                 "--listen", f"127.0.0.1:{port}", "--set", "drain_timeout=2", "--workers", "1",
                 *extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**self.env, "PYTHONUNBUFFERED": "1", **(env or {})},
            )  # fmt: skip
        self.bastion = bastion = Bastion(port, proc, log_path)

        def ready() -> bool:  # its own word, not a probe connection that would be audited
            if proc.poll() is not None:
                raise DeployedError(f"dt-bastion serve exited {proc.returncode}:\n{bastion.log()}")
            return "dt-bastion ready on" in bastion.log()

        wait_for("dt-bastion serve to say it is ready", ready, timeout=30)
        return bastion

    def stop_bastion(self, sig: int = signal.SIGTERM) -> int | None:
        """SIGTERM, as systemd stops it (or SIGKILL, as a crash); the exit code."""
        if self.bastion is None:
            return None
        return stop(self.bastion.proc, sig, timeout=15)

    @property
    def proxy(self) -> str:
        assert self.bastion is not None, "start the bastion first"
        return f"127.0.0.1:{self.bastion.port}"

    def db_files(self) -> dict[str, int]:
        """Inode of cluster.db and of each of its -wal and -shm that exists (a stat, no open)."""
        found = {}
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                found[DB_NAME + suffix] = (self.state / (DB_NAME + suffix)).stat().st_ino
        return found


def token_in(out: str, what: str) -> str:
    """The token a dtadmin command printed for the admin to pass on: on a line of its
    own under a heading that ends in ':' (or, from older builds, in a `--token X`)."""
    match = re.search(r"--token ([A-Za-z0-9_-]{20,})", out)
    if match:
        return match.group(1)
    lines = out.splitlines()
    for heading, line in zip(lines, lines[1:], strict=False):
        if "token" in heading.lower() and heading.rstrip().endswith(":"):
            if re.fullmatch(r"[A-Za-z0-9_-]{20,}", line.strip()):
                return line.strip()
    raise DeployedError(f"{what} printed no token:\n{out}")


def db_holders(state: Path) -> dict[int, str]:
    """Every process (pid: command) with cluster.db or its -wal/-shm open or mapped."""
    names = {str(state / (DB_NAME + suffix)) for suffix in ("", "-wal", "-shm")}
    holders = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            maps = (proc / "maps").read_text()
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        if names.intersection(fds) or any(name in maps for name in names):
            holders[int(proc.name)] = cmd.strip()
    return holders


def integrity_check(state: Path) -> str:
    """SQLite's own ``PRAGMA integrity_check`` of a *stopped* cluster's database, run in a
    separate process (this one never opens it). Only call it when no product process runs."""
    code = (
        "import sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1])\n"
        "print('\\n'.join(r[0] for r in c.execute('PRAGMA integrity_check')))\n"
        "c.close()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(state / DB_NAME)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (proc.stdout + proc.stderr).strip()
