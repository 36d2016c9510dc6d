"""Limits and single use across bastions: two `dt-bastion serve` on one state directory.

An attacker who spreads guesses over several bastions gets no more than against one:
failures from one address count on every bastion (``max_auth_failures_per_source``,
kept in ``source_failures`` and read by each bastion on every watcher turn), five
wrong passwords spread over A and B lock the user out as five on one would, one
one-time code used at once on A and B logs in once, and one signup token used at once
on A and B signs up exactly one of them.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import asyncssh
import pyotp
import pytest

from bastion import accounts, credentials
from bastion.authz.records import User
from bastion.cluster import Cluster, init_cluster
from bastion.protocol import wire
from bastion.protocol.errors import DTError
from client.api import Credentials, HostTrust, open_session
from tests.haproxy import Serve
from tests.sshd import LOGIN

pytestmark = pytest.mark.integration

LIMIT = 8  # max_auth_failures_per_source for these bastions
PASSWORD = "correct horse battery staple"
ATTACKER = "127.0.0.5"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[tuple[Cluster, Serve, Serve]]:
    base = tmp_path_factory.mktemp("pair")
    cluster = init_cluster(base / "state", "pair")
    args = ("--set", f"max_auth_failures_per_source={LIMIT}")
    with ExitStack() as stack:
        stack.callback(cluster.close)
        a, b = Serve(cluster.state_dir, "a", args), Serve(cluster.state_dir, "b", args)
        for bastion in (a, b):
            stack.callback(bastion.stop)
            bastion.start()
        yield cluster, a, b


def trust(cluster: Cluster) -> HostTrust:
    return HostTrust(trusted=((cluster.state_dir / "ca" / "host_ca.pub").read_text().strip(),))


def foreign_certificate(directory: Path) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
    """A user certificate from a CA of the attacker's own: refused, counted as a failure."""
    directory.mkdir()
    for name in ("ca", "id"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name)],
            check=True,
        )
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(directory / "ca"), "-I", "x", "-n", "-dt-jump",
         str(directory / "id.pub")],
        check=True,
    )  # fmt: skip
    return (
        asyncssh.read_private_key(str(directory / "id")),
        asyncssh.read_certificate(str(directory / "id-cert.pub")),
    )


async def attempt(port: int, key: asyncssh.SSHKey, cert: asyncssh.SSHCertificate) -> str:
    """One connection presenting the foreign certificate: "failed" (refused, counted) or
    "refused" (turned away before any key was looked at: too many failures)."""
    try:
        conn = await asyncssh.connect(
            "127.0.0.1", port, local_addr=(ATTACKER, 0), username="mallory",
            known_hosts=None, agent_path=None, config=None, client_keys=[(key, cert)],
            password_auth=False, kbdint_auth=False, connect_timeout=10,
        )  # fmt: skip
    except asyncssh.PermissionDenied:
        return "failed"
    except (asyncssh.Error, OSError):
        return "refused"
    conn.close()
    return "admitted"


def test_failures_spread_over_two_bastions_lock_the_address_out_as_on_one(pair, tmp_path):
    cluster, a, b = pair
    key, cert = foreign_certificate(tmp_path / "attacker")

    async def spread() -> list[str]:
        outcomes = []
        for i in range(2 * LIMIT):  # what one bastion per address would allow, over two
            outcomes.append(await attempt((a, b)[i % 2].port, key, cert))
            await asyncio.sleep(0.3)  # a watcher turn or so: each sees the other's
        return outcomes

    outcomes = asyncio.run(spread())
    assert "admitted" not in outcomes
    assert outcomes[-4:] == ["refused"] * 4, outcomes  # both turn it away now
    # Each bastion alone would take LIMIT (2 * LIMIT over both); a watcher turn late on
    # a loaded host may let one or two more by.
    counted = cluster.store.count_source_failures(since=0)[ATTACKER]
    assert LIMIT <= counted <= LIMIT + 2, f"{counted} failures counted: {outcomes}"
    assert outcomes.count("failed") >= LIMIT - 1


def password_user(cluster: Cluster, name: str) -> pyotp.TOTP:
    secret = credentials.new_totp_secret()
    cluster.store.add_user(
        User(
            name,
            ("access",),
            (LOGIN,),
            password_hash=credentials.hash_password(PASSWORD),
            totp_secret=secret,
        )
    )
    return pyotp.TOTP(secret)


async def password_login(cluster: Cluster, port: int, user: str, password: str, code: str) -> str:
    try:
        session = await open_session(
            "127.0.0.1", port, Credentials(user, password=password, totp_code=code), trust(cluster)
        )
    except DTError as exc:
        return exc.message
    await session.close()
    return "logged in"


def test_one_code_used_at_once_on_two_bastions_logs_in_once(pair):
    cluster, a, b = pair
    code = password_user(cluster, "tina").now()

    async def race() -> list[str]:
        return list(
            await asyncio.gather(
                password_login(cluster, a.port, "tina", PASSWORD, code),
                password_login(cluster, b.port, "tina", PASSWORD, code),
            )
        )

    outcomes = asyncio.run(race())
    assert sorted(o == "logged in" for o in outcomes) == [False, True], outcomes


def test_five_wrong_passwords_spread_over_two_bastions_lock_the_user_out(pair):
    cluster, a, b = pair
    totp = password_user(cluster, "walt")

    async def guesses() -> tuple[list[str], str]:
        said = []
        for i in range(5):
            said.append(
                await password_login(cluster, (a, b)[i % 2].port, "walt", f"wrong-{i}", "000000")
            )
        right = await password_login(cluster, b.port, "walt", PASSWORD, totp.now())
        return said, right

    said, right = asyncio.run(guesses())
    assert all("logged in" not in s for s in said), said
    assert "locked" in right, right


def test_one_signup_token_used_at_once_on_two_bastions_signs_up_one(pair):
    cluster, a, b = pair
    cluster.store.add_user(User("sam", ("access",), (LOGIN,)))
    token = accounts.issue_signup_token(cluster.store, "sam", actor="test")

    async def sign_up(port: int, ready: asyncio.Barrier) -> str:
        creds = Credentials("-dt-signup", signup_token=token)
        try:
            session = await open_session("127.0.0.1", port, creds, trust(cluster))
        except DTError as exc:
            await ready.wait()
            return f"refused: {exc.message}"
        try:
            info = await session.call(wire.SignupBegin(token=token), wire.SignupInfo)
            secret = parse_qs(urlparse(info.totp_uri).query)["secret"][0]
            await ready.wait()  # both have begun; now both finish at once
            finish = wire.SignupFinish(
                token=token, password=PASSWORD, totp_code=pyotp.TOTP(secret).now()
            )
            await session.call(finish, wire.Ok)
            return "signed up"
        except DTError as exc:
            return f"refused: {exc.message}"
        finally:
            await session.close()

    async def race() -> list[str]:
        ready = asyncio.Barrier(2)
        return list(await asyncio.gather(sign_up(a.port, ready), sign_up(b.port, ready)))

    outcomes = asyncio.run(race())
    assert sorted(o == "signed up" for o in outcomes) == [False, True], outcomes
    signups = [e for e in cluster.store.list_audit(type="user.signup") if e.user == "sam"]
    assert [e.success for e in signups].count(True) == 1
