"""Authenticated SSH connections, decided again for as long as they live.

A connection authenticates once, with a certificate or a password, but what made that
true can stop being true: the certificate revoked, its CA rotated out, the user locked,
removed or given a new password. Each authenticated connection is registered here with
how it authenticated. Whenever the revision moves every one is decided again
(``decide.check_live_connection``, ``decide.check_password_connection``), and each
that fails is closed (the connection, not only its channels), audited as
``connection.terminated`` and told why in the disconnect message.

A certificate's expiry moves no revision, so certificate connections are also kept in
expiry order and looked at on every poll: one that just expired opens nothing new
(decided at each channel open), and ends where a role asks for it
(``disconnect_expired_cert``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bastion.accounts import recheck_bot_token
from bastion.authz.decide import CertClaims
from bastion.protocol.errors import AccessDenied, StorageUnavailable
from bastion.proxy import policy
from bastion.proxy.workers import Workers
from bastion.storage import StateStore

log = logging.getLogger("bastion.connections")
_ids = itertools.count(1)


class CredentialRevoked(AccessDenied):
    """The credential a connection authenticated with no longer stands: the request is
    refused and the connection closed."""


@dataclass(frozen=True, slots=True)
class Credential:
    """How one connection authenticated, kept to be decided again."""

    user: str
    auth: str  # "certificate" | "password" | "signup" | "bot-token"
    claims: CertClaims | None = None
    password_hash: str | None = None  # for "password": the hash it was checked against
    token_hash: str | None = None  # for "bot-token": the hash of the bot token presented


def recheck(store: StateStore, credential: Credential, now: float) -> None:
    """Raise CredentialRevoked if a connection with this credential may not go on.

    A signup connection has nothing to re-check: its token is single use, and all it
    may do is finish that signup.
    """
    try:
        if credential.claims is not None:
            policy.recheck_live_connection(store, credential.claims, now)
        elif credential.auth == "password":
            policy.recheck_password(store, credential.user, credential.password_hash, now)
        elif credential.auth == "bot-token":
            recheck_bot_token(store, credential.user, credential.token_hash or "", now)
    except CredentialRevoked:
        raise
    except AccessDenied as exc:
        raise CredentialRevoked(exc.message) from None


@dataclass(eq=False)
class Connection:
    credential: Credential
    # Ends it: its sessions cut, audited, then disconnected with the reason.
    terminate: Callable[[str], Awaitable[None]]
    id: int = field(default_factory=lambda: next(_ids))


class Connections:
    """Every authenticated connection of this bastion."""

    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self.live: dict[int, Connection] = {}
        self._expiry: list[tuple[int, int]] = []  # (valid_before, connection id)

    def add(
        self, credential: Credential, terminate: Callable[[str], Awaitable[None]]
    ) -> Connection:
        conn = Connection(credential, terminate)
        self.live[conn.id] = conn
        if credential.claims is not None:
            heapq.heappush(self._expiry, (credential.claims.valid_before, conn.id))
        return conn

    def discard(self, conn: Connection | None) -> None:
        if conn is not None:
            self.live.pop(conn.id, None)

    async def recheck(self, now: float | None = None) -> int:
        """The revision moved: end every connection whose credential no longer stands
        (before live sessions are decided: the client whose jump is cut hangs up at
        once, and its connection must already be on its way out, audited)."""
        now = time.time() if now is None else now
        return await self._end(list(self.live.values()), now)

    async def check_expired(self, now: float) -> int:
        """On every poll: connections whose certificate expired since the last look
        are decided again (their roles may end them at expiry)."""
        due = []
        while self._expiry and self._expiry[0][0] <= now:
            _, conn_id = heapq.heappop(self._expiry)
            conn = self.live.get(conn_id)
            if conn is not None:
                due.append(conn)
        try:
            return await self._end(due, now)
        except BaseException:  # not decided (the database did not answer): next turn
            for conn in due:
                claims = conn.credential.claims
                if claims is not None:  # always: add() queues only certificate connections
                    heapq.heappush(self._expiry, (claims.valid_before, conn.id))
            raise

    async def _end(self, conns: list[Connection], now: float) -> int:
        if not conns:
            return 0
        doomed = await self.workers.read(_doomed, conns, now)
        doomed = [(c, why) for c, why in doomed if self.live.pop(c.id, None) is not None]
        if doomed:
            await asyncio.gather(*(c.terminate(why) for c, why in doomed))
        return len(doomed)


def _doomed(store: StateStore, conns: list[Connection], now: float) -> list[tuple[Connection, str]]:
    """The connections that must end, and why: one read per distinct credential. A
    database that does not answer raises (tried again at the next turn); one that
    answers garbage ends them (fail closed)."""
    verdicts: dict[Credential, str | None] = {}
    doomed = []
    for conn in conns:
        if conn.credential not in verdicts:
            try:
                recheck(store, conn.credential, now)
                verdicts[conn.credential] = None
            except CredentialRevoked as exc:
                verdicts[conn.credential] = exc.message
            except StorageUnavailable:
                raise
            except Exception:  # a corrupt row decodes as garbage: end it (fail closed)
                log.exception("re-checking a connection of %s failed", conn.credential.user)
                verdicts[conn.credential] = "the cluster state is unreadable"
        reason = verdicts[conn.credential]
        if reason is not None:
            doomed.append((conn, reason))
    return doomed
