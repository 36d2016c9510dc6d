"""Group commit for the bastion: many concurrent certificate requests, one fsync.

A certificate is handed out only after the transaction recording it has committed,
and with ``synchronous=FULL`` every commit waits for the disk. One request at a time
that caps issuance at the disk's fsync rate, and it made the bastion's event loop
wait on the disk. Here the database work runs on one thread: each turn it takes every
request waiting, signs and records them all in one transaction
(``CertificateAuthority.sign_users``), and answers each caller once that transaction
is on disk. A lone request costs what it did; fifty at once share one commit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any

from bastion.ca.authority import CertificateAuthority, Issued, UserCertRequest
from bastion.protocol.errors import DTError, StateError

log = logging.getLogger("bastion.issuer")
MAX_BATCH = 256

_Item = tuple[UserCertRequest, asyncio.AbstractEventLoop, "asyncio.Future[Issued]"]


class GroupCommitIssuer:
    def __init__(self, ca: CertificateAuthority, max_batch: int = MAX_BATCH) -> None:
        self.ca = ca
        self.max_batch = max_batch
        self.batches = 0  # transactions committed, for tests and the benchmark
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._own: CertificateAuthority | None = None  # see _authority

    async def sign(self, request: UserCertRequest) -> Issued:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Issued] = loop.create_future()
        self._ensure_thread()
        self._queue.put((request, loop, future))
        return await future

    def close(self) -> None:
        """Answer what is queued, then stop the thread and close its connection."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()
        if self._own is not None:
            self._own.store.close()
            self._own = None

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dt-issuer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            self._serve(batch)

    def _authority(self) -> CertificateAuthority:
        """The CA on this thread's own database connection.

        The store serialises its one connection with a lock; a batch holds it from BEGIN
        to the fsync at COMMIT, and the event loop would wait on every read meanwhile
        (the revision poll, auth checks). With a connection of its own, the loop's reads
        go on: in WAL mode readers do not wait for a writer. A rotated user CA that the
        bastion has loaded is picked up before each batch.
        """
        if self._own is None:
            # SQLite: the file opened again, unchecked (the bastion checked it at start);
            # PostgreSQL: the same pool. None: an in-memory store's one connection.
            store = self.ca.store.sibling()
            if store is None:
                return self.ca
            self._own = CertificateAuthority(store, self.ca.user_ca, self.ca.host_ca)
        if self._own.user_ca is not self.ca.user_ca:
            self._own.set_user_ca(self.ca.user_ca)
        return self._own

    def _serve(self, batch: list[_Item]) -> None:
        # A caller that gave up (its connection closed) gets nothing signed for it.
        batch = [item for item in batch if not item[2].cancelled()]
        if not batch:
            return
        results: list[Issued | DTError]
        try:
            results = self._authority().sign_users([request for request, _, _ in batch])
            self.batches += 1
        except DTError as exc:  # the whole batch failed closed; each caller its own copy
            results = [type(exc)(exc.message) for _ in batch]
        except Exception as exc:  # a bug: fail every caller closed, keep serving
            log.exception("certificate batch failed")
            results = [StateError(f"certificate issuance failed: {exc}") for _ in batch]
        for (_, loop, future), result in zip(batch, results, strict=True):
            try:
                loop.call_soon_threadsafe(_settle, future, result)
            except RuntimeError:
                pass  # the caller's loop is closed; nobody is waiting


def _settle(future: asyncio.Future[Any], result: Issued | DTError) -> None:
    if future.done():  # the caller gave up (its connection closed)
        return
    if isinstance(result, DTError):
        future.set_exception(result)
    else:
        future.set_result(result)
