"""Live forwarded sessions and their revocation.

Every forwarded channel is registered with who opened it and where it goes. A
watcher polls the cluster's revision number (one indexed row, not whole tables)
every ``poll_interval`` seconds; when it moves, every live session is decided again
with the same policy functions that admitted it, and the ones no longer allowed are
closed and audited as ``session.terminated``. With the default 0.2 s poll, an
unenrolled device or a lock cuts sessions well within a second.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asyncssh.forward import SSHForwarder

from bastion import audit
from bastion.errors import AccessDenied, DTError
from bastion.proxy import policy
from bastion.storage import Store
from bastion.storage.records import Node

log = logging.getLogger("bastion.sessions")
_ids = itertools.count(1)


@dataclass(eq=False)
class LiveSession:
    identity: policy.Identity
    node: Node
    remote_addr: str | None
    close: Callable[[], None]
    id: int = field(default_factory=lambda: next(_ids))
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    bytes_up: int = 0  # client -> node
    bytes_down: int = 0  # node -> client
    ended: bool = False
    terminated_reason: str | None = None


class Registry:
    def __init__(self, store: Store, poll_interval: float = 0.2) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.live: dict[int, LiveSession] = {}
        self._task: asyncio.Task[None] | None = None
        self._revision = -1
        # Called (before live sessions are re-checked) whenever the revision moves.
        self.on_revision: list[Callable[[], None]] = []

    def add(self, session: LiveSession) -> None:
        self.live[session.id] = session
        audit.record(
            self.store,
            "session.start",
            message=f"forwarding to {session.node.name} ({session.node.addr})",
            user=session.identity.user,
            device=session.identity.asset_tag,
            remote_addr=session.remote_addr,
            node=session.node.name,
            session_id=session.id,
            serial=str(session.identity.serial),
        )

    def end(self, session: LiveSession) -> None:
        if session.ended:
            return
        session.ended = True
        self.live.pop(session.id, None)
        try:
            audit.record(
                self.store,
                "session.end",
                message=session.terminated_reason or "session closed",
                user=session.identity.user,
                device=session.identity.asset_tag,
                remote_addr=session.remote_addr,
                node=session.node.name,
                session_id=session.id,
                bytes_up=session.bytes_up,
                bytes_down=session.bytes_down,
                duration=round(time.monotonic() - session.started, 3),
            )
        except DTError:
            log.exception("could not audit the end of session %s", session.id)

    # -- revocation ----------------------------------------------------------------------------

    def start(self) -> None:
        self._revision = self.store.revision()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self, reason: str = "bastion shutting down") -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for session in list(self.live.values()):
            self._terminate(session, reason, audit_it=False)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                revision = self.store.revision()
            except DTError:
                log.exception("cannot read the cluster revision; live sessions go on")
                continue
            if revision != self._revision:
                self._revision = revision
                for listener in self.on_revision:
                    try:
                        listener()
                    except DTError:
                        log.exception("reacting to a state change failed")
                self.recheck()

    def recheck(self, now: float | None = None) -> int:
        """Close every live session the current state no longer allows; returns how many."""
        now = time.time() if now is None else now
        closed = 0
        for session in list(self.live.values()):
            try:
                node = self.store.find_node(session.node.name)
                if node is None or node.addr != session.node.addr:
                    raise AccessDenied(f"node {session.node.name} was removed from the inventory")
                policy.check_node_access(self.store, session.identity, node, now)
            except AccessDenied as exc:
                self._terminate(session, exc.message)
                closed += 1
            except DTError:
                log.exception("re-checking session %s failed; closing it", session.id)
                self._terminate(session, "state unreadable")
                closed += 1
        return closed

    def _terminate(self, session: LiveSession, reason: str, *, audit_it: bool = True) -> None:
        session.terminated_reason = reason
        if audit_it:
            try:
                audit.record(
                    self.store,
                    "session.terminated",
                    success=False,
                    message=reason,
                    user=session.identity.user,
                    device=session.identity.asset_tag,
                    remote_addr=session.remote_addr,
                    node=session.node.name,
                    session_id=session.id,
                )
            except DTError:
                log.exception("could not audit termination of session %s", session.id)
        session.close()
        self.end(session)


class CountingForwarder(SSHForwarder):
    """asyncssh's own forwarder, counting bytes and reporting the end of the session.

    Two forwarders make a session: the node side (``upstream=False``) is created as the
    TCP connection to the node opens, the client side (``upstream=True``) only once that
    connect has returned, and it gets its SSH channel later still. The node speaks
    first (its SSH banner), so bytes, an EOF or even a close (sshd's MaxStartups drop)
    can arrive in either gap. asyncssh's forwarder would keep them in the node side's
    buffer or drop them on a client side with no transport, and the client would wait
    for a banner that never comes. Here the client side takes over whatever arrived
    early and delivers it, in order, as soon as its channel exists.
    """

    def __init__(
        self,
        registry: Registry,
        session: LiveSession,
        upstream: bool,
        peer: SSHForwarder | None = None,
    ) -> None:
        self._pending = bytearray()
        self._pending_eof = False
        self._pending_close = False
        self._lost = False
        super().__init__(peer)
        self._registry = registry
        self._session = session
        self._upstream = upstream
        if isinstance(peer, CountingForwarder):
            self._pending += peer._inpbuf
            peer._inpbuf = b""
            self._pending_eof = peer.was_eof_received()
            self._pending_close = peer._lost

    def write(self, data: bytes) -> None:
        if self._transport is None and not self._lost:
            self._pending += data  # the client's channel is not open yet
            return
        super().write(data)

    def write_eof(self) -> None:
        if self._transport is None and not self._lost:
            self._pending_eof = True
            return
        super().write_eof()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            super().write(data)
        if self._pending_eof:
            super().write_eof()
        if self._pending_close:
            self.close()

    def data_received(self, data: bytes, datatype: object = None) -> None:
        if self._upstream:
            self._session.bytes_up += len(data)
        else:
            self._session.bytes_down += len(data)
        super().data_received(data, datatype)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._peer is not None and self._peer._transport is None:
            self._peer._pending_close = True  # type: ignore[attr-defined]
        super().connection_lost(exc)
        if self._upstream:
            self._registry.end(self._session)
