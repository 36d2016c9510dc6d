"""``dt-bastion serve --workers N`` (N > 1): one parent, N bastion processes, one port.

One asyncio process uses one core; N workers use N. Each worker is a whole bastion
(``Service`` in :mod:`.run`): its own instance name and liveness lock, its own
storage workers, its own watcher. They coordinate through the cluster state exactly
as several bastions on one state directory do: a lock made anywhere cuts sessions on
every worker, and a worker that dies has its open sessions ended in the audit log by
a sibling's sweep (``Registry.sweep``).

The listening socket: the parent binds it once and every worker inherits it and
accepts on it (``asyncssh.create_server(sock=...)``). Not ``SO_REUSEPORT`` with one
socket per worker: the kernel hashes each new connection to one of those sockets
whatever that worker is doing, so a worker busy with a bulk transfer gets a fair
share of new logins and its queue waits; on one shared socket only a worker whose
event loop is free to poll takes the connection. One bind also keeps "address
already in use" a clear start-up error (with ``SO_REUSEPORT`` a second bastion, or
any process of the same user, could silently join the port), and a worker that
dies loses no connection in a private accept queue: the others go on accepting.

The parent (this module) does little:

- binds, starts the workers (each in its own process group: a terminal's Ctrl-C
  reaches the parent, which forwards it once), and says ready (``dt-bastion ready
  on ...`` on stdout, ``READY=1`` with ``MAINPID`` to systemd) when every worker is;
  each worker's own ``NOTIFY_SOCKET`` is a datagram socket of the parent's, so the
  workers speak the same protocol as a single bastion does to systemd;
- SIGHUP: ``RELOADING=1``, forwarded to every worker, ``READY=1`` once each has
  reloaded;
- SIGTERM/SIGINT: ``STOPPING=1``, forwarded (a second one too: cut now); exits when
  every worker has drained, 0 if each exited 0;
- a worker that dies unexpectedly is logged and restarted after a backoff (1 s,
  doubling to 30 s, back to 1 s once one has run a minute); the new worker audits
  ``bastion.restart`` saying what happened to the one before.

``--workers 1`` runs no parent: the one process is the bastion, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

from bastion.config import BastionConfig, metrics_address
from bastion.protocol.errors import UsageError
from bastion.service.notify import Notifier

log = logging.getLogger("bastion.service")

WORKER_ENV = "DT_BASTION_WORKER"  # this process is worker i of a supervisor
FDS_ENV = "DT_BASTION_LISTEN_FDS"  # the inherited listening sockets: "3,4"
PARENT_ENV = "DT_BASTION_PARENT"  # the supervisor's pid
RESTARTED_ENV = "DT_BASTION_RESTARTED"  # what happened to the worker this one replaces
BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_AFTER = 1.0, 30.0, 60.0
RELOAD_TIMEOUT = 120.0
PR_SET_PDEATHSIG = 1


def worker_count(config: BastionConfig) -> int:
    """``workers`` from the config or ``--workers``; 0 (the default) is one per core."""
    return config.workers if config.workers > 0 else (os.cpu_count() or 1)


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker got from its supervisor (see :func:`as_worker`)."""

    index: int
    sockets: list[socket.socket]
    restarted: str  # "" or what happened to the worker before this one


def as_worker() -> WorkerSetup | None:
    """In a worker process: its index and listening sockets (the variables are then
    removed, so nothing started from here inherits them). None in any other process."""
    index = os.environ.pop(WORKER_ENV, None)
    fds = os.environ.pop(FDS_ENV, "")
    parent = os.environ.pop(PARENT_ENV, "")
    restarted = os.environ.pop(RESTARTED_ENV, "")
    if index is None:
        return None
    _die_with_parent(int(parent) if parent else None)
    sockets = [socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd]
    for sock in sockets:
        sock.set_inheritable(False)
    return WorkerSetup(int(index), sockets, restarted)


def _die_with_parent(parent: int | None) -> None:
    """Drain (SIGTERM) if the supervisor dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def bind(config: BastionConfig) -> list[socket.socket]:
    """The listening sockets, bound as a single bastion binds them (asyncio's
    create_server for asyncssh; one socket, dual-stack on [::], for the PROXY
    protocol acceptor)."""
    host, port = config.listen_host, config.listen_port
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if config.proxy_protocol_from:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and ipaddress.ip_address(host).is_unspecified:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind((host, port))
                sock.listen(1024)
            except BaseException:
                sock.close()
                raise
            return [sock]
        return asyncio.run(_bind_like_asyncio(host, port))
    except OSError as exc:
        raise listen_error(where, exc) from None


def listen_error(where: str, exc: OSError) -> UsageError:
    """"Address already in use" and its kin, said so an admin knows what to change:
    the one wording for a worker's parent and a single bastion alike."""
    if exc.errno == errno.EADDRINUSE:
        return UsageError(
            f"cannot listen on {where}: address already in use (another dt-bastion, "
            "sshd or service holds that port; pick another with --listen)"
        )
    return UsageError(f"cannot listen on {where}: {exc.strerror or exc}")


async def _bind_like_asyncio(host: str, port: int) -> list[socket.socket]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        asyncio.Protocol, host, port, reuse_address=True, start_serving=False
    )
    try:
        return [s.dup() for s in server.sockets]
    finally:
        server.close()


@dataclass(eq=False)
class Worker:
    index: int
    notify_path: str
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    backoff: float = BACKOFF_FIRST
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    restarted: str = ""


class Supervisor:
    def __init__(self, config: BastionConfig, count: int, argv: list[str]) -> None:
        self.config = config
        self.count = count
        self.argv = argv  # the serve command line, given to each worker as it is
        self.notifier = Notifier()
        self.stopping = False
        self.sockets: list[socket.socket] = []
        self.workers: list[Worker] = []
        self._changed = asyncio.Event()  # a worker exited or said something
        self._reloading: asyncio.Task[None] | None = None

    def check(self) -> None:
        if self.config.metrics_listen:
            host, port = metrics_address(self.config.metrics_listen)
            if port and port <= self.config.listen_port < port + self.count:
                raise UsageError(
                    f"metrics_listen: workers serve metrics on ports {port}-"
                    f"{port + self.count - 1} (one each), which takes the SSH port "
                    f"{self.config.listen_port}; pick another"
                )

    def preflight(self) -> None:
        """What a single bastion checks before it listens, once, here: a cluster that
        cannot be served is refused with the one clear error it always had (not one
        per worker), and the workers do not race to make the host certificate."""
        from bastion.cluster import Cluster

        cluster = Cluster.open(self.config.state_dir, database=self.config.database or None)
        try:
            cluster.store.integrity_check()
            cluster.ensure_bastion_host_cert(self.config.names())
        finally:
            cluster.close()

    def run(self) -> int:
        self.check()
        self.preflight()
        self.sockets = bind(self.config)
        tmp = tempfile.mkdtemp(prefix="dt-bastion-workers-")
        try:
            return asyncio.run(self._run(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            for sock in self.sockets:
                sock.close()

    async def _run(self, tmp: str) -> int:
        loop = asyncio.get_running_loop()
        listeners = []
        for i in range(self.count):
            worker = Worker(i, os.path.join(tmp, f"notify-{i}"))
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            listener.bind(worker.notify_path)
            listener.setblocking(False)
            loop.add_reader(listener.fileno(), self._heard, worker, listener)
            listeners.append(listener)
            self.workers.append(worker)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        try:
            for worker in self.workers:
                if self.stopping:  # SIGTERM while starting: start no more
                    break
                await self._start(worker)
            failed = await self._all_ready()
            if failed is not None:
                return failed
            if self.stopping:  # stopped while starting: never READY=1 after STOPPING=1
                return await self._supervise()
            addrs = ", ".join(_addr(s.getsockname()) for s in self.sockets)
            log.info("dt-bastion: %d workers serving on %s", self.count, addrs)
            print(f"dt-bastion ready on {addrs}", flush=True)
            self.notifier.ready(f"{self.count} workers serving on {addrs}")
            return await self._supervise()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for listener in listeners:
                loop.remove_reader(listener.fileno())
                listener.close()

    async def _start(self, worker: Worker) -> None:
        env = {
            **os.environ,
            WORKER_ENV: str(worker.index),
            FDS_ENV: ",".join(str(s.fileno()) for s in self.sockets),
            PARENT_ENV: str(os.getpid()),
            "NOTIFY_SOCKET": worker.notify_path,
        }
        if worker.restarted:
            env[RESTARTED_ENV] = worker.restarted
        worker.ready.clear()
        worker.started = time.monotonic()
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bastion.server_cli",
            *self.argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            pass_fds=[s.fileno() for s in self.sockets],
            process_group=0,
        )
        if self.stopping:  # the stop signal came while it was being started
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        log.debug("worker %d started (pid %d)", worker.index, worker.proc.pid)
        asyncio.get_running_loop().create_task(self._watch(worker, worker.proc))

    async def _watch(self, worker: Worker, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        self._changed.set()

    def _heard(self, worker: Worker, listener: socket.socket) -> None:
        while True:
            try:
                data = listener.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            lines = dict(
                line.split("=", 1)
                for line in data.decode(errors="replace").splitlines()
                if "=" in line
            )
            if lines.get("READY") == "1":
                worker.ready.set()
                self._changed.set()
            elif lines.get("RELOADING") == "1":
                worker.ready.clear()

    async def _all_ready(self) -> int | None:
        """At start: None once every worker listens; as soon as one exits first, its
        exit code (the others stopped; its own message on stderr says why)."""
        while True:
            self._changed.clear()
            for worker in self.workers:
                if worker.proc is None:  # never started: a stop signal came first
                    continue
                if worker.proc.returncode is not None:
                    log.error(
                        "worker %d exited (%s) before it was ready; stopping",
                        worker.index,
                        _how(worker.proc.returncode),
                    )
                    self.stopping = True
                    self._forward(signal.SIGTERM)
                    await self._wait_all()
                    return worker.proc.returncode if worker.proc.returncode > 0 else 1
            if self.stopping:  # SIGTERM while starting: drain what started
                return None
            if all(w.ready.is_set() for w in self.workers):
                return None
            await self._changed.wait()

    async def _supervise(self) -> int:
        """Until every worker has exited after a stop signal; restarts the others."""
        loop = asyncio.get_running_loop()
        while True:
            self._changed.clear()
            for worker in self.workers:
                proc = worker.proc
                if proc is None or proc.returncode is None or self.stopping:
                    continue
                ran = time.monotonic() - worker.started
                if ran >= HEALTHY_AFTER:
                    worker.backoff = BACKOFF_FIRST
                why = f"worker {worker.index} (pid {proc.pid}) exited ({_how(proc.returncode)})"
                log.error("%s; restarting it in %g s", why, worker.backoff)
                worker.restarted = f"{why} after {ran:.0f} s; restarted by the supervisor"
                worker.proc = None
                loop.call_later(worker.backoff, self._restart, worker)
                worker.backoff = min(worker.backoff * 2, BACKOFF_MAX)
            if self.stopping and all(
                w.proc is None or w.proc.returncode is not None for w in self.workers
            ):
                codes = [w.proc.returncode for w in self.workers if w.proc is not None]
                bad = [c for c in codes if c != 0]
                if bad:
                    log.error("dt-bastion stopped; worker exit codes %s", codes)
                    return 1
                log.info("dt-bastion stopped: every worker drained")
                return 0
            await self._changed.wait()

    def _restart(self, worker: Worker) -> None:
        if self.stopping or worker.proc is not None:
            return

        async def start() -> None:
            try:
                await self._start(worker)
            except OSError as exc:
                log.error("cannot restart worker %d: %s; trying again", worker.index, exc)
                asyncio.get_running_loop().call_later(worker.backoff, self._restart, worker)

        asyncio.get_running_loop().create_task(start())

    # -- signals ---------------------------------------------------------------------------

    def _on_stop_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if not self.stopping:
            log.info("%s: draining %d workers", name, self.count)
            self.stopping = True
            self.notifier.stopping(f"draining {self.count} workers")
        else:
            log.warning("%s again: the workers cut their remaining sessions now", name)
        self._forward(signal.SIGTERM)
        self._changed.set()

    def _on_reload_signal(self) -> None:
        if self.stopping:
            log.warning("SIGHUP ignored: the bastion is draining for shutdown")
            return
        self.notifier.reloading()
        for worker in self.workers:
            worker.ready.clear()
        self._forward(signal.SIGHUP)
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.get_running_loop().create_task(self._reloaded())

    async def _reloaded(self) -> None:
        """READY=1 again once every running worker has reloaded (a worker restarted
        meanwhile reads the new configuration as it starts)."""
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while not self.stopping and time.monotonic() < deadline:
            if all(w.ready.is_set() or w.proc is None for w in self.workers):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.2)
        if not self.stopping:
            self.notifier.ready(f"{self.count} workers serving; configuration reloaded")

    def _forward(self, sig: int) -> None:
        for worker in self.workers:
            proc = worker.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _wait_all(self) -> None:
        for worker in self.workers:
            if worker.proc is not None:
                await worker.proc.wait()


def _how(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _addr(sockname: tuple[object, ...]) -> str:
    host, port = str(sockname[0]), sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
