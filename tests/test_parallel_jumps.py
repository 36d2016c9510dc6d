"""Checklist #28: 100 and 1,000 parallel jump handshakes; the node's own MaxStartups respected.

One asyncssh client process plays N users typing `ssh -J bastion LOGIN@node-1 true` at the
same moment: N separate SSH connections to the real `dt-bastion serve`, each with a
certificate from the cluster's CA, each opening a direct-tcpip channel to node-1 (a stock
sshd) and handshaking, authenticating and running `true` there with the same certificate.

The bastion does not queue or pace forwards: it hands every channel straight to the
node. So under a burst the node's own `MaxStartups` is what protects the node, and the
bastion must pass each refusal back to its client as a clean error, never a hang, leak
no sockets or sessions, and keep serving afterwards.

What the node sends before the bastion has paired the node's socket with the client's
channel (its banner, or a MaxStartups drop and close) must reach the client: losing it
left every parallel jump hanging until this suite found it (CountingForwarder now
delivers it).
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import time
from collections import Counter
from pathlib import Path

import asyncssh
import pytest

from bastion.authz.records import Node, User
from bastion.ca.certs import load_public_key
from tests.sshd import LOGIN, SSHD, bastion_server, keygen, ssh, sshd_node, write_ssh_config

pytestmark = pytest.mark.integration

# A bound on each attempt, not an expectation of speed: an attempt still running after
# it counts as hung. 1,000 parallel jumps take ~15 s on 2 cores.
ATTEMPT_BOUND = 45.0


class JumpHung(AssertionError):
    """An attempt neither succeeded nor failed within ATTEMPT_BOUND."""


def _user_with_cert(cluster, directory: Path, name: str) -> tuple[Path, Path]:
    """A user with the `access` role and LOGIN as login, and a certificate for them."""
    cluster.store.add_user(User(name, ("access",), (LOGIN,)))
    directory.mkdir(parents=True, exist_ok=True)
    key = keygen(directory / "id", name)
    issued = cluster.ca.sign_user(name, load_public_key((directory / "id.pub").read_bytes()))
    cert = directory / "id-cert.pub"
    cert.write_text(issued.openssh + "\n")
    return key, cert


class Jumper:
    """One client process jumping as one user: key and certificate, and host trust from
    the cluster's host CA for the bastion and the node alike (no trust on first use)."""

    def __init__(self, cluster, key: Path, cert: Path, bastion_port: int) -> None:
        self.keys = [(asyncssh.read_private_key(str(key)), asyncssh.read_certificate(str(cert)))]
        host_ca = (cluster.state_dir / "ca" / "host_ca.pub").read_text().strip()
        self.known = asyncssh.import_known_hosts(f"@cert-authority * {host_ca}\n")
        self.bastion_port = bastion_port

    def _options(self) -> dict:
        return {
            "client_keys": self.keys,
            "known_hosts": self.known,
            "agent_path": None,
            "config": None,
        }

    async def _jump(self, stage: list[str]) -> None:
        async with asyncssh.connect(
            "127.0.0.1", self.bastion_port, username="dt", **self._options()
        ) as bastion:
            stage[0] = "node"
            # direct-tcpip to node-1:22, the inventory name: what `ssh -J` sends
            async with asyncssh.connect(
                "node-1", 22, tunnel=bastion, username=LOGIN, **self._options()
            ) as node:
                await node.run("true", check=True)

    async def attempt(self) -> tuple[str, str]:
        """("ok", "") or (where, detail): where is "bastion" (connecting or logging in to
        the bastion), "node" (the channel, the node's handshake, login or `true`), or
        "hang" (still running at ATTEMPT_BOUND; detail says at which stage). Any other
        exception than a clean SSH or socket error propagates and fails the test."""
        stage = ["bastion"]
        try:
            await asyncio.wait_for(self._jump(stage), ATTEMPT_BOUND)
        except TimeoutError:
            return "hang", stage[0]
        except (asyncssh.Error, OSError) as exc:
            return stage[0], f"{type(exc).__name__}: {exc}"
        return "ok", ""

    async def burst(self, n: int) -> list[tuple[str, str]]:
        return await asyncio.gather(*(self.attempt() for _ in range(n)))


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _raise_fd_limit(needed: int) -> None:
    """Each attempt holds a socket in this process; raise the soft limit if we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {soft} < the {needed} this test needs")


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def _events(cluster, user: str, kind: str) -> list:
    return cluster.store.list_audit(type=kind, user=user, limit=100_000)


def _every_session_ended(cluster, user: str) -> bool:
    """Each session.start has its session.end: no forward is left registered as live."""
    starts = {e.fields["session_id"] for e in _events(cluster, user, "session.start")}
    ends = {e.fields["session_id"] for e in _events(cluster, user, "session.end")}
    return starts == ends


def _summary(results: list[tuple[str, str]]) -> Counter:
    return Counter((where, detail.split(":")[0]) for where, detail in results if where != "ok")


# -- 100: every one gets through ------------------------------------------------------------


# A burst keeps both cores busy for seconds: beside other tests' servers (make test runs
# files on several workers) 100 handshakes at once overran ATTEMPT_BOUND; alone they do not.
@pytest.mark.flood
def test_100_parallel_jumps_all_succeed(dt_cluster, dt_node, dt_bastion, tmp_path):
    """100 at once is under every limit on the way (the bastion's 200 per source, the
    node's MaxStartups 200): all must reach the node, each with its own audited session
    to node-1 that starts and ends."""
    _raise_fd_limit(1024)
    key, cert = _user_with_cert(dt_cluster, tmp_path / "alice", "alice")
    jumper = Jumper(dt_cluster, key, cert, dt_bastion.port)

    t0 = time.perf_counter()
    results = asyncio.run(jumper.burst(100))
    elapsed = time.perf_counter() - t0
    outcomes = Counter(where for where, _ in results)
    print(f"\n100 parallel jumps in {elapsed:.1f} s: {dict(outcomes)} {dict(_summary(results))}")

    assert dt_bastion.proc.poll() is None, dt_bastion.log()[-3000:]
    starts = _events(dt_cluster, "alice", "session.start")
    assert len(starts) == 100 and all(e.success for e in starts)
    assert {e.fields["node"] for e in starts} == {"node-1"}
    assert _wait_for(lambda: _every_session_ended(dt_cluster, "alice"))
    assert not _events(dt_cluster, "alice", "session.denied")
    if outcomes["hang"]:
        raise JumpHung(f"{outcomes['hang']} of 100 jumps hung: {dict(_summary(results))}")
    assert outcomes == {"ok": 100}, _summary(results)


# -- 1,000: the node throttles, the bastion passes that on cleanly ------------------------------

NODE_MAX_STARTUPS = "10:30:60"


@pytest.mark.flood
def test_1000_parallel_jumps_respect_the_nodes_max_startups(dt_cluster, tmp_path):
    """1,000 separate bastion connections at once, each forwarding to a node whose sshd
    has MaxStartups 10:30:60 (drops new unauthenticated connections at random from 10
    pending, all of them from 60): the node sheds load itself, every attempt ends in
    success or a clean error, the bastion survives, serves `ssh -J` afterwards and
    gives back every socket and session.

    The bastion's per-source caps (200 connections, 128 of them still logging in) are
    raised to 2,000 here: in production a burst like this comes from many addresses,
    and the point is what reaches the node, not the bastion's per-address refusal
    (test_bastion_robustness, test_floods).
    """
    _raise_fd_limit(4096)
    with sshd_node(
        tmp_path / "node", dt_cluster, extra=f"MaxStartups {NODE_MAX_STARTUPS}\n"
    ) as node:
        # our line follows the base config's MaxStartups 200: prove sshd runs with ours
        effective = subprocess.run(
            [SSHD, "-T", "-f", str(node.dir / "sshd_config")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert f"maxstartups {NODE_MAX_STARTUPS}" in effective
        dt_cluster.store.add_node(Node("node-1", "127.0.0.1", node.port, {"env": "test"}))
        with bastion_server(
            dt_cluster.state_dir,
            extra_args=(
                "--set",
                "max_connections_per_source=2000",
                "--set",
                "max_unauthenticated_per_source=2000",
            ),
        ) as bastion:
            key, cert = _user_with_cert(dt_cluster, tmp_path / "alice", "alice")
            jumper = Jumper(dt_cluster, key, cert, bastion.port)
            # warm up (host certificate, database, lazy imports), then the baseline
            assert asyncio.run(jumper.attempt()) == ("ok", "")
            assert _wait_for(lambda: _every_session_ended(dt_cluster, "alice"))
            baseline = _open_fds(bastion.proc.pid)

            t0 = time.perf_counter()
            results = asyncio.run(jumper.burst(1000))
            elapsed = time.perf_counter() - t0
            outcomes = Counter(where for where, _ in results)
            log = node.log()
            dropped = log.count("past MaxStartups")
            print(
                f"\n1000 parallel jumps in {elapsed:.1f} s: {dict(outcomes)}; the node "
                f"dropped {dropped}; failures {dict(_summary(results))}"
            )

            # the node applied its own limit, and is still up
            assert dropped > 0 and "beginning MaxStartups throttling" in log, log[-3000:]
            assert node.proc.poll() is None
            # the bastion survived and still serves a plain OpenSSH `ssh -J`
            assert bastion.proc.poll() is None, bastion.log()[-3000:]
            config = write_ssh_config(
                tmp_path / "ssh_config",
                bastion_port=bastion.port,
                key=key,
                cert=cert,
                cluster=dt_cluster,
            )
            after = ssh(config, f"{LOGIN}@node-1", "echo", "still-served")
            assert after.returncode == 0 and after.stdout.strip() == "still-served", after.stderr
            # it gave back every socket and every session once the clients had gone
            assert _wait_for(lambda: _open_fds(bastion.proc.pid) <= baseline + 5), (
                baseline,
                _open_fds(bastion.proc.pid),
            )
            print(
                f"bastion file descriptors: {baseline} before, {_open_fds(bastion.proc.pid)} after"
            )
            assert _wait_for(lambda: _every_session_ended(dt_cluster, "alice"))

            if outcomes["hang"]:
                raise JumpHung(f"{outcomes['hang']} of 1000 jumps hung: {dict(_summary(results))}")
            # the node's refusals reached the clients as node-side errors, each drop one;
            # the bastion refused none of its own clients because the node was busy
            assert outcomes["bastion"] == 0, _summary(results)
            assert outcomes["node"] >= dropped, _summary(results)
            assert outcomes["ok"] > 0
