"""Client-chosen text on dt-api, through the real bastion: refused clearly, audited, and
the SSH connection goes on (issue 12, "Input")."""

from __future__ import annotations

import asyncio
import json
import time

import asyncssh
import pytest

from bastion.authz.records import Node, User
from tests.sshd import LOGIN, bastion_server, sshd_node, user_client

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from bastion.cluster import init_cluster

    tmp = tmp_path_factory.mktemp("dtapi-input")
    cluster = init_cluster(tmp / "state", "input")
    with sshd_node(tmp / "node", cluster) as node, bastion_server(tmp / "state") as bastion:
        cluster.store.add_node(Node("node-1", "127.0.0.1", node.port))
        cluster.store.add_user(User("alice", ("access",), (LOGIN,)))
        user_client(cluster, tmp / "alice", "alice", bastion_port=bastion.port)
        yield type("Env", (), {"tmp": tmp, "cluster": cluster, "bastion": bastion})
    cluster.close()


async def _exchange(conn, lines):
    """Open one dt-api channel, send ``lines`` after a hello, return every answer."""
    writer, reader, _ = await conn.open_session(subsystem="dt-api", encoding=None)
    hello = {"type": "hello", "version": 1, "client": "test"}
    writer.write(json.dumps(hello).encode() + b"\n")
    answers = [json.loads(await asyncio.wait_for(reader.readline(), 10))]
    for line in lines:
        writer.write(line + b"\n")
        answers.append(json.loads(await asyncio.wait_for(reader.readline(), 10)))
    writer.close()
    return answers


@pytest.mark.parametrize("field", ["public_key", "key"])
def test_a_lone_surrogate_is_answered_and_audited_and_the_connection_lives(env, field):
    """JSON's \\ud800 escape used to drop the whole SSH connection, unanswered."""
    d = env.tmp / "alice"
    key = asyncssh.read_private_key(str(d / "id"))
    cert = asyncssh.read_certificate(str(d / "id-cert.pub"))
    bad = (
        b'{"type":"cert_request","public_key":"\\ud800"}'
        if field == "public_key"
        else b'{"type":"whoami","\\udfff":1}'
    )
    mark = max([e.id for e in env.cluster.store.list_audit()] or [0])

    async def scenario():
        async with asyncssh.connect(
            "127.0.0.1",
            env.bastion.port,
            username="alice",
            client_keys=[(key, cert)],
            known_hosts=None,
        ) as conn:
            first = await _exchange(conn, [bad])
            # the same SSH connection still serves a second channel
            second = await _exchange(conn, [b'{"type":"whoami"}'])
            return first, second

    first, second = asyncio.run(scenario())
    assert first[1]["type"] == "error" and "surrogate" in first[1]["message"]
    assert second[1]["type"] == "identity" and second[1]["user"] == "alice"
    deadline = time.monotonic() + 10  # the bastion writes audit rows off its event loop
    while True:
        rows = [e for e in env.cluster.store.list_audit(type="api.failed") if e.id > mark]
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert rows and "surrogate" in rows[-1].message and rows[-1].user == "alice"
