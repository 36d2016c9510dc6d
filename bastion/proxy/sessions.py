"""Live forwarded sessions and their revocation.

Every forwarded channel is registered with who opened it and where it goes. A
watcher polls the cluster's revision number (one indexed row, not whole tables)
every ``poll_interval`` seconds; when it moves, every live session is decided again
with the same policy functions that admitted it, and the ones no longer allowed are
closed and audited as ``session.terminated``. With the default 0.2 s poll, an
unenrolled device or a lock cuts sessions well within a second.

Each open session also has a row in ``live_sessions`` under this process's instance
name, removed with its ``session.end``. A bastion killed outright leaves its rows
behind; the next bastion to start on the state directory, or a sibling already
running on it, finds them once the dead process's instance lock is free
(``instances.claim_if_dead``) and writes the ``session.end`` the dead one could not.
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
from bastion.authz.records import Node, OpenSession
from bastion.protocol.errors import AccessDenied, DTError
from bastion.proxy import instances, policy
from bastion.storage import Store

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


def audit_fields(session: LiveSession) -> dict[str, Any]:
    """Who and where, for every audit event about one session."""
    return {
        "user": session.identity.user,
        "device": session.identity.asset_tag,
        "remote_addr": session.remote_addr,
        "node": session.node.name,
        "session_id": session.id,
    }


class Registry:
    def __init__(
        self, store: Store, poll_interval: float = 0.2, sweep_interval: float = 10.0
    ) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.sweep_interval = sweep_interval
        self.live: dict[int, LiveSession] = {}
        self._task: asyncio.Task[None] | None = None
        self._revision = -1
        # Set by start() when the store is on disk; sessions are then also recorded
        # in live_sessions under this name.
        self._instance: instances.InstanceLock | None = None
        # Called (before live sessions are re-checked) whenever the revision moves.
        self.on_revision: list[Callable[[], None]] = []

    @property
    def instance(self) -> str | None:
        return self._instance.name if self._instance else None

    def add(self, session: LiveSession) -> None:
        """Record and audit the start; raises (and holds nothing) if that fails."""
        with self.store.transaction(bump=False):
            if self._instance is not None:
                self.store.add_open_session(
                    OpenSession(
                        instance=self._instance.name,
                        session_id=session.id,
                        started=session.started_wall,
                        user=session.identity.user,
                        device=session.identity.asset_tag,
                        node=session.node.name,
                        remote_addr=session.remote_addr,
                        serial=str(session.identity.serial),
                    )
                )
            audit.record(
                self.store,
                "session.start",
                message=f"forwarding to {session.node.name} ({session.node.addr})",
                **audit_fields(session),
                bastion=self.instance,
                serial=str(session.identity.serial),
            )
        self.live[session.id] = session  # only once its start is on record

    def end(self, session: LiveSession) -> None:
        if session.ended:
            return
        session.ended = True
        self.live.pop(session.id, None)
        try:
            with self.store.transaction(bump=False):
                if self._instance is not None:
                    self.store.remove_open_session(self._instance.name, session.id)
                audit.record(
                    self.store,
                    "session.end",
                    message=session.terminated_reason or "session closed",
                    **audit_fields(session),
                    bastion=self.instance,
                    bytes_up=session.bytes_up,
                    bytes_down=session.bytes_down,
                    duration=round(time.monotonic() - session.started, 3),
                )
        except DTError:
            # The row stays; a later sweep ends it in the audit log once this
            # process is gone.
            log.exception("could not audit the end of session %s", session.id)

    # -- revocation ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.store.path is not None and self._instance is None:
            self._instance = instances.InstanceLock.acquire(self.store.path.parent)
            self._sweep_safely(stale_files=True)
        self._revision = self.store.revision()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def sweep(self, *, stale_files: bool = False) -> int:
        """End, in the audit log, the sessions of bastions that died without doing so.

        Returns how many were ended. Safe with any number of bastions sweeping at once:
        an instance is swept only while its lock is held, and its rows are taken and
        their ``session.end`` written in one transaction.
        """
        if self._instance is None:
            return 0
        state_dir = self._instance.state_dir
        names = set(self.store.open_session_instances())
        if stale_files:  # lock files of bastions killed while holding no session
            names.update(instances.stale_names(state_dir, self._instance.name))
        names.discard(self._instance.name)
        ended = 0
        for name in sorted(names):
            with instances.claim_if_dead(state_dir, name) as dead:
                if dead:
                    ended += self._end_orphans(name)
        return ended

    def _sweep_safely(self, *, stale_files: bool = False) -> None:
        """A sweep that fails (a busy or read-only disk) is tried again at the next
        interval; it must never stop the watcher, which also cuts revoked sessions."""
        try:
            self.sweep(stale_files=stale_files)
        except Exception:
            log.exception("could not end sessions left by a stopped bastion; will retry")

    def _end_orphans(self, name: str) -> int:
        now = time.time()
        with self.store.transaction(bump=False):
            orphans = self.store.take_open_sessions(name)
            for o in orphans:
                audit.record(
                    self.store,
                    "session.end",
                    message=(
                        f"bastion {name} stopped without ending this session (killed or "
                        f"crashed); ended on its behalf by bastion {self.instance}"
                    ),
                    user=o.user,
                    device=o.device,
                    remote_addr=o.remote_addr,
                    node=o.node,
                    session_id=o.session_id,
                    bastion=name,
                    recovered=True,
                    duration_at_most=round(now - o.started, 3),
                    now=now,
                )
        if orphans:
            log.warning("ended %d session(s) left open by bastion %s", len(orphans), name)
        return len(orphans)

    async def stop(self, reason: str = "bastion shutting down") -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for session in list(self.live.values()):
            self._terminate(session, reason, audit_it=False)
        if self._instance is not None:
            # Any row left (its end could not be written) is swept by the next bastion.
            self._instance.release()
            self._instance = None

    async def _watch(self) -> None:
        """Runs for the bastion's life. This loop is what cuts revoked sessions, so a
        failure in one turn is logged and the next turn tries again."""
        next_sweep = time.monotonic() + self.sweep_interval
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.sweep_interval
                    self._sweep_safely()
                self._follow_revision()
            except Exception:
                log.exception("re-checking live sessions failed; trying again")

    def _follow_revision(self) -> None:
        try:
            revision = self.store.revision()
        except DTError:
            log.exception("cannot read the cluster revision; live sessions go on")
            return
        if revision == self._revision:
            return
        for listener in self.on_revision:
            try:
                listener()
            except DTError:
                log.exception("reacting to a state change failed")
        self.recheck()
        self._revision = revision  # only now: a re-check that failed is tried again

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
                    **audit_fields(session),
                )
            except DTError:
                log.exception("could not audit termination of session %s", session.id)
        # End (and commit) first, then close: once the client sees its session cut,
        # the audit log already says so.
        self.end(session)
        session.close()


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
