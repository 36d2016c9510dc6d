"""Prometheus ``/metrics`` and ``/healthz``, on a listener of their own.

Off unless ``metrics_listen`` (``--metrics-listen``) names an address; a port alone
means 127.0.0.1, and the SSH port is refused (config). Plain HTTP/1.0, GET or HEAD,
one request per connection, bounded in size and time; nothing here authenticates, so
keep it on loopback or behind a firewall.

* ``/healthz``: ``200 ok`` while serving with the cluster database answering a read
  within 2 s; ``503`` with the reason while draining (SIGTERM) or when it does not.
* ``/metrics``: the families in :data:`FAMILIES` (docs/getting-started.md lists them).
  Counters come from the audit log as rows commit (:data:`bastion.audit.observers`):
  every allow and deny is audited, so what is counted is what is on record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from bastion import audit
from bastion.authz.records import AuditEvent
from bastion.protocol.errors import DTError

if TYPE_CHECKING:
    from bastion.proxy.server import Bastion

log = logging.getLogger("bastion.service")
PREFIX = "dt_bastion"
HEALTH_TIMEOUT = 2.0
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192
MAX_CLIENTS = 16  # scrapes and probes at once; more are closed unanswered

# Why a login was refused, as a bounded label: the first phrase found in the audited
# reason names it (the reason itself is free text, and would be a label per user).
DENIAL_REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("revoked", ("revoked", "was not issued by this cluster")),
    ("untrusted_ca", ("unknown ca", "untrusted ca", "rotated")),
    ("expired", ("expired", "not yet valid", "not valid now")),
    ("locked", ("locked",)),
    ("device", ("device",)),
    ("source_address", ("source-address",)),
    ("signature", ("signature",)),
    ("rate_limit", ("too many", "is full", "busy", "limit")),
    ("signup", ("signup", "token")),
    ("password", ("password", "code")),
    ("handshake", ("before login",)),
    ("unknown_user", ("no such user", "names no")),
)


def denial_reason(message: str) -> str:
    text = message.lower()
    for label, phrases in DENIAL_REASONS:
        if any(phrase in text for phrase in phrases):
            return label
    return "other"


class Metrics:
    """The registry of one running bastion (its own, not prometheus_client's global)."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double every counter
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build = Info(f"{PREFIX}_build", "The running dt-bastion.", registry=r)
        self.build.info(
            {
                "version": _version("dt-bastion"),
                "asyncssh": _version("asyncssh"),
                "python": platform.python_version(),
            }
        )
        self.auth = Counter(
            f"{PREFIX}_auth",
            "Logins allowed (by method) and denied (by reason), as audited.",
            ["result", "reason"],
            registry=r,
        )
        self.certificates = Counter(
            f"{PREFIX}_certificates_issued", "User certificates signed by the CA.", registry=r
        )
        self.audit_events = Counter(
            f"{PREFIX}_audit_events",
            "Audit rows committed, by event type and result.",
            ["event", "result"],
            registry=r,
        )
        self.reloads = Counter(
            f"{PREFIX}_config_reloads",
            "SIGHUP reloads, applied or refused.",
            ["result"],
            registry=r,
        )
        self.storage = Histogram(
            f"{PREFIX}_storage_seconds",
            "Time from asking the cluster database to its answer, per worker lane.",
            ["lane"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.bastion: Bastion | None = None
        self.draining = False

    def attach(self, bastion: Bastion) -> None:
        """Count this bastion's audit rows, storage answers and logins from now on."""
        self.bastion = bastion
        audit.observers.append(self.observe_event)
        bastion.workers.observe = self.observe_storage
        self.registry.register(_Live(self))

    def detach(self) -> None:
        with contextlib.suppress(ValueError):
            audit.observers.remove(self.observe_event)

    def observe_storage(self, lane: str, seconds: float) -> None:
        self.storage.labels(lane).observe(seconds)

    def observe_event(self, event: AuditEvent) -> None:
        """After commit, on whichever thread committed (prometheus_client is thread-safe)."""
        name = event.type if event.type in audit.EVENT_CODES else "other"
        self.audit_events.labels(name, "allow" if event.success else "deny").inc()
        if event.type == "cert.create" and event.success:
            self.certificates.inc()
        elif event.type == "auth.failed":
            self.auth.labels("denied", denial_reason(event.message)).inc()

    def logged_in(self, method: str) -> None:
        self.auth.labels("allowed", method).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    """Gauges read from the running bastion at scrape time (on the event loop)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        b = self.metrics.bastion
        if b is None:
            return
        yield _gauge("connections_open", "SSH connections open (logged in or not).", len(b.open))
        yield _gauge(
            "connections_authenticated", "SSH connections logged in.", len(b.authenticated.live)
        )
        yield _gauge("sessions_open", "Forwarded sessions (ssh -J) open.", len(b.registry.live))
        yield _gauge(
            "password_checks_pending", "Password checks waiting or running.", b.password_checks
        )
        queued = GaugeMetricFamily(
            f"{PREFIX}_storage_queue",
            "Jobs waiting per worker lane; unwritten: audit/session rows not yet written.",
            labels=["lane"],
        )
        for lane, n in b.workers.queued().items():
            queued.add_metric([lane], n)
        yield queued
        yield _gauge("draining", "1 while draining for shutdown.", int(self.metrics.draining))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


# -- the HTTP listener -------------------------------------------------------------------------


class MetricsServer:
    """``/metrics`` and ``/healthz`` over plain HTTP on their own address."""

    def __init__(self, metrics: Metrics, health: Callable[[], Any]) -> None:
        self.metrics = metrics
        self.health = health  # async () -> None, raising DTError when not healthy
        self.server: asyncio.Server | None = None
        self.clients = 0

    async def start(self, host: str, port: int) -> str:
        self.server = await asyncio.start_server(
            self._serve, host, port, reuse_address=True, limit=MAX_REQUEST
        )
        sock = self.server.sockets[0].getsockname()
        return f"{sock[0]}:{sock[1]}" if ":" not in sock[0] else f"[{sock[0]}]:{sock[1]}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def wait_closed(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= MAX_CLIENTS:
            writer.close()
            return
        self.clients += 1
        try:
            await self._serve_one(reader, writer)
        finally:
            self.clients -= 1

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = b""
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            status, ctype, body = await self._answer(request)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
        except ConnectionError:
            writer.close()
            return
        head = request_method(request) == "HEAD"
        writer.write(
            f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\nCache-Control: no-store\r\n\r\n".encode()
        )
        if not head:
            writer.write(body)
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        writer.close()

    async def _answer(self, request: bytes) -> tuple[str, str, bytes]:
        method = request_method(request)
        parts = request.split(b"\r\n", 1)[0].split()
        path = parts[1].decode("ascii", "replace").split("?", 1)[0] if len(parts) >= 2 else ""
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET or HEAD only\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self.metrics.exposition()
        if path == "/healthz":
            try:
                await self.health()
            except DTError as exc:
                return "503 Service Unavailable", "text/plain", f"{exc.message}\n".encode()
            return "200 OK", "text/plain", b"ok\n"
        return "404 Not Found", "text/plain", b"not found: try /metrics or /healthz\n"


def request_method(request: bytes) -> str:
    return request.split(b" ", 1)[0].decode("ascii", "replace")
