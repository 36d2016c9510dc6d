"""Two `dt-bastion serve` behind a real HAProxy (TCP mode, send-proxy-v2), one state dir.

Stock `ssh -J` goes through the balancer to a stock sshd node; the audit names the
client's own address (127.0.0.2, from the PROXY header), never the balancer's
(127.0.0.3, its ``source``). A bastion killed with SIGKILL: new connections keep
working through the other at once, and the sibling ends the dead one's sessions on
record. A rolling restart (SIGTERM one, it drains, start it again, then the other)
drops no session that could have been drained; here that means: a session that ends
on its own within ``drain_timeout`` of the SIGTERM ends as it would have anyway (its
whole output, exit 0, ``session.end`` with no ``session.terminated``), and every
connection made during the restart gets through (to the bastion still up).

The bastions trust PROXY headers only from 127.0.0.3/32: a header sent straight to a
bastion by anyone else, or sent *through* the balancer (where it arrives after
HAProxy's own), is refused and the attempt audited under the real address. (Parsing
and the plain refusal of an untrusted sender are tested in test_proxyproto.py and
test_node_side.py.)
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from bastion.authz.records import Node, User
from bastion.cluster import Cluster, init_cluster
from bastion.proxy import proxyproto
from tests.haproxy import HAProxy, Serve, haproxy
from tests.sshd import LOGIN, SSHD, sshd_node, user_client

pytestmark = pytest.mark.integration

CLIENT = "127.0.0.2"  # where the users' ssh connects from
BALANCER = "127.0.0.3"  # where HAProxy connects to the bastions from
ARGS = (
    "--set", f'proxy_protocol_from=["{BALANCER}/32"]',
    "--set", "session_sweep_interval=0.5",
    # Long enough on a loaded 2-core CI host for the checks made during a drain; a
    # drain ends as soon as its last session does, so this costs no time.
    "--set", "drain_timeout=20",
)  # fmt: skip


@dataclass
class HA:
    cluster: Cluster
    bastions: dict[str, Serve]
    lb: HAProxy
    dir: Path

    def config_for(self, user: str) -> Path:
        """A user's key, certificate and ssh_config with ProxyJump through HAProxy,
        from 127.0.0.2 (BindAddress applies to the jump's own `ssh -W`, too)."""
        if self.cluster.store.find_user(user) is None:
            self.cluster.store.add_user(User(user, ("access",), (LOGIN,)))
        config = user_client(self.cluster, self.dir / user, user, bastion_port=self.lb.port)
        text = config.read_text().replace(
            "Host bastion\n", f"Host bastion\n    BindAddress {CLIENT}\n", 1
        )
        config.write_text(text)
        return config

    def on(self, instance: str) -> Serve:
        return next(b for b in self.bastions.values() if b.alive() and b.instance() == instance)

    def audit(self, type: str, user: str | None = None) -> list:
        rows = self.cluster.store.list_audit(type=type)
        return [r for r in rows if user is None or r.user == user]


@pytest.fixture(scope="module")
def ha(tmp_path_factory) -> Iterator[HA]:
    if not Path(SSHD).exists():
        pytest.skip("sshd is not installed (run scripts/setup.sh)")
    base = tmp_path_factory.mktemp("ha")
    cluster = init_cluster(base / "state", "ha")
    with ExitStack() as stack:
        stack.callback(cluster.close)
        node = stack.enter_context(sshd_node(base / "node", cluster))
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port, {"env": "test"}))
        bastions = {n: Serve(cluster.state_dir, n, ARGS) for n in ("b1", "b2")}
        for b in bastions.values():
            stack.callback(b.stop)
            b.start()
        lb = stack.enter_context(haproxy(base / "haproxy", [b.backend for b in bastions.values()]))
        for name in bastions:
            lb.wait_status(name, "UP")
        yield HA(cluster, bastions, lb, base)


def ssh(config: Path, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-F", str(config), f"{LOGIN}@node-1", *(cmd or ("echo", "reached"))],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def hold_until(config: Path, path: Path) -> subprocess.Popen:
    """A live session that prints ``finished`` and ends once ``path`` exists."""
    proc = subprocess.Popen(
        ["ssh", "-F", str(config), f"{LOGIN}@node-1",
         f"echo held; while [ ! -e {path} ]; do sleep 0.1; done; echo finished"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "held":
        proc.kill()
        raise AssertionError(f"ssh -J did not get through: {proc.communicate()[1]}")
    return proc


def wait(predicate, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_ssh_j_through_haproxy_audits_the_clients_own_address(ha):
    config = ha.config_for("alice")
    for _ in range(4):  # round robin: both bastions serve some
        proc = ssh(config)
        assert proc.returncode == 0 and "reached" in proc.stdout, proc.stderr
    starts = wait(lambda: len(ha.audit("session.start", "alice")) >= 4 and ha.audit(
        "session.start", "alice"), "four session.start rows")  # fmt: skip
    assert {r.remote_addr for r in starts} == {CLIENT}
    assert len({r.fields["bastion"] for r in starts}) == 2, "one bastion served everything"
    assert not [r for r in ha.cluster.store.list_audit() if r.remote_addr == BALANCER]


def test_a_proxy_header_from_anyone_but_the_balancer_is_refused_and_audited(ha):
    forged = proxyproto.build_v2(("203.0.113.9", 4242), ("127.0.0.1", 22))
    b1 = ha.bastions["b1"]
    before = len(ha.audit("auth.failed"))
    for port in (b1.port, ha.lb.port):  # straight to a bastion, and through the balancer
        with socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=(CLIENT, 0)
        ) as s:
            s.sendall(forged + b"SSH-2.0-forger\r\n")
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
    refused = wait(lambda: ha.audit("auth.failed")[before:] if len(
        ha.audit("auth.failed")) >= before + 2 else None, "both refusals audited")  # fmt: skip
    assert {r.remote_addr for r in refused} == {CLIENT}, [
        (r.remote_addr, r.message) for r in refused
    ]
    assert any("not a trusted load balancer" in r.message for r in refused)
    assert not [r for r in ha.cluster.store.list_audit() if r.remote_addr == "203.0.113.9"]


def test_a_killed_bastion_new_connections_go_on_and_its_sessions_end_via_the_sibling(ha):
    config = ha.config_for("kim")
    done = ha.dir / "kim-done"
    held = [hold_until(config, done), hold_until(config, done)]
    try:
        [start_a, start_b] = wait(lambda: ha.audit("session.start", "kim")[:2] if len(
            ha.audit("session.start", "kim")) >= 2 else None, "both session.start")  # fmt: skip
        assert start_a.fields["bastion"] != start_b.fields["bastion"]
        victim = ha.on(start_a.fields["bastion"])
        victim.stop(signal.SIGKILL)
        # At once, before any health check noticed: HAProxy redispatches the refused connect.
        for _ in range(4):
            proc = ssh(config)
            assert proc.returncode == 0 and "reached" in proc.stdout, proc.stderr
        ends = wait(lambda: [r for r in ha.audit("session.end", "kim") if r.fields.get(
            "session_id") == start_a.fields["session_id"] and r.fields.get("bastion") ==
            start_a.fields["bastion"]], "the dead bastion's session.end")  # fmt: skip
        [end] = ends
        assert end.fields["recovered"] is True and "killed or crashed" in end.message
        assert start_b.fields["bastion"] in end.message  # ended by the sibling
        assert end.remote_addr == CLIENT
        ha.lb.wait_status(victim.name, "DOWN")
        assert held[1].poll() is None, "the sibling's own session was cut"
    finally:
        done.touch()
        for proc in held:
            proc.wait(15)
    victim.start()
    ha.lb.wait_status(victim.name, "UP")


def test_a_rolling_restart_drops_no_session_that_could_be_drained(ha):
    config = ha.config_for("rita")
    held: dict[str, tuple[subprocess.Popen, Path]] = {}
    for i in range(6):  # round robin: one session on each bastion (a spare one ends)
        flag = ha.dir / f"rita-{i}"
        proc = hold_until(config, flag)
        starts = wait(lambda n=i: ha.audit("session.start", "rita")[n : n + 1], "its start")
        name = ha.on(starts[0].fields["bastion"]).name
        if name in held:
            flag.touch()
            proc.communicate(timeout=15)
            continue
        held[name] = (proc, flag)
        if len(held) == len(ha.bastions):
            break
    assert set(held) == set(ha.bastions), "every session went to one bastion"
    for name, bastion in ha.bastions.items():
        proc, flag = held[name]
        bastion.proc.send_signal(signal.SIGTERM)
        wait(lambda b=bastion: "draining" in b.log(), f"{name} to drain")
        # During the drain: new connections get through, to the other bastion.
        for _ in range(2):
            new = ssh(config)
            assert new.returncode == 0 and "reached" in new.stdout, new.stderr
        flag.touch()  # the held session ends on its own, within drain_timeout
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0 and out.strip() == "finished", (out, err)
        # The drain ends on its own once the jump connection closes, a moment after the
        # client exits; a second SIGTERM (stop()) now would mean "cut what is left".
        assert bastion.proc.wait(25) == 0, bastion.log()
        bastion.start()
        ha.lb.wait_status(name, "UP")
        after = ssh(config)  # a session opened after the restart began works
        assert after.returncode == 0 and "reached" in after.stdout, after.stderr
    assert not ha.audit("session.terminated", "rita")
    ends = ha.audit("session.end", "rita")
    assert all(r.message == "session closed" for r in ends), [r.message for r in ends]
