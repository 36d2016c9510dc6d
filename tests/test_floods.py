"""Floods, before and after login, the way they were tried against the product.

Each attack of issue 12 against a real `dt-bastion serve` on loopback, with real
asyncssh clients, raw sockets and OpenSSH's ``ssh -J``:

* 600 publickey queries with certificates of throw-away CAs: they count as failures
  (the address is cut off), and they leave a handful of audit rows, not 600;
* 2,000 dt-api channel opens on one connection: at most max_channels_per_connection
  are open at once;
* 100 pipelined cert_requests: at most max_certs_per_user_per_minute certificates;
* silent sockets filling every pre-login slot: a real ``ssh -J`` still gets through;
* 60 password attempts at once: a certificate login is not held up, and a real
  password login succeeds or is told the bastion is busy.

Each test has a bastion of its own: a flood leaves its address rate-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from bastion.authz.records import Node, User
from bastion.ca.certs import load_public_key
from bastion.cluster import Cluster, init_cluster
from bastion.credentials import hash_password, new_totp_secret, totp_now
from bastion.protocol import wire
from bastion.protocol.errors import DTError
from client.api import Credentials, HostTrust, open_session
from tests.sshd import LOGIN, BastionProcess, bastion_server, keygen, ssh, sshd_node, user_client

pytestmark = [pytest.mark.integration, pytest.mark.flood]
PASSWORD = "correct horse battery"


class Env:
    def __init__(self, tmp: Path, cluster: Cluster, bastion: BastionProcess) -> None:
        self.tmp, self.cluster, self.bastion = tmp, cluster, bastion
        self.host_ca = (cluster.state_dir / "ca" / "host_ca.pub").read_text().strip()

    def trust(self) -> HostTrust:
        return HostTrust(trusted=(self.host_ca,))

    def certificate_user(self, name: str) -> tuple[Credentials, str]:
        self.cluster.store.add_user(User(name, ("access",), (LOGIN,)))
        keygen(self.tmp / name)
        pub = (self.tmp / f"{name}.pub").read_text()
        issued = self.cluster.ca.sign_user(name, load_public_key(pub.encode()))
        (self.tmp / f"{name}-cert.pub").write_text(issued.openssh + "\n")
        creds = Credentials(
            name,
            client_key=asyncssh.read_private_key(str(self.tmp / name)),
            certificate=asyncssh.read_certificate(str(self.tmp / f"{name}-cert.pub")),
        )
        return creds, pub

    def password_user(self, name: str) -> Credentials:
        secret = new_totp_secret()
        self.cluster.store.add_user(
            User(
                name,
                ("access",),
                (LOGIN,),
                password_hash=hash_password(PASSWORD),
                totp_secret=secret,
            )
        )
        return Credentials(name, password=PASSWORD, totp_code=totp_now(secret))

    def audit(self, kind: str, since: float) -> list:
        return [e for e in self.cluster.store.list_audit(type=kind, since=since, limit=10_000)]

    def alive(self) -> None:
        assert self.bastion.proc.poll() is None, self.bastion.log()
        assert "Traceback" not in self.bastion.log(), self.bastion.log()


@contextlib.contextmanager
def bastion_env(tmp: Path, *settings: str, node: bool = False) -> Iterator[Env]:
    cluster = init_cluster(tmp / "state", "floods")
    args = tuple(arg for setting in settings for arg in ("--set", setting))
    try:
        with contextlib.ExitStack() as stack:
            if node:
                sshd = stack.enter_context(sshd_node(tmp / "node", cluster))
                cluster.store.add_node(Node("node-1", "127.0.0.1", sshd.port))
            bastion = stack.enter_context(bastion_server(cluster.state_dir, extra_args=args))
            time.sleep(0.2)  # let the readiness probe's connection be forgotten
            yield Env(tmp, cluster, bastion)
    finally:
        cluster.close()


def connect(env: Env, keys: list, source: str = "127.0.0.1", **options):
    return asyncssh.connect(
        "127.0.0.1",
        env.bastion.port,
        local_addr=(source, 0),
        username="dt",
        known_hosts=None,
        agent_path=None,
        config=None,
        client_keys=keys,
        kbdint_auth=False,
        password_auth=False,
        connect_timeout=20,
        **options,
    )


def throw_away_certificates(n: int) -> list:
    """One user key, n certificates for it, each from a CA made for it alone."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    keys = []
    for _ in range(n):
        ca = asyncssh.generate_private_key("ssh-ed25519")
        cert = ca.generate_user_certificate(key, "alice", principals=["-dt-jump"])
        keys.append((key, cert))
    return keys


# -- 1. refused keys at the query stage ---------------------------------------------------------


def test_refused_key_queries_count_and_are_summarised(tmp_path):
    with bastion_env(tmp_path) as env:
        good, _ = env.certificate_user("alice")
        good_key = [(good.client_key, good.certificate)]
        keys = throw_away_certificates(600)
        since = time.time()

        async def flood() -> str:
            """One connection offering all 600: the bastion stops answering at the limit."""
            try:
                async with connect(env, keys):
                    return "logged in"
            except asyncssh.PermissionDenied:
                return "denied"
            except asyncssh.DisconnectError as exc:
                return exc.reason

        start = time.monotonic()
        outcome = asyncio.run(asyncio.wait_for(flood(), 120))
        assert time.monotonic() - start < 60
        assert "too many failed logins" in outcome, outcome

        async def log_in(source: str) -> str:
            try:
                async with connect(env, good_key, source):
                    return "logged in"
            except asyncssh.DisconnectError as exc:
                return exc.reason

        # The address is refused at connect, even with a good certificate; another
        # address is not.
        with socket.create_connection(("127.0.0.1", env.bastion.port), timeout=20) as sock:
            assert b"too many failed logins" in _read_until_closed(sock)
        assert asyncio.run(log_in("127.0.0.2")) == "logged in"

        deadline = time.monotonic() + 10
        while not any("unknown CA" in e.message for e in env.audit("auth.failed", since)):
            assert time.monotonic() < deadline, [e.message for e in env.audit("auth.failed", since)]
            time.sleep(0.1)
        env.alive()
        # The rest are counted, and the count written when the minute is over or, as
        # here, when the bastion stops.
        env.bastion.proc.terminate()
        assert env.bastion.proc.wait(15) == 0, env.bastion.log()
        rows = [e for e in env.audit("auth.failed", since) if e.remote_addr == "127.0.0.1"]
        assert 2 <= len(rows) <= 6, [e.message for e in rows]  # not 600
        assert any("unknown CA" in e.message for e in rows)
        summary = [e for e in rows if "more refused keys from 127.0.0.1" in e.message]
        # 30 certificates refused before the cut-off (asyncssh offers each one's key
        # bare as well: those are counted in the row, not as failures)
        assert len(summary) == 1 and int(summary[0].message.split()[0]) >= 29, summary


def test_keys_refused_before_a_login_on_the_same_connection_are_no_failure(tmp_path):
    """ssh-agent offers plain keys first: refused queries of a connection that then
    logs in count for nothing (no auth.failed, no step towards the address limit)."""
    with bastion_env(tmp_path, "max_auth_failures_per_source=5") as env:
        good, _ = env.certificate_user("alice")
        plain = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(3)]
        since = time.time()

        async def agent_like_logins() -> int:
            done = 0
            for _ in range(4):  # 12 refused queries: more than the limit of 5
                async with connect(env, [*plain, (good.client_key, good.certificate)]):
                    done += 1
            return done

        assert asyncio.run(asyncio.wait_for(agent_like_logins(), 60)) == 4
        time.sleep(0.5)
        assert env.audit("auth.failed", since) == []
        env.alive()


# -- 2. channels and certificates on one connection -----------------------------------------------


def test_channels_per_connection_are_capped(tmp_path):
    with bastion_env(tmp_path) as env:
        creds, _ = env.certificate_user("carol")
        since = time.time()

        async def flood() -> tuple[list, list[str]]:
            session = await open_session("127.0.0.1", env.bastion.port, creds, env.trust())
            try:

                async def one() -> object:
                    return await session.conn.open_session(subsystem="dt-api", encoding=None)

                results = await asyncio.gather(
                    *(one() for _ in range(2000)), return_exceptions=True
                )
                opened = [r for r in results if not isinstance(r, BaseException)]
                refused = [r.reason for r in results if isinstance(r, asyncssh.ChannelOpenError)]
                for writer, _reader, _stderr in opened:
                    writer.close()
                # Once they are closed, channels open again.
                deadline = time.monotonic() + 10
                while True:
                    try:
                        writer, reader, _ = await session.conn.open_session(
                            subsystem="dt-api", encoding=None
                        )
                        writer.close()
                        break
                    except asyncssh.ChannelOpenError:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.1)
                return opened, refused
            finally:
                await session.close()

        opened, refused = asyncio.run(asyncio.wait_for(flood(), 120))
        assert 1 <= len(opened) <= 15  # 16 with the session that opened them
        assert len(opened) + len(refused) == 2000
        assert all("too many channels open on this connection" in r for r in refused)
        rows = [e for e in env.audit("session.denied", since) if e.user == "carol"]
        assert 1 <= len(rows) <= 3, [e.message for e in rows]  # summarised, not 1,985
        env.alive()


def test_pipelined_certificate_requests_get_at_most_the_rate(tmp_path):
    with bastion_env(tmp_path) as env:
        creds, pub = env.certificate_user("dave")  # its own certificate counts too

        async def pipeline() -> tuple[int, list[DTError]]:
            session = await open_session("127.0.0.1", env.bastion.port, creds, env.trust())
            try:
                for _ in range(100):
                    await session.send(wire.CertRequest(public_key=pub))
                issued, refused = 0, []
                for _ in range(100):
                    try:
                        await session.receive(wire.CertIssued, timeout=30)
                        issued += 1
                    except DTError as exc:
                        refused.append(exc)
                return issued, refused
            finally:
                await session.close()

        issued, refused = asyncio.run(asyncio.wait_for(pipeline(), 120))
        assert 1 <= issued <= 20 - 1
        assert len(refused) == 100 - issued
        assert all(
            e.code == "rate_limited" and "try again in a minute" in e.message for e in refused
        )
        recent = env.cluster.store.count_user_certs("dave", since=time.time() - 120)
        assert recent <= 20
        env.alive()


# -- 3. pre-login slots -----------------------------------------------------------------------------


def test_silent_sockets_cannot_keep_a_real_user_out(tmp_path):
    login_timeout = 8.0
    with bastion_env(
        tmp_path,
        "max_connections=12",
        "max_unauthenticated=6",
        "max_unauthenticated_per_source=2",
        f"login_timeout={login_timeout}",
        node=True,
    ) as env:
        env.cluster.store.add_user(User("erin", ("access",), (LOGIN,)))
        config = user_client(env.cluster, tmp_path / "erin", "erin", bastion_port=env.bastion.port)
        silent: list[socket.socket] = []
        try:
            opened_at = time.monotonic()
            for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
                for _ in range(2):
                    sock = socket.create_connection(
                        ("127.0.0.1", env.bastion.port), timeout=20, source_address=(source, 0)
                    )
                    silent.append(sock)
                    assert sock.recv(64).startswith(b"SSH-2.0-dt-bastion")  # counted
            # One address cannot take more than its share of pre-login slots.
            extra = socket.create_connection(
                ("127.0.0.1", env.bastion.port), timeout=20, source_address=("127.0.0.2", 0)
            )
            with extra:
                assert b"still logging in" in _read_until_closed(extra)
            # Every pre-login slot is taken: a real user still gets through.
            start = time.monotonic()
            result = ssh(config, f"{LOGIN}@node-1", "echo", "through")
            took = time.monotonic() - start
            assert result.returncode == 0 and "through" in result.stdout, result.stderr
            assert took < login_timeout - 1, took  # not by waiting for the silent ones
            # The silent ones go at the login timeout (one went earlier, for the user).
            for sock in silent:
                _read_until_closed(sock)
            assert time.monotonic() - opened_at < login_timeout + 5
        finally:
            for sock in silent:
                sock.close()
        env.alive()


def _read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            out += chunk
    return out


# -- 4. the password-check queue -------------------------------------------------------------------


def test_password_floods_shed_load_and_hold_up_no_certificate_login(tmp_path):
    with bastion_env(
        tmp_path, "max_auth_failures_per_source=10000", "max_unauthenticated_per_source=200"
    ) as env:
        cert_creds, _ = env.certificate_user("frank")
        pw_creds = env.password_user("grace")

        async def attack() -> tuple[float, str, list[str]]:
            go = asyncio.Event()
            waiting = []

            class Guesser(asyncssh.SSHClient):
                answered = False

                def kbdint_auth_requested(self) -> str:
                    return ""

                async def kbdint_challenge_received(self, name, instructions, lang, prompts):
                    if self.answered or not prompts:
                        return None if self.answered else []
                    self.answered = True
                    waiting.append(1)
                    await go.wait()  # all 60 answer at once
                    return ["wrong password", "000000"][: len(prompts)]

            async def guess(i: int) -> str:
                try:
                    conn, _ = await asyncssh.create_connection(
                        Guesser,
                        "127.0.0.1",
                        env.bastion.port,
                        username=f"ghost{i}",
                        known_hosts=None,
                        agent_path=None,
                        config=None,
                        kbdint_auth=True,
                        password_auth=False,
                        public_key_auth=False,
                        client_keys=None,
                        connect_timeout=30,
                    )
                    conn.close()
                    return "logged in"
                except asyncssh.PermissionDenied:
                    return "denied"
                except asyncssh.DisconnectError as exc:
                    return exc.reason

            guesses = [asyncio.ensure_future(guess(i)) for i in range(60)]
            deadline = time.monotonic() + 60
            while len(waiting) < 60 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            go.set()
            await asyncio.sleep(0.05)
            start = time.monotonic()
            session = await open_session("127.0.0.1", env.bastion.port, cert_creds, env.trust())
            await session.call(wire.Whoami(), wire.Identity)
            cert_took = time.monotonic() - start
            await session.close()
            try:
                session = await open_session("127.0.0.1", env.bastion.port, pw_creds, env.trust())
                await session.call(wire.Whoami(), wire.Identity)
                await session.close()
                password = "logged in"
            except DTError as exc:
                password = exc.message
            return cert_took, password, await asyncio.gather(*guesses)

        cert_took, password, outcomes = asyncio.run(asyncio.wait_for(attack(), 120))
        assert cert_took < 2.0, cert_took
        busy = "the bastion is busy checking other logins; try again in a moment"
        assert password == "logged in" or busy in password, password
        assert "logged in" not in outcomes
        assert sum(busy in o for o in outcomes) >= 1, outcomes  # shed, not queued
        assert all(o == "denied" or busy in o for o in outcomes), outcomes
        env.alive()
