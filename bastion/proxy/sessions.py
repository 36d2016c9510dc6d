"""Live forwarded sessions and their revocation.

Every forwarded channel is registered with who opened it and where it goes, and from
before its node connect starts: a lock that commits while the TCP connect to a slow
node is still in flight is seen, and that session never forwards. Once the node
answers the session is decided again, and only then is its start recorded.

A watcher polls the cluster's revision number (one indexed row, not whole tables)
every ``poll_interval`` seconds; when it moves, every live session is decided again
with the same policy functions that admitted it, and the ones no longer allowed are
closed and audited as ``session.terminated``. With the default 0.2 s poll, an
unenrolled device or a lock cuts sessions well within a second. Where a policy asks
for continuous attestation, each session also keeps its device's deadline from its
last decision, and is decided again on the first turn past it
(:mod:`bastion.proxy.attestation`). Everything the watcher reads or writes goes
through :mod:`bastion.proxy.workers`, never the loop.

Each open session also has a row in ``live_sessions`` under this process's instance
name, removed with its ``session.end``. A bastion killed outright leaves its rows
behind; the next bastion to start on the state directory, or a sibling already
running on it, finds them once the dead process's instance lock is free
(``store.claim_if_dead``: a flock in the state directory on SQLite, a session
advisory lock on PostgreSQL, so a sibling on another host sweeps too) and writes the
``session.end`` the dead one could not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from asyncssh.forward import SSHForwarder

from bastion import audit
from bastion.authz import decide, freshness
from bastion.authz.freshness import Freshness
from bastion.authz.records import Node, OpenSession
from bastion.protocol.errors import AccessDenied, DTError, StorageUnavailable
from bastion.proxy import policy
from bastion.proxy.workers import Workers
from bastion.storage import StateStore
from bastion.storage.interface import InstanceClaim

log = logging.getLogger("bastion.sessions")
_ids = itertools.count(1)
# How long a cut waits for its session.end to commit before closing anyway: the audit
# log says so before the client sees it, unless the database is locked.
CUT_WAIT = 0.5
SWEPT = (
    "another bastion took this one for dead (its liveness lock was lost) and ended "
    "this session on its behalf; connect again"
)


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
    owner: object | None = None  # the SSH connection it belongs to
    recorded: bool = False  # its start is on record; until then it is only tracked
    # The instance its live_sessions row is filed under, fixed when the start is
    # recorded: its end may be written after this bastion has let go of its claim
    # (a drain), and must still remove that row, not leave it for a sibling to sweep.
    instance: str | None = None
    # Continuous attestation: the device's attested_until when the session was last
    # decided; past it, the session is decided again (a good quote moves the deadline
    # without moving the revision). None: no policy asks for it.
    attest_deadline: float | None = None


def audit_fields(session: LiveSession) -> dict[str, Any]:
    """Who and where, for every audit event about one session."""
    return {
        "user": session.identity.user,
        "device": session.identity.asset_tag,
        "remote_addr": session.remote_addr,
        "node": session.node.name,
        "session_id": session.id,
    }


Listener = Callable[..., Awaitable[Any] | None]


class Registry:
    def __init__(
        self,
        store: StateStore,
        poll_interval: float = 0.2,
        sweep_interval: float = 10.0,
        workers: Workers | None = None,
        stale_after: float = 10.0,
        stale_grace: float = 30.0,
    ) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self.sweep_interval = sweep_interval
        self.workers = workers
        self._own_workers = False
        self.live: dict[int, LiveSession] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False  # set by stop(): the watcher ends at its next turn
        self._revision = -1
        self._unread = False  # the last revision read failed (logged once, not each turn)
        # Set by start() when the store is on disk; sessions are then also recorded
        # in live_sessions under this name.
        self._instance: InstanceClaim | None = None
        # Called (before live sessions are decided again) whenever the revision moves;
        # on_poll (with ``now``) on every turn.
        self.on_revision: list[Listener] = []
        self.on_poll: list[Listener] = []
        # Fail closed when blind (bastion.authz.freshness): the watcher confirms the
        # state at each revision read; the guard refuses new work past stale_after and
        # calls on_blind (then cuts what is left) once the grace is over too.
        self.freshness = Freshness(stale_after, stale_grace, time.monotonic())
        self.on_blind: list[Listener] = []
        self._guard_task: asyncio.Task[None] | None = None
        self._feed: concurrent.futures.ThreadPoolExecutor | None = None  # the watcher's wait

    @property
    def instance(self) -> str | None:
        return self._instance.name if self._instance else None

    def sessions_of(self, owner: object) -> list[LiveSession]:
        return [s for s in self.live.values() if s.owner is owner]

    # -- one session's life (the blocking halves run on a worker) -------------------------

    def add(self, session: LiveSession) -> None:
        """Record and audit the start, blocking; raises (and holds nothing) if that
        fails. The bastion itself opens sessions with :meth:`track` and :meth:`begin`."""
        self._record_start(self.store, session)
        session.recorded = True
        self.live[session.id] = session  # only once its start is on record

    def track(self, session: LiveSession) -> None:
        """Hold a session that is still connecting, so every re-check sees it."""
        self.live[session.id] = session

    def untrack(self, session: LiveSession) -> None:
        if not session.recorded:
            session.ended = True
            self.live.pop(session.id, None)

    async def begin(self, session: LiveSession) -> None:
        """Its node answered: decide again, then record the start. Raises AccessDenied
        (cut meanwhile, or no longer allowed) or StorageUnavailable; the caller then
        hangs up on the node. Runs to its end even if the opener goes away, so a start
        that commits is always followed by its end."""
        task = asyncio.ensure_future(self._begin(session))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda _: self.end(session) if session.recorded else None)
            raise

    async def _begin(self, session: LiveSession) -> None:
        workers = self._workers()
        _refuse_if_ended(session)
        now = time.time()
        decide.check_not_expired(session.identity, now)
        session.attest_deadline = await workers.read(
            policy.check_live_session, session.identity, session.node, now
        )
        _refuse_if_ended(session)
        await workers.write(self._record_start, session)
        session.recorded = True
        if session.ended:  # cut while its start was being written: end it now
            await workers.persist(self._record_end, session, session.terminated_reason, 0.0)
            _refuse_if_ended(session)

    def end(self, session: LiveSession) -> None:
        """The session closed (from a synchronous callback): its end is written soon."""
        if session.ended:
            return
        session.ended = True
        self.live.pop(session.id, None)
        if not session.recorded:
            return
        duration = round(time.monotonic() - session.started, 3)
        if self.workers is not None:
            self.workers.write_soon(self._record_end, session, None, duration)
            return
        try:
            self._record_end(self.store, session, None, duration)
        except DTError:
            # The row stays; a later sweep ends it in the audit log once this
            # process is gone.
            log.exception("could not audit the end of session %s", session.id)

    def _record_start(self, store: StateStore, session: LiveSession) -> None:
        with store.transaction(bump=False):
            if self._instance is not None:
                session.instance = self._instance.name
                store.add_open_session(
                    OpenSession(
                        instance=session.instance,
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
                store,
                "session.start",
                message=f"forwarding to {session.node.name} ({session.node.addr})",
                **audit_fields(session),
                bastion=self.instance,
                serial=str(session.identity.serial),
            )

    def _record_end(
        self, store: StateStore, session: LiveSession, terminated: str | None, duration: float = 0.0
    ) -> None:
        """``session.terminated`` (if it was cut) and ``session.end``, in one commit."""
        with store.transaction(bump=False):
            if terminated is not None:
                audit.record(
                    store,
                    "session.terminated",
                    success=False,
                    message=terminated,
                    **audit_fields(session),
                )
            if session.instance is not None:
                store.remove_open_session(session.instance, session.id)
            audit.record(
                store,
                "session.end",
                message=session.terminated_reason or "session closed",
                **audit_fields(session),
                bastion=session.instance or self.instance,
                bytes_up=session.bytes_up,
                bytes_down=session.bytes_down,
                duration=duration or round(time.monotonic() - session.started, 3),
            )

    # -- revocation ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._instance is None:  # None again for an in-memory store: nobody to see it
            self._instance = self.store.hold_instance()
        if self.workers is None:
            self.workers, self._own_workers = Workers(self.store), True
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._watch())
        self.freshness.confirmed = time.monotonic()
        self._guard_task = asyncio.get_running_loop().create_task(self._guard())

    def _workers(self) -> Workers:
        if self.workers is None:
            self.workers, self._own_workers = Workers(self.store), True
        return self.workers

    def sweep(self, *, stale_files: bool = False) -> int:
        """End, in the audit log, the sessions of bastions that died without doing so.

        Returns how many were ended. Safe with any number of bastions sweeping at once:
        an instance is swept only while its lock is held, and its rows are taken and
        their ``session.end`` written in one transaction.
        """
        if self._instance is None:
            return 0
        names = set(self.store.open_session_instances())
        if stale_files:  # lock files of bastions killed while holding no session
            names.update(self.store.stale_instances(self._instance.name))
        names.discard(self._instance.name)
        ended = 0
        for name in sorted(names):
            with self.store.claim_if_dead(name) as dead:
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
        try:  # a quiet log's last rows get signed too, not only at the next append
            self.store.checkpoint_audit_if_stale(time.time())
        except Exception:
            log.exception("could not sign an audit checkpoint; will retry")

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

    async def _cut_swept(self, workers: Workers) -> None:
        """Cut the live sessions whose rows a sibling took: it called this bastion dead
        (its liveness lock was free at two looks: a connection dropped, and it could
        not take the lock again in time) and wrote their ``session.end``; a session the
        audit log says has ended must not go on."""
        if self._instance is None:
            return
        name = self._instance.name
        recorded = [
            s for s in self.live.values() if s.recorded and not s.ended and s.instance == name
        ]
        if not recorded:
            return
        try:
            rows = await workers.read(lambda store: store.list_open_sessions(name))
        except DTError:
            return  # a database that does not answer: the blind guard decides
        have = {row.session_id for row in rows}
        swept = [(s, SWEPT) for s in recorded if s.id not in have and not s.ended]
        if swept:
            log.error("%d live session(s) ended on this bastion's behalf: cutting", len(swept))
            await self.cut(swept)

    async def stop(self, reason: str = "bastion shutting down") -> None:
        self._stopping = True
        if self._guard_task is not None:
            self._guard_task.cancel()
            self._guard_task = None
        task, self._task = self._task, None
        while task is not None and not task.done():
            # Python 3.11's wait_for can swallow a cancellation that lands as its inner
            # future completes (gh-86296): the watcher then ran on and a SIGTERM right
            # after start hung forever. So cancel again until it is over; the loop
            # also checks the flag.
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        doomed = [(session, reason) for session in self.live.values()]
        if self.workers is not None:
            await self.cut(doomed, audit_it=False, wait=5.0)
            if self._own_workers:
                await asyncio.to_thread(self.workers.close)
                self.workers = None
        else:
            for session, why in doomed:
                self._terminate(session, why, audit_it=False)
        if self._feed is not None:
            self._feed.shutdown(wait=False)
            self._feed = None
        if self.workers is not None:
            # The ends of sessions that closed on their own are queued on the shared
            # writer: let them land (in order, so behind this no-op) before giving up
            # the claim, or a sibling sweeping meanwhile ends them "killed or crashed".
            await self.workers.persist(lambda _store: None, wait=5.0)
        if self._instance is not None:
            # Any row left (its end could not be written) is swept by the next bastion.
            self._instance.release()
            self._instance = None

    async def _watch(self) -> None:
        """Runs for the bastion's life. This loop is what cuts revoked sessions, so a
        failure in one turn is logged and the next turn tries again."""
        workers = self._workers()
        next_sweep = 0.0
        stale_files = True  # the first sweep also looks for lock files of dead bastions
        sweeping: asyncio.Future[None] | None = None
        while not self._stopping:
            try:
                # The sweep runs beside the re-checks, never in front of them: a busy
                # ceremony lane (a flood of password attempts) must not delay a cut.
                if time.monotonic() >= next_sweep and (sweeping is None or sweeping.done()):
                    next_sweep = time.monotonic() + self.sweep_interval
                    sweeping = asyncio.ensure_future(
                        workers.call(functools.partial(self._sweep_safely, stale_files=stale_files))
                    )
                    sweeping.add_done_callback(_log_failure)
                    stale_files = False
                    await self._cut_swept(workers)
                await self._follow_revision(workers)
                await self._check_deadlines(workers)
                for listener in self.on_poll:
                    await _maybe_await(listener(time.time()))
            except Exception:
                log.exception("re-checking live sessions failed; trying again")
            await self._wait_for_change()

    async def _wait_for_change(self) -> None:
        """Until the next turn: ``poll_interval``, or less when the store's change feed
        says something committed (PostgreSQL's NOTIFY: a lock on another bastion cuts
        here in milliseconds, not a poll later). The wait runs on a thread of its own,
        never on the loop; SQLite has no feed and just sleeps."""
        if self._feed is None:
            self._feed = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dt-feed")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._feed, self.store.wait_for_change, self.poll_interval)

    async def _follow_revision(self, workers: Workers) -> None:
        asked = time.monotonic()
        try:
            revision = await workers.read(lambda store: store.revision())
        except DTError:
            if not self._unread:  # once per outage: a turn is every poll_interval
                log.exception("cannot read the cluster revision; live sessions go on")
            self._unread = True
            return
        self._unread = False
        self._confirm(asked)
        if revision == self._revision:
            return
        settled = True
        for listener in self.on_revision:
            try:
                await _maybe_await(listener())
            except Exception:  # never let one listener stop the re-checks below
                log.exception("reacting to a state change failed; trying again")
                settled = False
        doomed = await workers.read(self._doomed, list(self.live.values()), time.time())
        await self.cut(doomed)
        if settled:
            self._revision = revision  # only now: a re-check that failed is tried again

    async def _check_deadlines(self, workers: Workers) -> None:
        """On every turn: sessions whose device's attestation deadline passed are
        decided again, as :meth:`Connections.check_expired` does for certificates. Those
        whose device attested since go on with the new deadline; the others are cut with
        the reason (``posture.check_device_posture``). A failed quote needs no turn of
        its own: it moves the revision, and the sessions are decided again at once."""
        now = time.time()
        due = [
            s
            for s in self.live.values()
            if s.attest_deadline is not None and s.attest_deadline <= now and not s.ended
        ]
        if not due:
            return
        try:
            doomed = await workers.read(self._doomed, due, now)
        except DTError:
            return  # the database did not answer: the next turn asks again
        await self.cut(doomed)

    # -- fail closed when blind ---------------------------------------------------------

    async def _guard(self) -> None:
        """Beside the watcher, never behind it: a read that hangs (SQLite retries a
        locked WAL index for ~10 s) must not hold up noticing that it hangs."""
        while not self._stopping:
            try:
                step = self.freshness.tick(time.monotonic())
                if step == "stale":
                    self._declare_stale()
                elif step == "cut":
                    await self._end_blind()
            except Exception:
                log.exception("acting on a stale view of the state failed; trying again")
            await asyncio.sleep(self.poll_interval)

    def _declare_stale(self) -> None:
        f = self.freshness
        log.error(
            "cannot confirm the cluster state is current (no answer from the cluster "
            "database for %g s): refusing new sessions and logins; live sessions end "
            "in %g s unless it answers",
            f.stale_after,
            f.grace,
        )
        self._workers().audit_soon(  # queued: the write may fail too while blind
            "state.stale",
            success=False,
            message=f"the cluster database has not answered for {f.stale_after:g} s "
            f"(state_stale_after): new sessions and logins are refused; live sessions "
            f"end after {f.grace:g} s more (state_stale_grace)",
            bastion=self.instance,
            sessions=len(self.live),
        )

    async def _end_blind(self) -> None:
        log.error("still blind after the grace: ending %d live session(s)", len(self.live))
        for listener in self.on_blind:  # the server ends connections, saying why
            await _maybe_await(listener())
        await self.cut([(session, freshness.BLIND_CUT) for session in self.live.values()])

    def _confirm(self, asked: float) -> None:
        f = self.freshness
        refused = f.refused
        blind = f.confirm(asked, time.monotonic())
        if blind is None:
            return
        log.warning("the cluster state is current again after %.1f s", blind)
        self._workers().audit_soon(
            "state.confirmed",
            message=f"the cluster database answers again after {blind:.1f} s; "
            f"{refused} connection(s) were refused meanwhile",
            bastion=self.instance,
            blind_seconds=round(blind, 1),
            refused=refused,
        )

    def recheck(self, now: float | None = None) -> int:
        """Close every live session the current state no longer allows; returns how
        many. Blocking, on this registry's store (the watcher does the same off-loop)."""
        now = time.time() if now is None else now
        doomed = self._doomed(self.store, list(self.live.values()), now)
        for session, reason in doomed:
            self._terminate(session, reason)
        return len(doomed)

    @staticmethod
    def _doomed(
        store: StateStore, sessions: list[LiveSession], now: float
    ) -> list[tuple[LiveSession, str]]:
        """The sessions the state no longer allows, and why. A database that does not
        answer raises (the watcher tries again); one that answers garbage cuts."""
        doomed = []
        for session in sessions:
            try:
                session.attest_deadline = policy.check_live_session(
                    store, session.identity, session.node, now
                )
            except AccessDenied as exc:
                doomed.append((session, exc.message))
            except StorageUnavailable:
                raise
            except Exception:  # a corrupt row decodes as garbage: cut (fail closed)
                log.exception("re-checking session %s failed; closing it", session.id)
                doomed.append((session, "state unreadable"))
        return doomed

    async def cut(
        self,
        doomed: list[tuple[LiveSession, str]],
        *,
        audit_it: bool = True,
        wait: float = CUT_WAIT,
        close: bool = True,
    ) -> None:
        """End these sessions: ``session.terminated`` (unless ``audit_it`` is False)
        and ``session.end`` in one commit, waited for up to ``wait`` seconds so the
        audit log says so before the client sees it, then close them. A session still
        connecting has nothing on record: its connect is abandoned (its ``close``) and
        its opener refuses it with the reason (:meth:`begin`). With ``close`` False
        the recorded ones are left for the caller to close (a disconnect that must
        reach the client first)."""
        closing, writes = [], []
        for session, reason in doomed:
            if session.ended:
                continue
            session.terminated_reason = reason
            session.ended = True
            self.live.pop(session.id, None)
            if not session.recorded:
                session.close()
                continue
            closing.append(session)
            duration = round(time.monotonic() - session.started, 3)
            terminated = reason if audit_it else None
            writes.append(
                self._workers().persist(self._record_end, session, terminated, duration, wait=wait)
            )
        if writes:
            await asyncio.gather(*writes)
        for session in closing if close else ():
            session.close()

    def _terminate(self, session: LiveSession, reason: str, *, audit_it: bool = True) -> None:
        """:meth:`cut`, blocking (the synchronous :meth:`recheck` and :meth:`stop`
        without workers)."""
        session.terminated_reason = reason
        session.ended = True
        self.live.pop(session.id, None)
        if session.recorded:
            try:
                self._record_end(self.store, session, reason if audit_it else None)
            except DTError:
                log.exception("could not audit termination of session %s", session.id)
        # End (and commit) first, then close: once the client sees its session cut,
        # the audit log already says so.
        session.close()


def _refuse_if_ended(session: LiveSession) -> None:
    if session.ended:
        raise AccessDenied(session.terminated_reason or "the session was closed while it opened")


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("sweeping sessions of stopped bastions failed: %s", future.exception())


async def _maybe_await(result: Any) -> None:
    if inspect.isawaitable(result):
        await result


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
