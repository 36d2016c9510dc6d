"""Failed logins and reserved login attempts: rate limits and lockout.

A password login reserves its attempt before argon2 runs (a pending row), in the
same write transaction that counts the failures, so concurrent guesses are bounded
by the limit rather than each read a count before any of them wrote one.
"""

from __future__ import annotations

from bastion.storage.base import StoreBase


class LoginStore(StoreBase):
    """The login_failures table."""

    def record_login_failure(self, user: str, now: float, remote_addr: str | None) -> int:
        """Record one failure; returns failures for ``user`` in the last hour."""
        with self.transaction(bump=False):
            self._execute(
                'INSERT INTO login_failures ("user", time, remote_addr) VALUES (?,?,?)',
                (user, now, remote_addr),
            )
            self._execute("DELETE FROM login_failures WHERE time < ?", (now - 86400,))
        return self.count_login_failures(user, since=now - 3600)

    def count_login_failures(self, user: str, *, since: float, pending: bool = True) -> int:
        """Failures since ``since``; with ``pending=False`` only those already checked,
        not the attempts still reserved (what a lockout is decided on)."""
        sql = 'SELECT count(*) AS n FROM login_failures WHERE "user" = ? AND time >= ?'
        row = self._one(sql if pending else sql + " AND pending = 0", (user, since))
        return int(row["n"]) if row else 0

    def clear_login_failures(self, user: str) -> None:
        self._exec('DELETE FROM login_failures WHERE "user" = ?', (user,))

    def begin_login_attempt(
        self, user: str, *, now: float, since: float, limit: int, remote_addr: str | None
    ) -> int | None:
        """Reserve one login attempt before it is checked; None when ``limit`` failed or
        pending attempts since ``since`` already exist (then do not check it at all).

        The count and the reservation are one write transaction, so of N concurrent
        guesses at most ``limit`` are ever checked. The reservation counts as a failure
        until :meth:`settle_login_attempt` makes it one or :meth:`login_succeeded`
        removes it; a process that dies in between leaves it counted (fail closed).
        """
        with self.transaction(bump=False):
            row = self._one(
                'SELECT count(*) AS n FROM login_failures WHERE "user" = ? AND time >= ?',
                (user, since),
            )
            if row and int(row["n"]) >= limit:
                return None
            attempt = self._insert_returning_id(
                'INSERT INTO login_failures ("user", time, remote_addr, pending) VALUES (?,?,?,1)',
                (user, now, remote_addr),
            )
            self._execute("DELETE FROM login_failures WHERE time < ?", (now - 86400,))
            return attempt

    def settle_login_attempt(self, attempt: int) -> None:
        """A reserved attempt failed: it is an ordinary failure from now on."""
        self._exec("UPDATE login_failures SET pending = 0 WHERE id = ?", (attempt,), bump=False)

    def login_succeeded(self, user: str, attempt: int) -> None:
        """Forget ``user``'s failures and this attempt's reservation. Attempts still
        being checked keep theirs: a success does not wave concurrent guesses through."""
        self._exec(
            'DELETE FROM login_failures WHERE "user" = ? AND (pending = 0 OR id = ?)',
            (user, attempt),
            bump=False,
        )
