"""Signup and login with the real dtclient against a real dt-bastion and sshd node."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import pytest

from bastion.authz.records import Node
from bastion.cluster import init_cluster
from bastion.credentials import totp_now
from bastion.protocol.wire import MAX_MESSAGE
from tests.sshd import LOGIN, bastion_server, sshd_node
from tests.tokens import printed_token

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
PASSWORD = "correct horse battery"
_names = iter(range(1000))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("login")
    cluster = init_cluster(tmp / "state", "login-test")
    with sshd_node(tmp / "node", cluster) as node, bastion_server(tmp / "state") as bastion:
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port, {"env": "prod"}))
        yield type(
            "Env",
            (),
            {
                "tmp": tmp,
                "cluster": cluster,
                "bastion": bastion,
                "proxy": f"127.0.0.1:{bastion.port}",
            },
        )
    cluster.close()


def run(env, home, *args, input=None, check_traceback=True):
    proc = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "DT_STATE": str(env.cluster.state_dir),
            "DT_HOME": str(home),
            "COLUMNS": "200",
            "SSH_AUTH_SOCK": "",
        },
    )
    if check_traceback:
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def add_user(env, roles="access"):
    name = f"u{next(_names)}"
    out = run(env, env.tmp, "dtadmin", "users", "add", name, "--roles", roles, "--logins", LOGIN)
    assert out.returncode == 0, out.stderr
    return name, printed_token(out.stdout)


def ca_pin(env):
    return json.loads(
        run(env, env.tmp, "dtadmin", "ca", "export", "--type", "host", "--format", "json").stdout
    )["fingerprint"]


def signup(env, home, token, *, pin=True):
    """Drive `dtclient signup` like a person: read the URI, answer with a real TOTP code."""
    args = [str(BIN / "dtclient"), "signup", "--proxy", env.proxy, "--token", token]
    if pin:
        args += ["--ca-pin", ca_pin(env)]
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DT_HOME": str(home)},
    )
    if not pin:
        proc.stdin.write("y\n")
        proc.stdin.flush()
    secret = None
    for line in proc.stdout:
        match = re.search(r"secret=([A-Z2-7]+)", line)
        if match:
            secret = match.group(1)
            break
    assert secret, proc.stderr.read()
    proc.stdin.write(f"{PASSWORD}\n{PASSWORD}\n{totp_now(secret)}\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return secret


def next_code(secret):
    # the signup used this step's code; a login in the same 30 s uses the next step's
    return totp_now(secret, time.time() + 30)


@pytest.fixture
def user(env, tmp_path):
    name, token = add_user(env)
    home = tmp_path / "home"
    secret = signup(env, home, token)
    return name, secret, home


def login(env, home, name, password, code, *extra):
    return run(
        env,
        home,
        "dtclient",
        "login",
        "--proxy",
        env.proxy,
        "--user",
        name,
        *extra,
        input=f"{password}\n{code}\n",
    )


# -- the happy path ------------------------------------------------------------------------------


def test_signup_login_status_ls_and_ssh(env, user, tmp_path):
    name, secret, home = user
    result = login(env, home, name, PASSWORD, next_code(secret))
    assert result.returncode == 0, result.stderr
    assert "Logged in as: " + name in result.stdout and "[valid for 1" in result.stdout
    key = home / "clusters" / "login-test" / "keys" / "id_ed25519"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    status = json.loads(run(env, home, "dtclient", "status", "--format", "json").stdout)
    assert status["logged_in_as"] == name and status["logins"] == [LOGIN]
    assert status["cluster"] == "login-test" and not status["device_trusted"]
    nodes = json.loads(run(env, home, "dtclient", "ls", "--format", "json").stdout)
    assert [n["name"] for n in nodes] == ["node-1"]
    config = tmp_path / "ssh_config"
    config.write_text(run(env, home, "dtclient", "config").stdout)
    plain = subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", f"{LOGIN}@node-1", "echo", "plain-ssh"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert plain.returncode == 0 and plain.stdout.strip() == "plain-ssh", plain.stderr
    via = run(env, home, "dtclient", "ssh", f"{LOGIN}@node-1", "exit", "3")
    assert via.returncode == 3
    kinds = [e.type for e in env.cluster.store.list_audit(user=name)]
    assert {"user.signup", "user.login", "cert.create", "session.start"} <= set(kinds)


def test_logout_leaves_nothing_usable(env, user):
    name, secret, home = user
    assert login(env, home, name, PASSWORD, next_code(secret)).returncode == 0
    assert run(env, home, "dtclient", "logout").returncode == 0
    assert not (home / "clusters" / "login-test" / "keys" / "id_ed25519").exists()
    assert not (home / "clusters" / "login-test" / "keys" / "id_ed25519-cert.pub").exists()
    status = run(env, home, "dtclient", "status")
    assert status.returncode == 15 and "not logged in" in status.stderr


# -- failures: one clear line, non-zero exit, an audit event --------------------------------------


def test_wrong_password_and_wrong_code(env, user):
    name, secret, home = user
    bad = login(env, home, name, "not the password", next_code(secret))
    assert bad.returncode == 6 and "login failed" in bad.stderr
    assert bad.stderr.strip().count("\n") <= 3  # the prompts and one error line
    bad = login(env, home, name, PASSWORD, "000000")
    assert bad.returncode == 6
    reasons = [e.message for e in env.cluster.store.list_audit(type="auth.failed", user=name)]
    assert "wrong password" in reasons and "wrong one-time code" in reasons


def test_five_failures_lock_the_account(env, user):
    name, secret, home = user
    for _ in range(5):
        assert login(env, home, name, "nope nope nope", "123456").returncode == 6
    locked = login(env, home, name, PASSWORD, next_code(secret))
    assert locked.returncode == 6
    locks = [lk for lk in env.cluster.store.list_locks(now=time.time()) if lk.target == name]
    assert locks and locks[0].message == "too many failed logins"
    assert any(e.type == "lock.create" for e in env.cluster.store.list_audit(user=name))
    assert run(env, home, "dtadmin", "lock", "rm", locks[0].id).returncode == 0
    assert login(env, home, name, PASSWORD, next_code(secret)).returncode == 0


def test_reused_and_bogus_signup_tokens(env, tmp_path):
    name, token = add_user(env)
    signup(env, tmp_path / "h1", token)
    again = run(
        env,
        tmp_path / "h2",
        "dtclient",
        "signup",
        "--proxy",
        env.proxy,
        "--token",
        token,
        "--ca-pin",
        ca_pin(env),
    )
    assert again.returncode != 0 and "error:" in again.stderr
    cut = run(
        env,
        tmp_path / "h3",
        "dtclient",
        "signup",
        "--proxy",
        env.proxy,
        "--token",
        token[:-4],
        "--ca-pin",
        ca_pin(env),
    )
    assert cut.returncode == 8 and "cut off" in cut.stderr
    assert any("signup" in e.message for e in env.cluster.store.list_audit(type="auth.failed"))


def test_wrong_ca_pin_stops_before_any_secret_is_sent(env, user):
    name, secret, home = user
    wrong = "SHA256:" + "A" * 43
    result = login(env, home, name, PASSWORD, next_code(secret), "--ca-pin", wrong)
    assert result.returncode == 14 and "not the pinned" in result.stderr
    assert not [
        e
        for e in env.cluster.store.list_audit(user=name)
        if e.type == "user.login" and e.time > time.time() - 5
    ]


def test_unreachable_bastion(env, tmp_path):
    result = run(
        env, tmp_path, "dtclient", "login", "--proxy", "127.0.0.1:1", "--user", "x", input="a\nb\n"
    )
    assert result.returncode == 14 and "cannot reach the bastion" in result.stderr


# -- garbage on the dt-api channel ------------------------------------------------------------------


async def _raw_api(env, name, secret, payloads):
    """A hand-made client: authenticate for real, then send raw bytes on dt-api."""

    class Client(asyncssh.SSHClient):
        def kbdint_auth_requested(self):
            return ""

        def kbdint_challenge_received(self, name_, instructions, lang, prompts):
            return [PASSWORD, next_code(secret)][: len(prompts)] if prompts else []

    conn, _ = await asyncssh.create_connection(
        Client,
        "127.0.0.1",
        env.bastion.port,
        username=name,
        known_hosts=None,
        agent_path=None,
        config=None,
        password_auth=False,
        public_key_auth=False,
        client_keys=None,
    )
    answers = []
    async with conn:
        for payload in payloads:
            writer, reader, _ = await conn.open_session(subsystem="dt-api", encoding=None)
            writer.write(payload)
            writer.write_eof()
            answers.append(await asyncio.wait_for(reader.read(), 10))
    return answers


def test_malformed_and_oversized_messages(env, user):
    name, secret, home = user
    hello = b'{"client":"t","type":"hello","version":1}\n'
    answers = asyncio.run(
        _raw_api(
            env,
            name,
            secret,
            [
                hello + b'{"type":"list_nodes","extra":1}\n',
                hello + b"\xff\xfe not json\n",
                hello + b"x" * (MAX_MESSAGE + 1024) + b"\n",
                b'{"type":"hello","version":99,"client":"t"}\n',
            ],
        )
    )
    for answer in answers:
        last = json.loads(answer.strip().split(b"\n")[-1])
        assert last["type"] == "error" and last["code"] == "protocol_error", answer[-300:]
    assert b"unknown field" in answers[0]
    assert b"larger than" in answers[2]
    assert b"version 99" in answers[3]
    # the bastion writes these audit rows after it answers (off its event loop): poll
    deadline = time.monotonic() + 30
    while len(env.cluster.store.list_audit(type="api.failed", user=name)) < 4:
        assert time.monotonic() < deadline, "the bastion never audited the four errors"
        time.sleep(0.05)
