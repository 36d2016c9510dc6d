"""A bastion restart loses nothing that either side wrote, and shows nothing new.

dtadmin writes while the bastion runs (a user, a node, a device, a lock); the bastion
writes (signup, certificate serials, session.start and session.end), before and after
dtadmin's runs. Once the bastion is stopped the database must pass SQLite's integrity
check; once it is started again `dtadmin` must list exactly what it listed while the
bastion ran, plus the end of the session that was live at the stop, and the
certificate issued before must still be honoured. Both for SIGTERM (systemctl
stop/restart) and for SIGKILL (a crash, or systemd's stop timeout): a certificate is
handed out only once its serial is committed, so not even a crash may lose it.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import pytest

from tests.deployed.deployment import Deployment, integrity_check
from tests.deployed.people import Person
from tests.deployed.processes import free_port, wait_for

pytestmark = pytest.mark.integration


def snapshot(d: Deployment) -> dict[str, dict[Any, Any]]:
    """Everything an admin can list, keyed so that rows can be compared one by one."""
    return {
        "users": {u["name"]: u for u in d.admin_json("users", "ls")},
        "nodes": {n["name"]: n for n in d.admin_json("nodes", "ls")},
        "devices": {x["spec"]["asset_tag"]: x for x in d.admin_json("device", "ls")},
        "locks": {lk["id"]: lk for lk in d.admin_json("lock", "ls")},
        "certs": {str(c["serial"]): c for c in d.admin_json("cert", "ls")},
        "audit": {row["id"]: row for row in d.audit()},
    }


def differences(before: dict[str, dict], after: dict[str, dict], ignore: set[Any]) -> list[str]:
    """Rows lost or changed from ``before`` to ``after``, and rows that appeared (but
    for the keys in ``ignore``), as readable lines."""
    found = []
    for table, rows in before.items():
        for key, row in rows.items():
            if key not in after[table]:
                found.append(f"{table}: lost {row}")
            elif after[table][key] != row:
                found.append(f"{table}: changed {row} -> {after[table][key]}")
        for key in after[table].keys() - rows.keys() - ignore:
            found.append(f"{table}: appeared only now {after[table][key]}")
    return found


def serial_of(person: Person) -> str:
    return json.loads(person.dtclient("status", "--format", "json").stdout)["serial"]


Expectations = Callable[[dict[str, dict]], dict[str, bool]]


def writes_on_both_sides(d: Deployment, tag: str) -> tuple[Person, Expectations]:
    """The bastion and dtadmin each write, interleaved; what an admin must then see."""
    user, other = f"frank-{tag}", f"gina-{tag}"
    frank = d.sign_up(user)  # the bastion: signup, login, a certificate
    first = serial_of(frank)
    assert frank.can_reach(), f"{user}'s first ssh -J failed"  # the bastion: a whole session
    d.add_user(other)  # dtadmin, beside the running bastion
    spare = f"127.0.0.1:{free_port()}"  # an inventory entry only; nothing listens there
    d.admin("nodes", "add", f"node-{tag}", "--addr", spare, "--labels", "env=spare")
    d.add_device(f"LAPTOP-{tag}", other)
    lock_id = d.lock_user(other)
    frank.login()  # the bastion again, after dtadmin: a renewed certificate...
    renewed = serial_of(frank)
    assert frank.can_reach(), f"{user}'s second ssh -J failed"  # ...and a second session

    def there(snap: dict[str, dict]) -> dict[str, bool]:
        audit = list(snap["audit"].values())

        def count(event: str) -> int:
            return sum(1 for r in audit if r["event"] == event and r["user"] == user)

        issued = {str(r.get("serial")) for r in audit if r["event"] == "cert.create"}
        return {
            f"certificate serial {first}": first in snap["certs"],
            f"renewed certificate serial {renewed}": renewed in snap["certs"],
            "their cert.create rows": {first, renewed} <= issued,
            "2 session.start": count("session.start") >= 2,
            "2 session.end": count("session.end") >= 2,
            f"user {other}": other in snap["users"],
            f"node-{tag}": f"node-{tag}" in snap["nodes"],
            f"device LAPTOP-{tag}": f"LAPTOP-{tag}" in snap["devices"],
            f"lock {lock_id}": lock_id in snap["locks"],
            "its lock.create": any(
                r["event"] == "lock.create" and r.get("lock") == lock_id for r in audit
            ),
        }

    return frank, there


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_restart_loses_nothing_either_side_wrote(deployment: Deployment, sig: signal.Signals):
    d = deployment
    frank, there = writes_on_both_sides(d, sig.name.lower())
    held = frank.hold()  # a third session, live when the bastion stops
    running = snapshot(d)

    bastion = d.bastion
    assert bastion is not None
    rc = d.stop_bastion(sig)
    if sig == signal.SIGTERM:
        assert rc == 0, f"SIGTERM did not stop dt-bastion cleanly (exit {rc}):\n{bastion.log()}"
    assert held.wait_cut(10) is not None, "an ssh -J session outlived the bastion"
    verdict = integrity_check(d.state)  # nothing of the product runs now
    assert verdict == "ok", f"PRAGMA integrity_check of the stopped database: {verdict}"

    restarted_bastion = d.start_bastion()
    # The live session's end: written at shutdown (SIGTERM), or by the next bastion's
    # sweep of sessions a dead one left open (SIGKILL).
    wait_for(
        "dtadmin sessions ls to show no live session after the restart",
        lambda: not d.admin_json("sessions", "ls"),
        timeout=15,
    )
    restarted = snapshot(d)
    missing = [what for what, ok in there(restarted).items() if not ok]
    assert not missing, f"written while the bastion ran, missing after the restart: {missing}"
    ends = {
        key
        for key, row in restarted["audit"].items()
        if key not in running["audit"]
        and row["event"] == "session.end"
        and row["user"] == frank.name
    }
    # What a drain writes at SIGTERM: its start, and the cut of what outlived it.
    drained = {
        key
        for key, row in restarted["audit"].items()
        if key not in running["audit"]
        and row["event"] in ("bastion.drain", "connection.terminated", "session.terminated")
    }
    # Beyond those nothing may be new: a row that shows only now was written by the
    # running bastion where dtadmin could not see it.
    changed = differences(running, restarted, ignore=ends | drained)
    assert not changed, "dtadmin's view changed across the restart:\n" + "\n".join(changed)
    assert len(ends) == 1, f"the live session's end is not in the audit log once: {ends}"

    # The restarted bastion honours the certificate it issued before the restart.
    assert frank.can_reach(), (
        f"{frank.name}'s certificate was refused after the restart:\n"
        f"{restarted_bastion.log()[-2000:]}"
    )
    wait_for(
        "the new session's start in dtadmin audit ls",
        lambda: len(d.audit(type="session.start", user=frank.name)) == 4,
        timeout=5,
    )
