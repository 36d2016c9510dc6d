"""Log and audit forging: what a client writes cannot become a line of the bastion's own.

Attacked as it was found: a raw client sent a pre-login SSH disconnect whose reason held
a newline and a fake ``DT3101I session.start allow user=admin``, and the bastion's log
printed it as a line of its own (and the audit message kept the raw newline). Every
string in an audit row is now escaped (:func:`bastion.audit.escape_control`), and
``dt-bastion serve`` escapes every log record (:class:`bastion.server_cli.OneLineFormatter`).
A peer's disconnect reason is recorded quoted, as the client's words.

Also here: an ssh-agent offers the plain key before the certificate, and a refused
*query* is no failure when the connection then logs in (four agent logins once left four
false ``auth.failed`` rows); a connection that only offers unknown keys still leaves one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest

from bastion import audit
from bastion.authz.records import Node, User
from bastion.ca.certs import load_public_key
from bastion.cluster import init_cluster
from bastion.server_cli import OneLineFormatter
from tests.sshd import LOGIN, bastion_server, keygen, ssh, sshd_node, write_known_hosts

FORGED = "DT3101I session.start allow user=admin device=None addr=10.0.0.1 forged"


# -- the escaping itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("plain text, ünïcode", "plain text, ünïcode"),
        (f"bye\n{FORGED}", f"bye\\n{FORGED}"),
        ("cr\rlf\n", "cr\\rlf\\n"),
        ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),
        ("bidi \u202eevil", "bidi \\u202eevil"),
        ("line\u2028sep", "line\\u2028sep"),
        ("lone \ud800", "lone \\ud800"),
        ("nul\x00", "nul\\x00"),
    ],
)
def test_escape_control(text, expected):
    escaped = audit.escape_control(text)
    assert escaped == expected
    assert audit.escape_control(escaped) == escaped  # twice is once (record, then log)


def test_an_audit_row_holds_no_control_character(tmp_path):
    cluster = init_cluster(tmp_path / "state", "forge")
    try:
        audit.record(
            cluster.store,
            "auth.failed",
            success=False,
            message=f"bye\n{FORGED}",
            user="alice\nDT3101I",
            device="laptop\x1b[0m",
            remote_addr="10.0.0.1\r",
            subsystem="dt-api\n",
            names=["a\nb"],
        )
        (row,) = cluster.store.list_audit(type="auth.failed")
    finally:
        cluster.close()
    assert row.message == f"bye\\n{FORGED}"
    assert (row.user, row.device, row.remote_addr) == (
        "alice\\nDT3101I",
        "laptop\\x1b[0m",
        "10.0.0.1\\r",
    )
    assert row.fields == {"subsystem": "dt-api\\n", "names": ["a\\nb"]}


def test_the_log_formatter_keeps_every_record_on_its_lines():
    formatter = OneLineFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord(
        "bastion", logging.INFO, __file__, 1, "peer said %s", (f"x\n{FORGED}",), None
    )
    assert formatter.format(record) == f"INFO bastion: peer said x\\n{FORGED}"
    try:
        raise ValueError(f"bad\n{FORGED}")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "bastion", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    lines = formatter.format(record).splitlines()
    assert lines[0] == "ERROR bastion: failed"
    assert all(line.startswith("    ") for line in lines[1:]), lines  # no line a record's
    assert not any(line.startswith("DT") for line in lines)


# -- the attack, against the real dt-bastion serve ---------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("forge")
    cluster = init_cluster(tmp / "state", "forge")
    cluster.store.add_user(User("alice", ("access",), (LOGIN,)))
    with sshd_node(tmp / "node", cluster) as node, bastion_server(tmp / "state") as bastion:
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port, {"env": "test"}))
        yield type("Env", (), {"tmp": tmp, "cluster": cluster, "node": node, "bastion": bastion})
    cluster.close()


@pytest.fixture
def own(env):
    """A bastion of its own on the module's state: refusals from one address are
    audited once a minute (then summarised), so another test's must not have taken
    this minute's row."""
    with bastion_server(env.cluster.state_dir) as bastion:
        yield type("Env", (), {"cluster": env.cluster, "bastion": bastion})


def _packet(payload: bytes) -> bytes:
    """One SSH binary packet before any key exchange (RFC 4253 section 6): no MAC."""
    pad = 8 - (len(payload) + 5) % 8
    pad += 8 if pad < 4 else 0
    return struct.pack(">IB", len(payload) + pad + 1, pad) + payload + bytes(pad)


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def raw_disconnect(port: int, reason: str, code: int = 2) -> None:
    """A client that says its version, then disconnects with ``reason`` at once."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"SSH-2.0-OpenSSH_9.2p1 forger\r\n")
        sock.recv(4096)  # the bastion's version and key exchange offer
        msg_disconnect = bytes([1]) + struct.pack(">I", code)
        sock.sendall(_packet(msg_disconnect + _ssh_string(reason.encode()) + _ssh_string(b"")))
        sock.settimeout(5)
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass


def _rows(env, mark: int, bound: float = 10.0, want=lambda rows: rows) -> list:
    """Audit rows after ``mark``; polled (bounded), as a row written when the
    connection closes may land just after the client has gone."""
    deadline = time.monotonic() + bound
    while True:
        rows = [e for e in env.cluster.store.list_audit(limit=200) if e.id > mark]
        if want(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def _mark(env) -> int:
    rows = env.cluster.store.list_audit(limit=1000)
    return rows[-1].id if rows else 0


def _log_lines_after(env, offset: int, needle: str, bound: float = 10.0) -> list[str]:
    deadline = time.monotonic() + bound
    while True:
        text = env.bastion.log()[offset:]
        if needle in text or time.monotonic() > deadline:
            return text.splitlines()
        time.sleep(0.05)


@pytest.mark.integration
def test_a_disconnect_reason_forges_no_log_line_and_no_audit_newline(env):
    mark, offset = _mark(env), len(env.bastion.log())
    raw_disconnect(env.bastion.port, f"bye\n{FORGED}")
    # The real log (the serve process's stderr): the text is there, escaped, on the
    # line of the bastion's own record; no line starts with the forged one.
    lines = _log_lines_after(env, offset, "DT3101I")
    assert not [line for line in lines if line.startswith("DT3101I")], lines
    assert not [line for line in lines if "session.start allow" in line and "bye" not in line]
    assert any("client disconnected before login: 'bye\\nDT3101I" in line for line in lines), lines
    # The audit row: the client's words, quoted and escaped, said to be the client's.
    rows = _rows(env, mark, want=lambda rows: any("bye" in e.message for e in rows))
    (row,) = [e for e in rows if "bye" in e.message]
    assert row.type == "auth.failed" and not row.success
    assert row.message.startswith("client disconnected before login: 'bye\\nDT3101I")
    assert "\n" not in row.message
    assert env.bastion.proc.poll() is None


@pytest.mark.integration
def test_a_user_name_forges_no_log_line(own, monkeypatch):
    """A user name with a newline and ESC: asyncssh's own client would not send it
    (SASLprep), so this one skips that; the bastion refuses it, and neither its audit
    row nor its log line holds the raw characters."""
    monkeypatch.setattr(asyncssh.connection, "saslprep", lambda name: name)

    async def attempt() -> None:
        try:
            async with asyncssh.connect(
                "127.0.0.1",
                own.bastion.port,
                username=f"mallory\n{FORGED}\x1b[2J",
                password="wrong",
                known_hosts=None,
                agent_path=None,
                config=None,
                client_keys=None,
                connect_timeout=15,
            ):
                pass
        except (asyncssh.Error, OSError):
            pass

    env = own
    mark, offset = _mark(env), len(env.bastion.log())
    asyncio.run(attempt())
    rows = _rows(env, mark, want=lambda rows: any(e.type == "auth.failed" for e in rows))
    assert rows and all("\n" not in e.message and "\x1b" not in e.message for e in rows)
    assert all(e.user is None or "\n" not in e.user for e in rows), rows
    lines = _log_lines_after(env, offset, "auth.failed")
    assert not [line for line in lines if line.startswith("DT3101I")], lines
    assert not [line for line in lines if "\x1b" in line], lines


# -- ssh-agent: the plain key first, then the certificate ---------------------------------------


@pytest.fixture
def agent(tmp_path):
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.05)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)


def _ssh_add(sock: Path, *paths: Path) -> None:
    env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
    for path in paths:
        subprocess.run(["ssh-add", "-q", str(path)], env=env, check=True, capture_output=True)


def _agent_config(env, directory: Path, sock: Path) -> Path:
    """ssh_config using only the agent, as a person's does: every identity it holds, in
    its order (the plain key first)."""
    known = write_known_hosts(directory / "known_hosts", env.cluster)
    common = f"""    IdentityAgent {sock}
    IdentityFile none
    UserKnownHostsFile {known}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10
"""
    config = directory / "ssh_config"
    config.write_text(
        f"Host bastion\n    HostName 127.0.0.1\n    Port {env.bastion.port}\n    User dt\n"
        f"    HostKeyAlias 127.0.0.1\n{common}\nHost * !bastion\n    ProxyJump bastion\n{common}"
    )
    return config


@pytest.mark.integration
def test_agent_logins_leave_no_false_failures(env, agent, tmp_path):
    key = keygen(tmp_path / "id", "alice")
    issued = env.cluster.ca.sign_user("alice", load_public_key((tmp_path / "id.pub").read_bytes()))
    (tmp_path / "id-cert.pub").write_text(issued.openssh + "\n")
    _ssh_add(agent, key)  # adds the key, then its certificate beside it
    listed = subprocess.run(
        ["ssh-add", "-L"],
        env={**os.environ, "SSH_AUTH_SOCK": str(agent)},
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert len(listed) == 2 and "cert" not in listed[0].split()[0], listed  # plain key first
    config = _agent_config(env, tmp_path, agent)
    mark = _mark(env)
    for _ in range(4):
        result = ssh(config, f"{LOGIN}@node-1", "true")
        assert result.returncode == 0, result.stderr
    rows = _rows(
        env, mark, want=lambda rows: len([e for e in rows if e.type == "session.end"]) >= 4
    )
    assert len([e for e in rows if e.type == "session.start"]) == 4, rows
    assert [e for e in rows if e.type == "auth.failed"] == []


@pytest.mark.integration
def test_only_unknown_keys_still_leave_one_failure(own, agent, tmp_path):
    keys = [keygen(tmp_path / f"stranger{i}", "stranger") for i in range(3)]
    _ssh_add(agent, *keys)
    _one_failure_for(own, _agent_config(own, tmp_path, agent))


def _one_failure_for(env, config: Path) -> None:
    mark = _mark(env)
    result = ssh(config, "bastion")
    assert result.returncode == 255 and "Permission denied" in result.stderr, result.stderr
    rows = _rows(env, mark, want=lambda rows: any(e.type == "auth.failed" for e in rows))
    failed = [e for e in rows if e.type == "auth.failed"]
    assert len(failed) == 1, [(e.message, e.fields) for e in failed]
    assert re.search(r"plain public key, not a certificate", failed[0].message), failed
    assert failed[0].remote_addr == "127.0.0.1"
