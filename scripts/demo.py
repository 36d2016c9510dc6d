"""`make demo`: walk the getting-started story with real commands and their real output.

Each step runs a real command (dtadmin, dtclient, ssh-keygen, ssh), prints it and
what it printed, and checks that it behaved as the guide says. The demo exits 0
only if every step did. Everything lives in one temporary folder and every process it
starts is stopped at the end. With --ha, the story of several bastions on PostgreSQL
behind HAProxy instead (scripts/demo_ha.py). With --keep, the folder is ./demo-state (or --dir) and the
node, the bastion and the software TPM keep running, each in a session of its own, so
the story can be continued by hand; the demo prints their PIDs and how to stop them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
sys.path.insert(0, str(ROOT))
PASSWORD = "correct horse battery staple"
MARKER = ".dt-demo"  # in a --keep folder: the next --keep may empty it

from bastion.credentials import totp_now  # noqa: E402

if TYPE_CHECKING:
    from tests.tpm_eventlog import SyntheticBoot


class DemoFailed(Exception):
    pass


class Demo:
    def __init__(self, workdir: Path, *, keep: bool = False) -> None:
        self.workdir = workdir
        self.keep = keep
        self.state = workdir / "state"
        self.env = dict(os.environ)
        self.env["PATH"] = f"{VENV_BIN}:{self.env.get('PATH', '')}"
        self.env["DT_STATE"] = str(self.state)
        self.env["DT_HOME"] = str(workdir / "home" / ".dt")
        self.env.pop("SSH_AUTH_SOCK", None)
        self.env["COLUMNS"] = "120"  # Rich tables, as a person's terminal would show them
        self.step_no = 0
        self.cleanups: list[Callable[[], None]] = []
        self._stack = contextlib.ExitStack()
        self.servers: list = []  # type: ignore[type-arg]
        self.cleanups.append(self._stack.close)

    @property
    def pids(self) -> list[int]:
        return [server.proc.pid for server in self.servers]

    def enter(self, start):  # type: ignore[no-untyped-def]
        """Start a server for the rest of the demo: ``start(detach)`` gives its context.

        Stopped at the end, unless the demo passed with --keep (see keep_running)."""
        server = self._stack.enter_context(start(self.keep))
        self.servers.append(server)
        if self.keep:  # written as each starts: --stop also cleans up after a killed demo
            self._write_pids()
        return server

    def defer(self, stop: Callable[[], object]) -> None:
        """Call ``stop`` at the end, in reverse order with the servers entered."""
        self._stack.callback(stop)

    def check(self, ok: object, what: str) -> None:
        """A step's claim that no command's exit code shows: the demo fails without it."""
        if not ok:
            raise DemoFailed(what)

    def _write_pids(self) -> None:
        (self.workdir / "demo.pids").write_text("".join(f"{pid}\n" for pid in self.pids))

    def keep_running(self) -> None:
        """--keep: leave the servers running after the demo exits. They were started in
        sessions of their own (a Ctrl-C or hang-up to `make` does not reach them); their
        contexts now end without stopping them, and their PIDs are written down."""
        for server in self.servers:
            server.kept = True
        self._write_pids()

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
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        print(f"$ {shlex.join(args)}", flush=True)
        proc = subprocess.run(
            args,
            cwd=self.workdir,
            env={**self.env, **(env or {})},
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

    def signup(self, proxy: str, token: str, pin: str) -> str:
        """`dtclient signup`, answering like a person with an authenticator app.

        The token is pasted at the prompt, never put on the command line (where every
        local user could read it)."""
        args = ["dtclient", "signup", "--proxy", proxy, "--ca-pin", pin]
        print(f"$ {shlex.join(args)}    # then paste the token when it asks", flush=True)
        proc = subprocess.Popen(
            args,
            cwd=self.workdir,
            env=self.env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin and proc.stdout
        proc.stdin.write(token + "\n")
        proc.stdin.flush()
        secret = None
        for line in proc.stdout:
            print("  " + line.rstrip(), flush=True)
            match = re.search(r"secret=([A-Z2-7]+)", line)
            if match:
                secret = match.group(1)
                break
        if secret is None:
            raise DemoFailed("signup showed no otpauth:// URI")
        proc.stdin.write(f"{PASSWORD}\n{PASSWORD}\n{totp_now(secret)}\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
        print("\n".join("  " + x for x in (out + err).strip().splitlines()), flush=True)
        if proc.returncode != 0:
            raise DemoFailed("signup failed")
        return secret

    def first_login(self, proxy: str, secret: str, pin: str) -> Path:
        """alice's first `dtclient login` (password and the next code), the ssh_config
        `dtclient config` writes, and a plain `ssh -J` through it; that config."""
        self.run(
            ["dtclient", "login", "--proxy", proxy, "--user", "alice", "--ca-pin", pin],
            input=f"{PASSWORD}\n{totp_now(secret, time.time() + 30)}\n",
            expect="Logged in as",
        )
        config = self.workdir / "ssh_config"
        config.write_text(self.run(["dtclient", "config"], show=False).stdout)
        self.ssh(config, expect_ok=True)
        return config

    def boot(self, boot: SyntheticBoot, *, first: bool) -> None:
        """The laptop (re)boots as ``boot`` (a tests.tpm_eventlog.SyntheticBoot) says:
        firmware, shim and grub extend their digests into the swtpm's PCRs, and the event
        log that tells so is the file DT_EVENT_LOG names (the kernel's
        binary_bios_measurements on a real device)."""
        from tests import tpm_eventlog

        tcti = self.env["DT_TPM_TCTI"]
        if not first:
            tpm_eventlog.reboot(tcti)  # PCRs back to zero, the TPM's keys kept
        log = boot.log()
        tpm_eventlog.replay_into_tpm(tcti, log)
        path = self.workdir / "binary_bios_measurements"
        path.write_bytes(log)
        self.env["DT_EVENT_LOG"] = str(path)
        for part in ("shim", "bootloader", "kernel"):
            name = getattr(boot, part).decode()
            print(f"  {part:<10} {name:<24} sha256 {boot.digest(part)[:12]}")
        print(f"  Secure Boot {'on' if boot.secure_boot else 'off'}; dtclient reads the log from")
        print(f"  DT_EVENT_LOG={path}")

    def ssh(self, config: Path, *, expect_ok: bool, expect: str | None = None) -> None:
        from tests.sshd import LOGIN

        self.run(
            [
                "ssh",
                "-F",
                str(config),
                "-o",
                "BatchMode=yes",
                f"{LOGIN}@node-1",
                "echo",
                "hello from node-1",
            ],
            expect_rc=0 if expect_ok else 255,
            expect="hello from node-1" if expect_ok else expect,
        )

    def close(self) -> None:
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception as exc:  # cleanup must go on
                print(f"cleanup: {exc}", file=sys.stderr)


def story(demo: Demo) -> None:
    from bastion.cluster import Cluster
    from tests.tpm_eventlog import SyntheticBoot

    laptop = SyntheticBoot()  # Secure Boot on; shim 15.8 -> grub 2.12 -> Linux 6.1
    updated = SyntheticBoot(bootloader=b"grubx64.efi 2.14")  # the same, with a new grub
    from tests.sshd import LOGIN, bastion_server, sshd_node
    from tests.swtpm import provision, run_swtpm
    from tests.tokens import printed_token

    demo.heading("Create a cluster: a user CA, a host CA and the preset roles")
    demo.run(["dtadmin", "init", "--cluster", "demo.local"])
    cluster = Cluster.open(demo.state)
    demo.cleanups.append(cluster.close)

    demo.heading("Start the pieces: an OpenSSH node, dt-bastion, and a software TPM")
    node = demo.enter(lambda detach: sshd_node(demo.workdir / "node", cluster, detach=detach))
    bastion = demo.enter(lambda detach: bastion_server(demo.state, detach=detach))
    factory = provision(demo.workdir / "tpm-factory")
    tpm = demo.enter(lambda detach: run_swtpm(factory, demo.workdir, detach=detach))
    proxy = f"127.0.0.1:{bastion.port}"
    print(f"  sshd node on 127.0.0.1:{node.port}, dt-bastion on {proxy}, swtpm at {tpm.tcti}")
    demo.env["DT_TPM_TCTI"] = tpm.tcti
    demo.run(
        [
            "dtadmin",
            "nodes",
            "add",
            "node-1",
            "--addr",
            f"127.0.0.1:{node.port}",
            "--labels",
            "env=demo",
        ]
    )

    # so that `users add` prints the signup command alice runs, address and pin included
    demo.run(["dtadmin", "cluster", "set", "public-addr", proxy])

    demo.heading("Add alice with the access, auditor and editor roles")
    out = demo.run(
        ["dtadmin", "users", "add", "alice", "--roles", "access,auditor,editor", "--logins", LOGIN]
    ).stdout
    token = printed_token(out)
    pin = demo.run(
        ["dtadmin", "ca", "export", "--type", "host", "--format", "json"], show=False
    ).stdout
    pin = json.loads(pin)["fingerprint"]

    demo.heading("alice signs up: password and an authenticator app (the demo plays the app)")
    secret = demo.signup(proxy, token, pin)

    demo.heading("alice logs in and reaches the node with plain `ssh -J`")
    config = demo.first_login(proxy, secret, pin)

    demo.heading("The admin requires a trusted device for alice (dtadmin edit users/alice)")
    editor = demo.workdir / "add-role.sh"
    editor.write_text(
        "#!/bin/sh\nsed -i 's/^  - editor$/  - editor\\n  - require-trusted-device/' \"$1\"\n"
    )
    editor.chmod(0o755)
    demo.run(["dtadmin", "edit", "users/alice"], env={"EDITOR": str(editor)})
    demo.run(["dtadmin", "get", "users/alice"], expect="require-trusted-device")

    demo.heading("After re-login, `ssh -J` is refused: no trusted device")
    demo.run(
        ["dtclient", "login", "--proxy", proxy, "--user", "alice"],
        expect="device trust is required",
    )
    demo.ssh(config, expect_ok=False, expect="access denied")

    demo.heading("The admin trusts the (software) TPM's EK CA, as one trusts a TPM vendor's")
    print("  dt-bastion ships the real TPM vendors' EK roots; a software TPM is trusted nowhere")
    print("  until an admin adds its CA, so a stolen password cannot enroll the thief's TPM.")
    for pem in (factory.root_pem, factory.issuer_pem):
        demo.run(["dtadmin", "trust-root", "add", str(pem)])

    demo.heading("The laptop boots, and each stage measures the next into its TPM")
    demo.boot(laptop, first=True)

    demo.heading("The admin sets a posture policy: Secure Boot on, and no change since enrollment")
    policy = demo.workdir / "posture.yaml"
    policy.write_text(
        "kind: posture\nversion: v1\nspec:\n"
        "  secure_boot: true      # Secure Boot must have been on\n"
        "  baseline: true         # the PCRs must read as they did at enrollment\n"
        "  on_failure: withhold   # else: a certificate without device extensions\n"
    )
    print("\n".join("  " + line for line in policy.read_text().splitlines()))
    demo.run(["dtadmin", "posture", "set", "-f", str(policy)])

    demo.heading("alice enrolls this device: its TPM answers the bastion's challenge")
    demo.run(
        ["dtclient", "device", "enroll", "--current-device", "--asset-tag", "DEMO-LAPTOP-1"],
        expect='Device "DEMO-LAPTOP-1"/linux registered and enrolled',
    )
    demo.run(["dtadmin", "device", "ls"], expect="enrolled")

    demo.heading("Re-login: the certificate carries the device extensions, posture verdict pass")
    demo.run(
        ["dtclient", "login", "--proxy", proxy, "--user", "alice"],
        expect="device-asset-tag@dt-bastion",
    )
    demo.run(["dtclient", "status"], expect="device-id@dt-bastion")
    demo.run(
        [
            "ssh-keygen",
            "-L",
            "-f",
            str(
                demo.workdir
                / "home"
                / ".dt"
                / "clusters"
                / "demo.local"
                / "keys"
                / "id_ed25519-cert.pub"
            ),
        ],
        expect="device-credential-id@dt-bastion",
    )

    demo.heading("`ssh -J` works again")
    demo.ssh(config, expect_ok=True)

    demo.heading("The laptop reboots with an updated boot loader (grub 2.14)")
    demo.boot(updated, first=False)

    demo.heading("alice logs in: the changed boot costs the device extensions, `ssh -J` is refused")
    demo.run(
        ["dtclient", "login", "--proxy", proxy, "--user", "alice"],
        expect="PCR 4 changed since enrollment: boot loader differs",
    )
    demo.ssh(config, expect_ok=False, expect="access denied")

    demo.heading("The admin sees the drift and approves the new boot as the device's baseline")
    demo.run(["dtadmin", "device", "posture", "DEMO-LAPTOP-1"], expect="boot loader differs")
    shown = demo.run(
        ["dtadmin", "device", "posture", "DEMO-LAPTOP-1", "--format", "json"], show=False
    ).stdout
    reviewed = json.loads(shown)["measured"]["fingerprint"]  # what the admin just saw
    demo.run(
        ["dtadmin", "device", "posture", "approve", "DEMO-LAPTOP-1", "--expect", reviewed],
        expect="is now its baseline",
    )

    demo.heading("With the new baseline, alice logs in again and reaches the node")
    demo.run(
        ["dtclient", "login", "--proxy", proxy, "--user", "alice"],
        expect="device-asset-tag@dt-bastion",
    )
    demo.ssh(config, expect_ok=True)

    demo.heading("The admin unenrolls the device: access is refused at once")
    demo.run(["dtadmin", "device", "unenroll", "DEMO-LAPTOP-1"])
    demo.ssh(config, expect_ok=False, expect="is not enrolled")

    demo.heading("Every allow and deny is in the audit log")
    demo.run(["dtadmin", "audit", "ls", "--since", "1h"], expect="session.denied")

    demo.heading("The audit log is hash-chained and signed: verify proves nothing was changed")
    demo.run(["dtadmin", "audit", "verify", "--checkpoint"], expect="audit log intact")

    if demo.keep:
        demo.heading("--keep: alice enrolls again, so the cluster left running lets her in")
        demo.run(
            ["dtclient", "device", "enroll", "--current-device", "--asset-tag", "DEMO-LAPTOP-1"],
            expect="enrolled",
        )
        demo.run(["dtclient", "login", "--proxy", proxy, "--user", "alice"])
        demo.ssh(config, expect_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keep",
        action="store_true",
        help="leave the cluster running in ./demo-state and print how to use and stop it",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=ROOT / "demo-state",
        help="with --keep or --stop: the demo's folder (default ./demo-state; --keep empties it)",
    )
    parser.add_argument(
        "--stop", action="store_true", help="stop the servers a --keep run left running"
    )
    parser.add_argument(
        "--ha",
        action="store_true",
        help="several bastions on PostgreSQL behind HAProxy (no --keep)",
    )
    args = parser.parse_args()
    if args.stop:
        return stop_kept(args.dir.resolve())
    if args.ha:
        if args.keep:
            parser.error("--keep is not supported with --ha: the HA demo stops everything")
        import demo_ha  # scripts/, this file's own folder

        return demo_ha.main(Demo, DemoFailed)
    if args.keep:
        workdir = args.dir.resolve()
        refuse_running(workdir)
        refuse_foreign(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        (workdir / MARKER).write_text("made by scripts/demo.py --keep; emptied by the next one\n")
    else:
        workdir = Path(tempfile.mkdtemp(prefix="dt-demo-"))
    demo = Demo(workdir, keep=args.keep)
    passed = False
    try:
        story(demo)
        passed = True
        if args.keep:
            demo.keep_running()
    except DemoFailed as exc:
        print(f"\n\033[1;31mdemo failed: {exc}\033[0m", file=sys.stderr)
    finally:
        demo.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if not passed:
        return 1
    print("\n\033[1;32mdemo passed: every step behaved as the guide says\033[0m")
    if args.keep:
        print_keep_instructions(demo)
    return 0


def refuse_foreign(workdir: Path) -> None:
    """--keep empties its folder first: only one the demo made (or an empty one)."""
    if not workdir.exists():
        return
    ours = (workdir / MARKER).exists() or (
        (workdir / "state").is_dir() and (workdir / "home").is_dir()
    )
    if workdir.is_dir() and (ours or not any(workdir.iterdir())):
        return
    sys.exit(f"{workdir} is not a demo folder; --keep would delete it: choose another --dir")


def refuse_running(workdir: Path) -> None:
    """A kept demo still running in ``workdir``: stop it first, not delete its state.

    A PID counts only while its command line names ``workdir`` (sshd's config, the
    bastion's --state, swtpm's state dir are all in it): after a reboot the numbers in
    demo.pids may belong to anything."""
    pids_file = workdir / "demo.pids"
    if not pids_file.exists():
        return
    alive = [pid for pid in _read_pids(pids_file) if _demo_process(pid, workdir)]
    if alive:
        pids = " ".join(map(str, alive))
        sys.exit(
            f"a kept demo is still running in {workdir} (PIDs {pids}); stop it first: kill {pids}"
        )


def stop_kept(workdir: Path) -> int:
    """--stop: SIGTERM the servers of a kept demo (only those still started for
    ``workdir``) and wait until they are gone."""
    pids_file = workdir / "demo.pids"
    if not pids_file.exists():
        print(f"no kept demo in {workdir} (no {pids_file})")
        return 0
    pids = [pid for pid in _read_pids(pids_file) if _demo_process(pid, workdir)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_demo_process(p, workdir) for p in pids):
        time.sleep(0.1)
    left = [pid for pid in pids if _demo_process(pid, workdir)]
    if left:
        print(f"still running after SIGTERM: {' '.join(map(str, left))}", file=sys.stderr)
        return 1
    pids_file.unlink()
    print(
        f"stopped the kept demo in {workdir}"
        + (f" (PIDs {' '.join(map(str, pids))})" if pids else "")
    )
    return 0


def _read_pids(path: Path) -> list[int]:
    return [int(word) for word in path.read_text().split() if word.isdigit()]


def _demo_process(pid: int, workdir: Path) -> bool:
    """Running, and started for ``workdir`` (a zombie not yet reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z" and str(workdir) in cmdline


def print_keep_instructions(demo: Demo) -> None:
    """--keep: the servers stay up; say how to use them by hand and how to stop them."""
    env = demo.env
    pids = " ".join(str(p) for p in demo.pids)
    if demo.workdir == ROOT / "demo-state":
        stop = "make demo DEMO_ARGS=--stop"
    else:
        stop = shlex.join(
            [str(VENV_BIN / "python"), __file__, "--stop", "--dir", str(demo.workdir)]
        )
    print(f"""
The cluster is still running (state and logs in {demo.workdir}). In another shell:

  export PATH={VENV_BIN}:$PATH DT_STATE={env["DT_STATE"]} DT_HOME={env["DT_HOME"]}
  export DT_TPM_TCTI='{env.get("DT_TPM_TCTI", "")}' DT_EVENT_LOG={env.get("DT_EVENT_LOG", "")}
  dtclient status                      # alice's profile from the demo
  dtadmin audit ls --since 1h          # everything that happened
  ssh -F {demo.workdir / "ssh_config"} node-1 true    # through the bastion
  dtclient host-key                    # the bastion's key, for clients without host CAs
  dtadmin device posture DEMO-LAPTOP-1                 # its measured boot and baseline
  dtadmin device unenroll DEMO-LAPTOP-1                # and she is refused again

The node (sshd), dt-bastion and swtpm run as PIDs {pids}.
Stop them with:  kill {pids}
      or later:  {stop}""")


if __name__ == "__main__":
    sys.exit(main())
