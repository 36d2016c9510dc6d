"""`make soak`: the deployed shape under steady use, and whether locks hold the whole time.

Only the product's own processes run, as an admin deploys them (tests/deployed): one
`dt-bastion serve` holding the database, a stock sshd node, short `dtadmin` runs, and
K users who each, over and over, renew their certificate with `dtclient login` and go
through with stock `ssh -J`. Every LOCK_EVERY seconds the admin locks one of them
(`dtadmin lock --user`) while they hold a live session, keeps the lock LOCKED_FOR
seconds, and lifts it (`dtadmin lock rm`).

It reports, for each lock: how long until the live session was cut (after dtadmin
returned), whether any connect or renewal of the locked user started after the lock
and was accepted before the unlock, and how long until the unlock was honoured; then
the audit rows (lock.create/lock.delete against the locks made, session.start and
cert.create against what was accepted) and `PRAGMA integrity_check` of the stopped
database. Exit 1 if a lock was late (> --late s) or missed, an unlock was never
honoured, an audit row is missing, or the database is not intact. Not part of CI.

    python -m bench.soak [--minutes 3] [--clients 4] [--lock-every 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.deployed.deployment import Deployment, integrity_check  # noqa: E402
from tests.deployed.people import Person  # noqa: E402
from tests.deployed.processes import DeployedError  # noqa: E402

GIVE_UP = 10.0  # a cut or an unlock not seen by then counts as missed


@dataclass
class Attempt:
    user: str
    kind: str  # "connect" or "renew"
    start: float
    end: float
    ok: bool


@dataclass
class LockCycle:
    n: int
    lock_id: str = ""
    lock_start: float = 0.0  # dtadmin lock launched
    lock_done: float = 0.0  # dtadmin lock returned: the lock is committed
    cut_at: float | None = None  # the live session ended
    refused_right_after: bool = False  # the locker's own connect right after the lock
    unlock_start: float = 0.0
    unlock_done: float = 0.0
    # Filled in from all the attempts by report():
    cut_after: float | None = None  # seconds after dtadmin lock returned (< 0: before)
    accepted_while_locked: list[str] = field(default_factory=list)
    refused_after_unlock: int = 0  # connects started after the unlock, before one got in
    unlock_honoured_after: float | None = None  # 0: the first connect after it got in


class Soak:
    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.dir = workdir
        self.args = args
        self.attempts: list[Attempt] = []
        self.cycles: list[LockCycle] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self._record = threading.Lock()
        self.busy: dict[str, threading.Lock] = {}  # one user's dtclient and ssh take turns

    # -- what a user does ----------------------------------------------------------------

    def attempt(self, person: Person, kind: str) -> bool:
        with self.busy[person.name]:
            start = time.monotonic()
            if kind == "renew":
                ok, _ = person.try_login()
            else:
                ok = person.can_reach()
            end = time.monotonic()
        with self._record:
            self.attempts.append(Attempt(person.name, kind, start, end, ok))
        return ok

    def client_loop(self, person: Person) -> None:
        while not self.stop.is_set():
            try:
                self.attempt(person, "renew")
                self.attempt(person, "connect")
            except Exception as exc:  # a soak goes on; the report says what broke
                self.errors.append(f"{person.name}: {exc}")
                self.stop.wait(1)

    # -- what the admin does ----------------------------------------------------------------

    def lock_cycle(self, d: Deployment, victim: Person, n: int) -> LockCycle:
        cycle = LockCycle(n)
        with self.busy[victim.name]:
            held = victim.hold(seconds=int(self.args.lock_every * 3))

        def watch() -> None:  # the cut may come before dtadmin has even exited
            if held.wait_cut(self.args.lock_every * 3) is not None:
                cycle.cut_at = time.monotonic()

        watcher = threading.Thread(target=watch)
        watcher.start()
        cycle.lock_start = time.monotonic()
        cycle.lock_id = d.lock_user(victim.name)
        cycle.lock_done = time.monotonic()
        watcher.join(GIVE_UP)
        held.close()
        watcher.join()
        cycle.refused_right_after = not self.attempt(victim, "connect")
        self.stop.wait(max(0.0, cycle.lock_done + self.args.locked_for - time.monotonic()))
        cycle.unlock_start = time.monotonic()
        d.admin("lock", "rm", cycle.lock_id)
        cycle.unlock_done = time.monotonic()
        deadline = cycle.unlock_done + GIVE_UP
        while time.monotonic() < deadline and not self.attempt(victim, "connect"):
            pass
        return cycle

    def admin_loop(self, d: Deployment, victim: Person) -> None:
        n = 0
        next_lock = time.monotonic() + min(5.0, self.args.lock_every)
        while not self.stop.wait(max(0.0, next_lock - time.monotonic())):
            n += 1
            next_lock += self.args.lock_every
            try:
                self.cycles.append(self.lock_cycle(d, victim, n))
            except Exception as exc:
                self.errors.append(f"lock cycle {n}: {exc}")

    # -- the run ------------------------------------------------------------------------

    def run(self) -> dict:
        a = self.args
        with Deployment(self.dir, cluster="soak.test") as d:
            d.add_node("node-1")
            d.start_bastion(
                "--set", "max_connections_per_source=100000",
                "--set", "max_auth_failures_per_source=100000",
                # users renew over and over, on purpose: not the flood these bound
                "--set", "max_certs_per_user_per_minute=0",
            )  # fmt: skip
            # All the admin's work first, then the users': a build whose bastion cannot see
            # dtadmin's later writes still gets as far as the locks, which are the point.
            tokens = [d.add_user(f"user-{i}") for i in range(a.clients)]
            people = [Person(d, f"user-{i}") for i in range(a.clients)]
            for person, token in zip(people, tokens, strict=True):
                person.signup(token)
            for person in people:
                person.login()
            for person in people:
                self.busy[person.name] = threading.Lock()
            victim = people[0]
            print(f"soak: {a.clients} users, {a.minutes:g} min, lock every {a.lock_every:g} s "
                  f"for {a.locked_for:g} s; bastion on {d.proxy}; state in {d.state}", flush=True)  # fmt: skip
            threads = [threading.Thread(target=self.client_loop, args=(p,)) for p in people]
            threads.append(threading.Thread(target=self.admin_loop, args=(d, victim)))
            for t in threads:
                t.start()
            self.stop.wait(a.minutes * 60)
            self.stop.set()
            for t in threads:
                t.join()
            rc = d.stop_bastion()
            audit = {
                event: d.audit(type=event, user=None)
                for event in ("lock.create", "lock.delete", "session.start", "cert.create")
            }
            intact = integrity_check(d.state)
        return self.report(people, victim, audit, intact, rc)

    def report(
        self, people: list[Person], victim: Person, audit: dict, intact: str, rc: int | None
    ) -> dict:
        for cycle in self.cycles:
            settle(cycle, [x for x in self.attempts if x.user == victim.name])

        def rows(event: str, user: str) -> int:
            return sum(1 for r in audit[event] if r.get("user") == user)

        def accepted(user: str, kind: str) -> int:
            return sum(1 for x in self.attempts if x.user == user and x.kind == kind and x.ok)

        lost = {}
        ids = [c.lock_id for c in self.cycles]
        created = {r.get("lock") for r in audit["lock.create"]}
        # lock.delete rows name neither the user nor the lock but in their message.
        deleted = " ".join(str(r.get("message")) for r in audit["lock.delete"])
        if missing := [i for i in ids if i not in created]:
            lost["lock.create"] = f"{len(ids) - len(missing)} rows for {len(ids)} locks"
        if missing := [i for i in ids if f"lock {i} removed" not in deleted]:
            lost["lock.delete"] = f"{len(ids) - len(missing)} rows for {len(ids)} unlocks"
        for p in people:
            if rows("session.start", p.name) < accepted(p.name, "connect"):
                lost[f"session.start {p.name}"] = (
                    f"{rows('session.start', p.name)} rows for "
                    f"{accepted(p.name, 'connect')} accepted connects"
                )
            if rows("cert.create", p.name) < accepted(p.name, "renew") + 1:
                lost[f"cert.create {p.name}"] = (
                    f"{rows('cert.create', p.name)} rows for "
                    f"{accepted(p.name, 'renew') + 1} certificates issued"
                )
        late = [c.n for c in self.cycles if c.cut_after is None or c.cut_after > self.args.late]
        missed = [c.n for c in self.cycles if c.accepted_while_locked or not c.refused_right_after]
        slow_unlock = [
            c.n
            for c in self.cycles
            if c.unlock_honoured_after is None or c.unlock_honoured_after > self.args.late
        ]
        cuts = [c.cut_after for c in self.cycles if c.cut_after is not None]
        unlocks = [c.unlock_honoured_after for c in self.cycles]
        unlocks = [u for u in unlocks if u is not None]
        result = {
            "locks": [asdict(c) for c in self.cycles],
            "attempts": {
                p.name: {k: accepted(p.name, k) for k in ("renew", "connect")}
                | {"refused": sum(1 for x in self.attempts if x.user == p.name and not x.ok)}
                for p in people
            },
            "cut_seconds": summary(cuts),
            "unlock_seconds": summary(unlocks),
            "late": late,
            "missed": missed,
            "unlock_late": slow_unlock,
            "lost_audit_rows": lost,
            "integrity_check": intact,
            "bastion_exit": rc,
            "errors": self.errors,
        }
        result["ok"] = bool(
            self.cycles
            and not (late or missed or slow_unlock or lost or self.errors)
            and intact == "ok"
        )
        return result


def settle(cycle: LockCycle, attempts: list[Attempt]) -> None:
    """What the locked user's own attempts say about one lock and its unlock."""
    if cycle.cut_at is not None:
        cycle.cut_after = cycle.cut_at - cycle.lock_done
    cycle.accepted_while_locked = [
        f"{x.kind} at +{x.start - cycle.lock_done:.2f} s"
        for x in attempts
        if x.ok and x.start >= cycle.lock_done and x.end <= cycle.unlock_start
    ]
    after = sorted(
        (x for x in attempts if x.kind == "connect" and x.start >= cycle.unlock_done),
        key=lambda x: x.start,
    )
    for x in after:
        if x.ok:
            # At once if the first connect got in; else when the one that did began.
            refused = cycle.refused_after_unlock
            cycle.unlock_honoured_after = x.start - cycle.unlock_done if refused else 0.0
            return
        cycle.refused_after_unlock += 1


def summary(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    return {
        "n": len(samples),
        "median": round(statistics.median(samples), 3),
        "max": round(max(samples), 3),
    }


def print_report(r: dict, late: float) -> None:
    print("\nlock  cut after dtadmin returned  next connect  accepted while locked  unlock")
    for c in r["locks"]:
        cut = "NEVER" if c["cut_after"] is None else f"{c['cut_after']:+.3f} s"
        unlock = c["unlock_honoured_after"]
        unlock = (
            "NEVER" if unlock is None else "at once" if unlock == 0 else f"after {unlock:.3f} s"
        )
        if c["refused_after_unlock"]:
            unlock += f" ({c['refused_after_unlock']} connects refused first)"
        accepted = ", ".join(c["accepted_while_locked"]) or "none"
        refused = "refused" if c["refused_right_after"] else "ACCEPTED"
        print(f"{c['n']:>4}  {cut:>26}  {refused:>12}  {accepted:>21}  {unlock}")
    print("(a negative cut time: the session was cut before dtadmin had exited)")
    print(f"\ncut:    {r['cut_seconds']}\nunlock: {r['unlock_seconds']}")
    for user, counts in r["attempts"].items():
        print(f"{user}: {counts}")
    print(f"lost audit rows: {r['lost_audit_rows'] or 'none'}")
    print(f"integrity_check of the stopped database: {r['integrity_check']}")
    print(f"dt-bastion exit code on SIGTERM: {r['bastion_exit']}")
    for error in r["errors"]:
        print(f"error: {error}")
    if r["late"]:
        print(f"cut late (> {late:g} s) or never: locks {r['late']}")
    if r["missed"]:
        print(f"not enforced (a connect or renewal accepted while locked): locks {r['missed']}")
    if r["unlock_late"]:
        print(f"unlock honoured late (> {late:g} s) or never: locks {r['unlock_late']}")
    print("\nsoak " + ("passed" if r["ok"] else "FAILED"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long (default 3)")
    parser.add_argument("--clients", type=int, default=4, help="users at work (default 4)")
    parser.add_argument("--lock-every", type=float, default=20.0, help="seconds between locks")
    parser.add_argument("--locked-for", type=float, default=5.0, help="seconds a lock stays")
    parser.add_argument("--late", type=float, default=1.0, help="a cut slower than this fails")
    parser.add_argument("--json", type=Path, help="also write the whole result here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, state)")
    args = parser.parse_args()
    if args.clients < 1 or args.locked_for >= args.lock_every:
        parser.error("need at least one client, and --locked-for below --lock-every")
    workdir = Path(tempfile.mkdtemp(prefix="dt-soak-"))
    try:
        result = Soak(workdir, args).run()
    except DeployedError as exc:
        print(f"soak could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(result, args.late)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.keep:
        print(f"work dir kept: {workdir}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
