"""Storage work of the asyncssh shell, done off the event loop.

The bastion is one asyncio process. A SQLite call made on the loop waits for the
disk, and for another process's write lock for up to the busy timeout, and every
connection waits with it: one audit write behind a ``BEGIN IMMEDIATE`` held for 12 s
froze the loop for 11.6 s (a read-only request included) and dropped a user's live
session. So the shell never calls the StateStore itself. It hands the work to one of
three lanes and awaits the answer:

* ``read``: a small pool of threads, each with a connection of its own. In WAL mode
  readers never wait for a writer, so decisions go on while another process writes.
* ``write``: one writer thread with its own connection, in order. What is queued when
  it wakes is written in one transaction (one fsync for a burst of audit rows), each
  job in a savepoint so that one failing job fails alone.
* ``call``: blocking work that brings its own store and spends time outside it
  (argon2 at a password login, a quote check, an enrollment's commit). A pool of its
  own, so a login stuck behind a locked database never holds up a read.

Every awaited job has a bound (``timeout``): a job still queued by then is withdrawn
and its caller refused with :class:`StorageUnavailable` and a clear message; a job
already running is waited for (SQLite's busy timeout bounds it). Fire-and-forget
writes (an audit row from a synchronous callback) are retried until they land, so a
lock held longer than the busy timeout loses nothing; only shutdown or a runaway
queue (``max_pending``) gives up on them, and says so in the log.

A store in memory (tests) has one connection: every lane then runs on one thread with
it, still off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from bastion import audit
from bastion.protocol.errors import DTError, StorageUnavailable
from bastion.storage import StateStore

log = logging.getLogger("bastion.workers")
T = TypeVar("T")

READERS = 2
CALLERS = 4
MAX_BATCH = 512
MAX_PENDING = 100_000  # fire-and-forget writes held while the database refuses them
_RETRY_FIRST, _RETRY_MAX = 0.05, 1.0

_PENDING, _STARTED, _WITHDRAWN = range(3)
_job_lock = threading.Lock()
_STOP = object()


class _Job:
    """One piece of work and the future its caller awaits (if any)."""

    __slots__ = ("fn", "write", "retry", "loop", "future", "state")

    def __init__(
        self,
        fn: Callable[[StateStore], Any],
        *,
        write: bool,
        retry: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
        future: asyncio.Future[Any] | None = None,
    ) -> None:
        self.fn = fn
        self.write = write  # in a write transaction (else run alone: a read or a call)
        self.retry = retry  # fire-and-forget: kept until it lands
        self.loop = loop
        self.future = future
        self.state = _PENDING

    def start(self) -> bool:
        """Called by the worker: False if the caller withdrew it meanwhile."""
        with _job_lock:
            if self.state == _WITHDRAWN:
                return False
            self.state = _STARTED
            return True

    def withdraw(self) -> bool:
        """Called by a caller that gave up: True if it never started (and never will)."""
        with _job_lock:
            if self.state == _PENDING:
                self.state = _WITHDRAWN
                return True
            return False

    def again(self) -> None:
        with _job_lock:
            self.state = _PENDING

    def settle(self, ok: bool, value: Any) -> None:
        if self.future is None or self.loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the caller's loop is gone
            self.loop.call_soon_threadsafe(_settle, self.future, ok, value)

    def run_alone(self, store: StateStore) -> None:
        if not self.start():
            return
        try:
            result = self.fn(store)
        except BaseException as exc:  # the caller decides what an error means
            self.settle(False, exc)
        else:
            self.settle(True, result)


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class Workers:
    """The three lanes over one cluster store (see module docstring)."""

    def __init__(
        self,
        store: StateStore,
        *,
        readers: int = READERS,
        callers: int = CALLERS,
        timeout: float = 5.0,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.store = store
        self.timeout = timeout
        self.max_pending = max_pending
        self.batches = 0  # write transactions committed, for tests
        self._lock = threading.Lock()
        self._own: list[StateStore] = []
        self._pending = 0  # fire-and-forget jobs not yet landed
        self._dropped = 0
        self._closed = False
        # Told (lane, seconds) of every answered read/write/call (the service's metrics).
        self.observe: Callable[[str, float], None] | None = None
        self._writes: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[tuple[threading.Thread, queue.SimpleQueue[Any]]] = []
        self._ready = threading.Semaphore(0)
        # Each lane thread opens its own sibling store in its own thread (below); this
        # first one only tells whether siblings exist (None: an in-memory store's one
        # connection), and is closed at once. One that cannot be opened now (a
        # read-only disk) exists all the same: each thread tries again at each job.
        try:
            first = store.sibling(timeout=timeout)
        except DTError:
            first = store
        else:
            if first is not None:
                first.close()
        if first is None:  # one connection: one thread does everything, in order
            self._reads = self._calls = self._writes
            self._spawn("dt-store", self._writes, self._write_loop, self._shared)
        else:
            self._reads = queue.SimpleQueue()
            self._calls = queue.SimpleQueue()
            own = self._open_own
            self._spawn("dt-write", self._writes, self._write_loop, own)
            for i in range(readers):
                self._spawn(f"dt-read-{i}", self._reads, self._serve_loop, own)
            for i in range(callers):
                self._spawn(f"dt-call-{i}", self._calls, self._serve_loop, self._shared)
        # Every thread's connection is made before anyone is served: the same
        # descriptors for the process's life, and no thread competing for the GIL with
        # the first handshakes.
        deadline = time.monotonic() + 10
        for _ in self._threads:
            self._ready.acquire(timeout=max(0.0, deadline - time.monotonic()))

    # -- what callers use ---------------------------------------------------------------

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(store, *args)`` on a reader's own connection; bounded."""
        job = _Job(lambda store: fn(store, *args, **kwargs), write=False)
        return await self._await(self._reads, job, self.timeout, "read")

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(store, *args)`` in the writer's next transaction, answered once that
        committed; raises StorageUnavailable if it cannot be (never retried: the
        caller refuses what it was about to grant)."""
        job = _Job(lambda store: fn(store, *args, **kwargs), write=True)
        return await self._await(self._writes, job, self.timeout, "write")

    async def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """``fn(*args)``: blocking work that uses a store of its own; bounded."""
        job = _Job(lambda _store: fn(*args), write=False)
        bound = self.timeout if timeout is None else timeout
        return await self._await(self._calls, job, bound, "call")

    def write_soon(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Fire and forget, from synchronous callbacks: written as soon as the
        database lets it, retried until then."""
        self._enqueue_retried(lambda store: fn(store, *args, **kwargs), None, None)

    def audit_soon(self, event_type: str, **fields: Any) -> None:
        """One audit row, fire and forget (retried until it lands)."""
        self.write_soon(_record, event_type, fields)

    async def persist(self, fn: Callable[..., Any], *args: Any, wait: float = 1.0) -> bool:
        """``fn(store, *args)`` retried until it lands, as :meth:`write_soon`; waits up
        to ``wait`` seconds for it, never longer, and never raises. True if it landed
        within the wait."""
        return await self._landed(lambda store: fn(store, *args), wait)

    async def audit(self, event_type: str, *, wait: float = 1.0, **fields: Any) -> bool:
        """One audit row, as :meth:`persist`: a refusal is on record before its client
        hears of it, unless the database is locked; then the row waits, not the caller."""
        return await self._landed(lambda store: _record(store, event_type, fields), wait)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (retrying for up to ``timeout``), stop the threads and
        close the connections this object opened."""
        if self._closed:
            return
        self._closed = True
        self._give_up_at = time.monotonic() + timeout
        for _thread, lane in self._threads:
            lane.put(_STOP)  # one per thread; a shared lane gets one for each
        for thread, _lane in self._threads:
            thread.join(max(0.1, self._give_up_at - time.monotonic() + 1))
        if self._pending:
            log.error("%d audit/session row(s) could not be written before exit", self._pending)
        with self._lock:
            own, self._own = self._own, []
        for store in own:
            with contextlib.suppress(Exception):
                store.close()

    # -- callers' side --------------------------------------------------------------------

    def queued(self) -> dict[str, int]:
        """Jobs waiting in each lane, and fire-and-forget rows not yet written."""
        lanes = {"read": self._reads, "write": self._writes, "call": self._calls}
        return {name: lane.qsize() for name, lane in lanes.items()} | {"unwritten": self._pending}

    async def _await(self, lane: queue.SimpleQueue[Any], job: _Job, bound: float, name: str) -> Any:
        started = time.monotonic()
        try:
            return await self._answer(lane, job, bound)
        finally:
            if self.observe is not None:
                self.observe(name, time.monotonic() - started)

    async def _answer(self, lane: queue.SimpleQueue[Any], job: _Job, bound: float) -> Any:
        if self._closed:
            raise StorageUnavailable("the bastion is shutting down; try again")
        loop = asyncio.get_running_loop()
        job.loop, job.future = loop, loop.create_future()
        lane.put(job)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), bound)
        except TimeoutError:
            if job.withdraw():
                raise StorageUnavailable(
                    f"the cluster database did not answer within {bound:g} s (busy or "
                    "unreachable); nothing was done: try again"
                ) from None
            return await job.future  # running: its own busy timeout bounds it
        except asyncio.CancelledError:
            job.withdraw()
            raise

    async def _landed(self, fn: Callable[[StateStore], Any], wait: float) -> bool:
        if self._closed:
            return False
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._enqueue_retried(fn, loop, future):
            return False
        try:
            await asyncio.wait_for(asyncio.shield(future), wait)
        except Exception:  # not yet (it stays queued), or refused (logged)
            return False
        return True

    def _enqueue_retried(
        self,
        fn: Callable[[StateStore], Any],
        loop: asyncio.AbstractEventLoop | None,
        future: asyncio.Future[Any] | None,
    ) -> bool:
        with self._lock:
            if self._pending >= self.max_pending or self._closed:
                self._dropped += 1
                dropped = self._dropped
            else:
                self._pending += 1
                dropped = 0
        if dropped:
            if dropped in (1, 10, 100) or dropped % 1000 == 0:
                log.error(
                    "%d audit/session row(s) dropped: the cluster database has refused "
                    "writes for too long, or the bastion is stopping",
                    dropped,
                )
            return False
        self._writes.put(_Job(fn, write=True, retry=True, loop=loop, future=future))
        return True

    # -- workers' side --------------------------------------------------------------------

    def _spawn(
        self,
        name: str,
        lane: queue.SimpleQueue[Any],
        target: Callable[..., None],
        opener: Callable[[], StateStore],
    ) -> None:
        thread = threading.Thread(target=target, args=(lane, opener), name=name, daemon=True)
        self._threads.append((thread, lane))
        thread.start()

    def _shared(self) -> StateStore:
        return self.store

    def _open_own(self) -> StateStore:
        # A sibling: SQLite opens the file again (no check: the bastion did it at start)
        # with our own busy timeout, not the 10 s default; PostgreSQL shares the pool.
        store = cast(StateStore, self.store.sibling(timeout=self.timeout))
        with self._lock:
            self._own.append(store)
        return store

    def _serve_loop(self, lane: queue.SimpleQueue[Any], opener: Callable[[], StateStore]) -> None:
        store = _try_open(opener)
        self._ready.release()
        while (job := lane.get()) is not _STOP:
            if store is None:
                try:
                    store = opener()
                except DTError as exc:
                    if job.start():
                        job.settle(False, exc)
                    continue
            job.run_alone(store)

    def _write_loop(self, lane: queue.SimpleQueue[Any], opener: Callable[[], StateStore]) -> None:
        store = _try_open(opener)
        self._ready.release()
        retry: list[_Job] = []
        backoff, stopping = _RETRY_FIRST, False
        while True:
            jobs, retry = retry, []
            if not stopping:
                stopping = _take(lane, jobs, block=not jobs)
            if not jobs:
                if stopping:
                    return
                continue
            try:
                if store is None:
                    store = opener()
            except DTError as exc:
                retry = _fail(jobs, exc)
            else:
                retry = self._run_in_order(store, jobs)
            if not retry:
                backoff = _RETRY_FIRST
                continue
            if stopping and time.monotonic() >= getattr(self, "_give_up_at", 0):
                return
            time.sleep(backoff)
            backoff = min(backoff * 2, _RETRY_MAX)

    def _run_in_order(self, store: StateStore, jobs: list[_Job]) -> list[_Job]:
        """Consecutive writes share one transaction; a read or a call (the one-thread
        in-memory mode) runs alone, in its place. Returns what must be retried."""
        retry: list[_Job] = []
        batch: list[_Job] = []
        for job in jobs:
            if job.write:
                batch.append(job)
                continue
            retry += self._commit(store, batch)
            batch = []
            job.run_alone(store)
        return retry + self._commit(store, batch)

    def _commit(self, store: StateStore, jobs: list[_Job]) -> list[_Job]:
        jobs = [job for job in jobs if job.start()]
        if not jobs:
            return []
        results: list[tuple[_Job, bool, Any]] = []
        try:
            with store.transaction(bump=False):
                for job in jobs:
                    try:
                        with store.savepoint():
                            results.append((job, True, job.fn(store)))
                    except (StorageUnavailable, sqlite3.OperationalError):
                        raise  # the disk or the lock: the whole batch waits or fails
                    except Exception as exc:  # this job alone
                        results.append((job, False, exc))
        except DTError as exc:
            return _fail(jobs, exc)
        self.batches += 1
        for job, ok, value in results:
            if job.retry:
                with self._lock:
                    self._pending -= 1
                if not ok:
                    log.error("an audit/session write failed and was dropped: %s", value)
            job.settle(ok, value)
        return []


def _try_open(opener: Callable[[], StateStore]) -> StateStore | None:
    """This thread's store, its connection made now (a store makes one per thread on
    first use): a pool holds the same descriptors from its start to its end."""
    try:
        store = opener()
        store.revision()
        return store
    except DTError:
        log.exception("cannot open the cluster database yet; will try again at each job")
        return None


def _take(lane: queue.SimpleQueue[Any], jobs: list[Any], *, block: bool) -> bool:
    """Add what is queued to ``jobs`` (waiting for one if ``block``); True if a stop came."""
    try:
        job = lane.get() if block else lane.get_nowait()
    except queue.Empty:
        return False
    while job is not _STOP:
        jobs.append(job)
        if len(jobs) >= MAX_BATCH:
            return False
        try:
            job = lane.get_nowait()
        except queue.Empty:
            return False
    return True


def _fail(jobs: list[_Job], exc: DTError) -> list[_Job]:
    """Nothing was committed: awaited jobs get the error, retried ones wait."""
    kept = []
    for job in jobs:
        if job.retry:
            job.again()
            kept.append(job)
        else:
            job.settle(False, type(exc)(f"{exc.message}; nothing was done: try again"))
    if kept:
        log.warning("cluster database refused %d write(s); retrying: %s", len(kept), exc.message)
    return kept


def _record(store: StateStore, event_type: str, fields: dict[str, Any]) -> None:
    audit.record(store, event_type, **fields)
