"""One ``dt-bastion serve`` process, from start to exit.

1. Open the cluster (integrity check first), listen for SSH (and, if configured, for
   /metrics and /healthz), then say ready: a log line, ``dt-bastion ready on ...`` on
   stdout, and ``READY=1`` to systemd (:mod:`.notify`).
2. SIGHUP: reload (:mod:`.reload`), ``RELOADING=1`` then ``READY=1`` around it.
3. SIGTERM or SIGINT: drain. Stop accepting, ``STOPPING=1``, /healthz turns 503, every
   client is told (an SSH debug message shown by clients that show them), connections
   with nothing open are closed at once; sessions run on until they end or
   ``drain_timeout`` passes (a second signal: at once), then each connection left is
   cut with the reason, audited. Then the workers write what they hold and the
   process exits 0.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncssh

from bastion.cluster import Cluster
from bastion.config import BastionConfig, metrics_address
from bastion.protocol.errors import DTError, StorageUnavailable
from bastion.service import reload
from bastion.service.metrics import HEALTH_TIMEOUT, Metrics, MetricsServer
from bastion.service.notify import Notifier
from bastion.service.supervisor import listen_error

if TYPE_CHECKING:
    from bastion.proxy.server import Bastion
    from bastion.service.supervisor import WorkerSetup

log = logging.getLogger("bastion")
SHUTDOWN = "the bastion is shutting down"
STOPPED = "bastion shutting down"  # a session's end at shutdown (Registry.stop)
DRAIN_POLL = 0.2


class Service:
    def __init__(
        self,
        load: Callable[[], BastionConfig],
        config: BastionConfig,
        worker: WorkerSetup | None = None,
    ) -> None:
        self.load = load  # the configuration as at start: file, --set, options
        self.config = config
        self.worker = worker  # one of a supervisor's (bastion.service.supervisor)
        self.notifier = Notifier()
        self.metrics = Metrics()
        self.draining = False
        self._stop = asyncio.Event()
        self._cut_now = asyncio.Event()
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False

    # -- 1. start ------------------------------------------------------------------------

    async def run(self) -> None:
        from bastion.proxy import fastpath
        from bastion.proxy.server import Bastion, _options, start_server
        from bastion.server_cli import _tune_socket_reads

        cfg = self.config
        _tune_socket_reads(cfg.socket_read_size)
        fastpath.install()  # asyncssh's per-packet work, cut (bastion/proxy/fastpath.py)
        cluster = Cluster.open(cfg.state_dir, database=cfg.database or None)
        try:
            # Once, before anyone is let in: the open-time check skips indexes, and a
            # broken index answers "no lock", "no such serial" wrongly.
            cluster.store.integrity_check()
            cert_path = cluster.ensure_bastion_host_cert(cfg.names())
        except BaseException:
            cluster.close()
            raise
        self.bastion = bastion = Bastion(cluster, cfg)
        key_path = str(cluster.bastion_host_key_path())
        acceptor = None
        try:
            if self.worker is not None:  # the supervisor's socket, bound already
                acceptor = await _serve_on(
                    bastion, self.worker.sockets, _options(bastion, key_path, str(cert_path))
                )
            else:
                acceptor = await _listening(
                    f"{cfg.listen_host}:{cfg.listen_port}",
                    start_server(bastion, key_path, str(cert_path)),
                )
            self.acceptor = acceptor
            metrics_server = await self._start_metrics()
        except BaseException:
            if acceptor is not None:
                acceptor.close()
            bastion.close()
            cluster.close()
            raise
        self.metrics.attach(bastion)
        bastion.on_login.append(self.metrics.logged_in)
        self.reloader = reload.Reloader(
            bastion,
            acceptor,
            lambda holder: _options(holder, key_path, str(cert_path)),
            _tune_socket_reads,
        )
        bastion.registry.start()
        # Before anyone is told it is ready: a SIGTERM or SIGHUP sent the moment the
        # ready line appears must find its handler, not the default that kills.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        addrs = ", ".join(_addr(s.getsockname()) for s in acceptor.sockets)
        if self.worker is not None:
            log.info(
                "dt-bastion worker %d (instance %s, pid %d) serving cluster %s on %s",
                self.worker.index,
                bastion.registry.instance,
                os.getpid(),
                cluster.name,
                addrs,
            )
            if self.worker.restarted:
                await bastion.workers.audit(
                    "bastion.restart",
                    message=f"{self.worker.restarted} as bastion {bastion.registry.instance}",
                )
        else:
            log.info("dt-bastion serving cluster %s on %s", cluster.name, addrs)
            print(f"dt-bastion ready on {addrs}", flush=True)
        self.notifier.ready(f"serving cluster {cluster.name} on {addrs}")
        try:
            await self._stop.wait()
            await self._drain()
        finally:  # signals stay handled: one more SIGTERM must not lose the last rows
            self.metrics.detach()
            if metrics_server is not None:
                metrics_server.close()
                await metrics_server.wait_closed()
            bastion.close()  # the issuer's queue answered, the workers' writes landed
            cluster.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("dt-bastion stopped")

    async def _start_metrics(self) -> MetricsServer | None:
        if not self.config.metrics_listen:
            return None
        host, port = metrics_address(self.config.metrics_listen)
        if self.worker is not None and port:  # worker i on port + i
            port += self.worker.index
        server = MetricsServer(self.metrics, self.health)
        where = await _listening(f"{host}:{port}", server.start(host, port))
        log.info("metrics: /metrics and /healthz on http://%s", where)
        if not _loopback(host):
            log.warning("metrics: %s is not loopback; nothing on it authenticates", where)
        return server

    async def health(self) -> None:
        """For /healthz: raises DTError saying why this bastion should get no traffic."""
        if self.draining:
            raise StorageUnavailable(f"draining: {SHUTDOWN}")
        if why := self.bastion.unhealthy():
            raise StorageUnavailable(why)
        try:
            await asyncio.wait_for(
                self.bastion.workers.read(lambda store: store.revision()), HEALTH_TIMEOUT
            )
        except TimeoutError:
            raise StorageUnavailable(
                f"storage: the cluster database did not answer within {HEALTH_TIMEOUT:g} s"
            ) from None
        except DTError as exc:
            raise StorageUnavailable(f"storage: {exc.message}") from None

    # -- 2. reload -----------------------------------------------------------------------

    def _on_reload_signal(self) -> None:
        if self.draining:
            log.warning("SIGHUP ignored: the bastion is draining for shutdown")
            return
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True  # once more when this one is over
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        while True:
            self._reload_again = False
            self.notifier.reloading()
            try:
                await self.reload()
            except Exception:  # a bug: the bastion goes on with what it had
                log.exception("reload failed; the running configuration is kept")
            finally:
                if not self.draining:  # after STOPPING=1, never READY=1 again
                    self.notifier.ready("serving; configuration reloaded")
            if not self._reload_again or self.draining:
                return

    async def reload(self) -> None:
        log.info("SIGHUP: reloading the configuration")
        try:
            new = self.load()
            applied, later = await self.reloader.apply(new)
        except DTError as exc:
            self.metrics.reloads.labels("refused").inc()
            log.error("reload refused, the running configuration is kept: %s", exc.message)
            await self.bastion.workers.audit(
                "bastion.reload", success=False, message=f"reload refused: {exc.message}"
            )
            return
        self.config = self.bastion.config
        fingerprint = await self.reloader.refresh_trust()
        self.metrics.reloads.labels("applied").inc()
        if applied:
            log.warning("reload applied: %s", reload.described(applied))
        else:
            log.info("reload: no setting changed")
        if later:
            log.warning(
                "reload: needs a restart to change (still running with the old value): %s",
                reload.described(later),
            )
        log.info("reload: trusting user CA %s; host certificate read again", fingerprint)
        message = "configuration reloaded"
        if applied:
            message += f"; applied: {reload.described(applied)}"
        if later:
            message += f"; needs a restart: {reload.described(later)}"
        await self.bastion.workers.audit("bastion.reload", message=message)

    # -- 3. drain ------------------------------------------------------------------------

    def _on_stop_signal(self, sig: int) -> None:
        if self._stop.is_set():
            log.warning("%s again: cutting the remaining sessions now", signal.Signals(sig).name)
            self._cut_now.set()
            return
        log.info("%s: draining", signal.Signals(sig).name)
        self._stop.set()

    async def _drain(self) -> None:
        b, timeout = self.bastion, self.config.drain_timeout
        self.draining = self.metrics.draining = True
        self.acceptor.close()  # no new connections; open ones stay
        started = time.monotonic()
        sessions, conns = len(b.registry.live), len(b.open)
        status = f"draining: {sessions} session(s) on {conns} connection(s); cut in {timeout:g} s"
        self.notifier.stopping(status)
        log.warning(
            "dt-bastion stopping: draining; no new connections; %d session(s) on %d "
            "connection(s) may run for up to %g s (drain_timeout; SIGTERM again to cut now)",
            sessions,
            conns,
            timeout,
        )
        await b.workers.audit(
            "bastion.drain",
            message=f"shutting down: {sessions} session(s) on {conns} connection(s) "
            f"may run for up to {timeout:g} s",
        )
        notice = f"dt-bastion: {SHUTDOWN}; open sessions are cut in {timeout:g} s"
        for conn in list(b.open):
            conn.send_debug(notice, always_display=True)
        while True:
            self._close_idle()
            if not b.open:
                break
            left = timeout - (time.monotonic() - started)
            if left <= 0 or self._cut_now.is_set():
                break
            try:
                await asyncio.wait_for(self._cut_now.wait(), min(DRAIN_POLL, left))
            except TimeoutError:
                pass
        if b.open:
            why = "a second stop signal" if self._cut_now.is_set() else f"{timeout:g} s passed"
            reason = f"{SHUTDOWN} (drain over: {why})"
            log.warning(
                "drain over (%s): cutting %d session(s) on %d connection(s)",
                why,
                len(b.registry.live),
                len(b.open),
            )
            await self._cut_all(reason)
        else:
            log.info("drained: every session ended on its own")
        await b.registry.stop(STOPPED)
        await b.disconnect_all(SHUTDOWN)
        await _closed(self.acceptor)

    def _close_idle(self) -> None:
        """Connections with no channel open (not logged in, or done) end now."""
        for conn in list(self.bastion.open):
            if not getattr(conn, "_channels", None):
                conn.disconnect(asyncssh.DISC_BY_APPLICATION, SHUTDOWN)

    async def _cut_all(self, reason: str) -> None:
        """End every connection left the way every cut goes
        (:meth:`BastionServer.terminate`): ``connection.terminated`` and each session's
        ``session.terminated``/``session.end`` on record (saying STOPPED, as every
        shutdown's session end does), then the SSH disconnect with the reason before
        any channel closes, so ``ssh -W`` prints it."""
        from bastion.proxy.server import BastionServer, disconnect

        cuts = []
        for conn in list(self.bastion.open):
            owner = conn.get_owner()
            if isinstance(owner, BastionServer):
                cuts.append(owner.terminate(reason, session_reason=STOPPED))
            else:
                disconnect(conn, reason)
        if cuts:
            await asyncio.gather(*cuts, return_exceptions=True)


async def _listening(where: str, starting: Any) -> Any:
    """Start a listener; "address already in use" and its kin become a clear error."""
    try:
        return await starting
    except OSError as exc:
        raise listen_error(where, exc) from None


async def _serve_on(bastion: Bastion, sockets: list[Any], options: dict[str, Any]) -> Any:
    """Accept on sockets a supervisor bound (every worker on the same ones)."""
    from bastion.proxy.server import BastionServer

    if bastion.config.proxy_protocol_from:
        from bastion.proxy.proxied import ProxyProtocolAcceptor

        (sock,) = sockets  # the supervisor binds one, as ProxyProtocolAcceptor.start
        sock.setblocking(False)
        proxied = ProxyProtocolAcceptor(bastion, options, sock)
        proxied._task = asyncio.get_running_loop().create_task(proxied._accept())
        return proxied
    acceptors = [
        await asyncssh.create_server(lambda: BastionServer(bastion), sock=sock, **options)
        for sock in sockets
    ]
    return acceptors[0] if len(acceptors) == 1 else _Acceptors(acceptors)


class _Acceptors:
    """Several asyncssh acceptors (one per address) as the one the service expects."""

    def __init__(self, acceptors: list[Any]) -> None:
        self.acceptors = acceptors
        self.sockets = [s for a in acceptors for s in a.sockets]

    def update(self, **options: Any) -> None:
        for acceptor in self.acceptors:
            acceptor.update(**options)

    def close(self) -> None:
        for acceptor in self.acceptors:
            acceptor.close()

    async def wait_closed(self) -> None:
        for acceptor in self.acceptors:
            await acceptor.wait_closed()


async def _closed(acceptor: Any) -> None:
    try:
        await asyncio.wait_for(acceptor.wait_closed(), 5)
    except TimeoutError:
        log.warning("some connections did not close within 5 s of the drain")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _addr(sockname: tuple[Any, ...]) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
