"""`make demo`: walk the getting-started story with real commands and their real output.

Each step runs a real command (dtadmin, dtclient, ssh-keygen, ssh), prints it and
what it printed, and checks that it behaved as the guide says. The demo exits 0
only if every step did. Everything lives in one temporary folder (or ./demo-state
with --keep) and every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"


class DemoFailed(Exception):
    pass


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.state = workdir / "state"
        self.env = dict(os.environ)
        self.env["PATH"] = f"{VENV_BIN}:{self.env.get('PATH', '')}"
        self.env["DT_STATE"] = str(self.state)
        self.env["DT_HOME"] = str(workdir / "home" / ".dt")
        self.env.pop("SSH_AUTH_SOCK", None)
        self.env["COLUMNS"] = "120"  # Rich tables, as a person's terminal would show them
        self.step_no = 0
        self.cleanups: list[Callable[[], None]] = []

    def heading(self, text: str) -> None:
        self.step_no += 1
        print(f"\n\033[1m== {self.step_no}. {text}\033[0m", flush=True)

    def run(
        self,
        args: list[str],
        *,
        expect_rc: int | None = 0,
        expect: str | None = None,
        input: str | None = None,
        show: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        print(f"$ {shlex.join(args)}", flush=True)
        proc = subprocess.run(
            args,
            cwd=self.workdir,
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = (proc.stdout + proc.stderr).rstrip()
        if show and output:
            print("\n".join("  " + line for line in output.splitlines()), flush=True)
        if expect_rc is not None and proc.returncode != expect_rc:
            raise DemoFailed(f"{args[0]} exited {proc.returncode}, expected {expect_rc}")
        if expect is not None and expect not in output:
            raise DemoFailed(f"expected {expect!r} in the output of {args[0]}")
        return proc

    def close(self) -> None:
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception as exc:  # cleanup must go on
                print(f"cleanup: {exc}", file=sys.stderr)


def story(demo: Demo) -> None:
    demo.heading("Create a cluster: a user CA, a host CA and the preset roles")
    demo.run(["dtadmin", "init", "--cluster", "demo"])

    demo.heading("Add a user with the access, auditor and editor roles")
    demo.run(
        ["dtadmin", "users", "add", "alice", "--roles", "access,auditor,editor", "--logins", "root"]
    )
    demo.run(["dtadmin", "users", "ls"])

    demo.heading("Sign a certificate for alice's key, as `tctl auth sign` would")
    key = demo.workdir / "alice_key"
    demo.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice", "-f", str(key)])
    demo.run(
        ["dtadmin", "auth", "sign", "--user", "alice", "--pubkey", f"{key}.pub", "--ttl", "1h"]
    )

    demo.heading("OpenSSH reads it: principals, validity and the dt-bastion extensions")
    demo.run(["ssh-keygen", "-L", "-f", f"{key}-cert.pub"], expect="dt-user@dt-bastion")

    demo.heading("What nodes need to trust the cluster")
    demo.run(["dtadmin", "ca", "export", "--type", "user"])
    demo.run(["dtadmin", "ca", "export", "--type", "host"])

    demo.heading("Every change left an audit event")
    demo.run(["dtadmin", "audit", "ls"], expect="cert.create")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keep", action="store_true", help="keep ./demo-state and print how to use it by hand"
    )
    args = parser.parse_args()
    if args.keep:
        workdir = ROOT / "demo-state"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir()
    else:
        workdir = Path(tempfile.mkdtemp(prefix="dt-demo-"))
    demo = Demo(workdir)
    try:
        story(demo)
    except DemoFailed as exc:
        print(f"\n\033[1;31mdemo failed: {exc}\033[0m", file=sys.stderr)
        return 1
    finally:
        demo.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n\033[1;32mdemo passed: every step behaved as the guide says\033[0m")
    if args.keep:
        print(f"state kept in {workdir}; try: DT_STATE={demo.state} dtadmin audit ls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
