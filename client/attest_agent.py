"""``dtclient agent``: answer the bastion's continuous-attestation challenges.

Where a role's posture policy asks for it (``CertIssued.attest_interval``), ``dtclient
login`` starts this agent detached and ``dtclient logout`` stops it. It keeps one dt-api
connection to the bastion with the user's current certificate, sends ``attest_begin``
for the enrolled device, and answers each ``attest_challenge`` with a fresh TPM quote
(the PCRs asked for, over ``quote.attest_quote_data(nonce)``). Without those answers
the device's live sessions are cut once the policy's grace is over.

* A dropped connection is made again with backoff (1 s doubling to 30 s; after a
  failed quote from 10 s to 5 min), each time with the certificate on disk now, so a
  renewal is picked up. A certificate refused or expired ends the agent, as do SIGTERM
  and SIGINT.
* The TPM is opened for each quote and closed right after: a software TPM serves one
  client at a time, and ``dtclient login`` needs it too.
* In the cluster's profile folder: ``agent.pid`` (locked with flock while the agent
  runs, so a stale file never passes for a live agent), ``agent.log`` (what it did,
  rotated at 1 MiB) and ``agent.json`` (its state, for ``dtclient status``).
* Every failure is one line in the log, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess  # nosec B404  # starts this same program detached, argv as a list
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.protocol import wire
from bastion.protocol.errors import (
    AccessDenied,
    AuthenticationFailed,
    DTError,
    NotLoggedIn,
    TPMError,
    UsageError,
)
from bastion.protocol.files import atomic_write
from client.profile import DeviceState, Home, Profile

if TYPE_CHECKING:  # asyncssh: imported where a connection is made
    from client.api import ApiSession, Credentials, HostTrust

PID_FILE, LOG_FILE, STATE_FILE = "agent.pid", "agent.log", "agent.json"
LOG_LIMIT = 1024 * 1024
FIRST_BACKOFF, MAX_BACKOFF = 1.0, 30.0
FAILED_BACKOFF, MAX_FAILED_BACKOFF = 10.0, 300.0
STATE_EVERY = 30.0  # agent.json is rewritten at each change, and this often while attesting
START_WAIT = 5.0  # how long `dtclient login` waits to see the agent it started running


class Ended(Exception):
    """The agent stops for good (certificate refused or expired, nothing enrolled)."""


# -- files in the profile folder ----------------------------------------------------------


class AgentLog:
    """Lines appended to ``agent.log`` (0600, never through a link), and to stderr
    when that is a terminal (an agent run by hand)."""

    def __init__(self, path: Path, echo: bool = False) -> None:
        self.path = path
        self.echo = echo

    def __call__(self, text: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {text}\n"
        if self.echo:
            sys.stderr.write(line)
        with contextlib.suppress(OSError):
            if self.path.stat().st_size > LOG_LIMIT:
                os.replace(self.path, self.path.with_name(LOG_FILE + ".1"))
        with contextlib.suppress(OSError):  # a full disk must not stop the answers
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, line.encode("utf-8", "replace"))
            finally:
                os.close(fd)


class PidFile:
    """``agent.pid``, held with an exclusive flock for the agent's life."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = running(self.path)
            raise UsageError(
                f"an attestation agent already runs for this profile (pid {pid or '?'}); "
                "stop it with: dtclient logout, or kill it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None


def running(path: Path) -> int | None:
    """The pid of the agent holding ``path``'s lock, or None: no agent runs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held: an agent runs
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def pid_path(home: Home) -> Path:
    return home.dir / PID_FILE


def log_path(home: Home) -> Path:
    return home.dir / LOG_FILE


def read_state(home: Home) -> dict[str, Any]:
    """What ``dtclient status`` shows: running or not, and what the agent last said."""
    pid = running(pid_path(home))
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads((home.dir / STATE_FILE).read_text())
        if isinstance(loaded, dict):
            state = loaded
    if pid is None:
        return {"running": False, "log": str(log_path(home)), "last": state.get("state")}
    return {"running": True, "pid": pid, "log": str(log_path(home)), **state}


def describe(view: dict[str, Any]) -> str:
    if not view.get("running"):
        return "not running"
    what = f"running (pid {view.get('pid')})"
    if view.get("state") == "attesting":
        what += f", a quote every {view.get('interval')} s"
    elif view.get("state"):
        what += f", {view['state']}"
    if view.get("reason"):
        what += f": {view['reason']}"
    return what


# -- starting and stopping (dtclient login, logout) -----------------------------------------


def stop(home: Home, wait: float = 5.0) -> int | None:
    """SIGTERM to this profile's agent, if one runs; its pid (None: none ran)."""
    path = pid_path(home)
    pid = running(path)
    if not pid:
        return None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while running(path) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid


def start(home: Home, tcti: str | None = None) -> int | None:
    """A fresh detached agent for this profile (any running one stopped first, so the
    new one uses the new certificate); its pid once it holds its pidfile, else None."""
    stop(home)
    if home.cluster is None:
        return None
    argv = [sys.executable, "-m", "client", "agent", "--cluster", home.cluster]
    if tcti:
        argv += ["--tpm", tcti]
    home.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log_path(home), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        # This program, detached: its own session, no terminal, errors into its log.
        proc = subprocess.Popen(  # nosec B603
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fd,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    finally:
        os.close(fd)
    deadline = time.monotonic() + START_WAIT
    while time.monotonic() < deadline:
        if running(pid_path(home)):
            return proc.pid
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None


# -- the agent --------------------------------------------------------------------------------


@dataclass
class Backoff:
    first: float = FIRST_BACKOFF
    limit: float = MAX_BACKOFF
    next: float = 0.0

    def __call__(self) -> float:
        self.next = min(max(self.next * 2, self.first), self.limit)
        return self.next

    def reset(self) -> None:
        self.next = 0.0


def check_challenge(msg: wire.AttestChallenge) -> None:
    """What the bastion asks must be a quote a TPM can make: PCRs 0-23, no repeats."""
    pcrs = list(msg.pcr_select)
    if not pcrs or len(set(pcrs)) != len(pcrs) or any(not 0 <= p < 24 for p in pcrs):
        raise TPMError(f"the bastion asked for a quote of PCRs {pcrs[:30]}, which no TPM makes")


def tpm_quote(tcti: str | None, tpm_dir: Path, msg: wire.AttestChallenge) -> wire.AttestResponse:
    """One quote, the TPM opened for it alone (blocking: run off the event loop)."""
    from bastion.protocol.quote import attest_quote_data
    from client.tpm import TPM

    check_challenge(msg)
    with TPM.open(tcti) as tpm:
        quote = tpm.quote(tpm_dir, attest_quote_data(msg.nonce), sorted(msg.pcr_select))
    return wire.AttestResponse(
        attest=quote.attest,
        signature=quote.signature,
        pcr_select=list(quote.pcr_select),
        pcr_values=list(quote.pcr_values),
    )


Quote = Callable[[wire.AttestChallenge], wire.AttestResponse]


class Agent:
    """The connections one agent makes, until told to stop or ended for good."""

    def __init__(self, home: Home, quote: Quote, log: AgentLog) -> None:
        self.home = home
        self.quote = quote
        self.log = log
        self.state: dict[str, Any] = {}
        self._state_written = 0.0

    def set_state(self, state: str, reason: str = "", **extra: Any) -> None:
        changed = (state, reason) != (self.state.get("state"), self.state.get("reason", ""))
        now = time.time()
        self.state = {"state": state, "since": self.state.get("since", now), **extra}
        if changed:
            self.state["since"] = now
        if reason:
            self.state["reason"] = reason
        if changed or now - self._state_written >= STATE_EVERY:
            self._state_written = now
            with contextlib.suppress(OSError):
                data = json.dumps({**self.state, "updated": now}, sort_keys=True).encode()
                atomic_write(self.home.dir / STATE_FILE, data + b"\n", 0o600)

    async def run(self, stopping: asyncio.Event) -> int:
        """Connect, attest, reconnect; 0 when stopped or the certificate ended."""
        backoff = Backoff()
        while not stopping.is_set():
            try:
                wait = await self._connection(backoff)
            except Ended as exc:
                self.log(f"stopping: {exc}")
                self.set_state("stopped", str(exc))
                return 0
            except DTError as exc:  # unreachable, dropped, busy, a TPM that failed
                wait = backoff()
                self.log(f"{exc.message}; connecting again in {wait:g} s")
                self.set_state("reconnecting", exc.message)
            except Exception as exc:  # a bug must not end the answers: logged, tried again
                wait = backoff()
                self.log(f"internal error: {type(exc).__name__}: {exc}; again in {wait:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), wait)
        return 0

    def _credentials(self) -> tuple[Profile, Credentials, HostTrust, DeviceState]:
        from client.api import Credentials, HostTrust
        from client.sshlib import asyncssh

        home = self.home
        try:
            profile = home.load_profile()
            cert = home.load_cert()
        except NotLoggedIn as exc:
            raise Ended(f"not logged in ({exc.message})") from None
        if not cert.valid_at(time.time()):
            raise Ended("the certificate has expired (dtclient login starts a new agent)")
        device = home.load_device()
        if device is None or device.cluster != profile.cluster:
            raise Ended(f"no device enrolled with {profile.cluster} in this profile")
        try:
            key = asyncssh.read_private_key(str(home.key_path))
            certificate = asyncssh.read_certificate(str(home.cert_path))
        except (OSError, ValueError, asyncssh.Error) as exc:
            raise Ended(f"cannot read the key or certificate: {exc}") from None
        creds = Credentials("dt", client_key=key, certificate=certificate)
        return profile, creds, HostTrust(trusted=profile.host_ca_keys), device

    async def _connection(self, backoff: Backoff) -> float:
        """One connection, until it ends; how long to wait before the next."""
        from client.api import STEP_TIMEOUT, open_session

        profile, creds, trust, device = self._credentials()
        self.set_state("connecting")
        try:
            session = await open_session(profile.host, profile.port, creds, trust)
        except AuthenticationFailed as exc:
            raise Ended(f"the bastion refused the certificate: {exc.message}") from None
        try:
            await session.send(
                wire.AttestBegin(asset_tag=device.asset_tag, credential_id=device.credential_id)
            )
            timeout = STEP_TIMEOUT
            answered = 0
            while True:
                try:
                    msg = await session.receive((wire.AttestChallenge, wire.AttestResult), timeout)
                except AccessDenied as exc:
                    raise Ended(f"the bastion refused: {exc.message}") from None
                if isinstance(msg, wire.AttestChallenge):
                    await self._answer(session, msg)
                    timeout = 2.0 * (msg.interval + msg.grace) + STEP_TIMEOUT
                    continue
                if msg.status == "ok":
                    answered += 1
                    if answered == 1:
                        self.log(f"attesting to {profile.proxy} (a quote every {msg.next_in} s)")
                    backoff.reset()
                    self.set_state("attesting", interval=msg.next_in, last_quote=time.time())
                    continue
                if msg.status == "not_required":
                    self.log(f"{msg.reason}; asking again in {msg.next_in} s")
                    self.set_state("idle", msg.reason)
                    return float(max(msg.next_in, 1))
                failed = Backoff(FAILED_BACKOFF, MAX_FAILED_BACKOFF, backoff.next)
                backoff.next = failed()
                self.log(f"the bastion says: {msg.reason}; connecting again in {backoff.next:g} s")
                self.set_state("failed", msg.reason)
                return backoff.next
        finally:
            with contextlib.suppress(Exception):
                await session.close()

    async def _answer(self, session: ApiSession, msg: wire.AttestChallenge) -> None:
        try:
            response = await asyncio.to_thread(self.quote, msg)
        except TPMError as exc:
            self.log(f"the TPM did not answer: {exc.message}")
            await session.send(wire.Error(code=exc.code, message=exc.message))
            return
        await session.send(response)


def main(home: Home, tcti: str | None) -> int:
    """``dtclient agent`` in the foreground (``dtclient login`` runs it detached)."""
    home.check()
    if home.cluster is None:
        raise NotLoggedIn("not logged in (run: dtclient login)")
    home.load_profile()
    device = home.load_device()
    chosen = tcti or os.environ.get("DT_TPM_TCTI") or (device.tpm if device else "") or None
    pidfile = PidFile(pid_path(home))
    pidfile.acquire()
    log = AgentLog(log_path(home), echo=sys.stderr.isatty())
    agent = Agent(home, lambda msg: tpm_quote(chosen, home.tpm_dir, msg), log)
    log(f"started (pid {os.getpid()}, cluster {home.cluster})")
    try:
        return asyncio.run(_serve(agent))
    finally:
        pidfile.release()


async def _serve(agent: Agent) -> int:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stopping.set)
    task = asyncio.ensure_future(agent.run(stopping))
    stopper = asyncio.ensure_future(stopping.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        stopper.cancel()
        return task.result()
    task.cancel()  # stopped mid-connection: end it now, not after its next message
    with contextlib.suppress(asyncio.CancelledError):
        await task
    agent.log("stopped")
    agent.set_state("stopped", "told to stop")
    return 0
