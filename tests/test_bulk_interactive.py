"""Checklist #31: a bulk transfer beside an interactive session; keystrokes stay responsive.

Through the real `dt-bastion serve` and a real sshd node, two separate `ssh -J`
processes share the bastion: one moves 256 MiB (node to client, or client to node),
the other runs `cat` on the node while this test types a numbered line every few
milliseconds and reads each echo. Every keystroke must come back, in order, and
several must come back while the bulk transfer still has bytes outstanding. That is
an ordering fact, counted in bytes, never a duration: timeouts here are only bounds
against hanging, not assertions.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from bastion.authz.records import User
from tests.sshd import LOGIN, user_client

pytestmark = pytest.mark.integration

SIZE = 256 * 1024 * 1024
CHUNK = 256 * 1024
KEY_INTERVAL = 0.005  # a keystroke every 5 ms
DURING_NEEDED = 5  # echoes that must return while bulk bytes are still outstanding
AFTER = 3  # keystrokes typed after the bulk transfer ended
MAX_KEYS = 20_000  # bound: the test stops typing after this many
BOUND = 90.0  # seconds: whole-test bound against hanging; never an assertion on speed

_users = itertools.count()


async def _ssh(config, *cmd: str, stdin=asyncio.subprocess.PIPE):
    return await asyncio.create_subprocess_exec(
        "ssh",
        "-F",
        str(config),
        "-T",
        f"{LOGIN}@node-1",
        *cmd,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


class Bulk:
    """One ssh moving SIZE bytes, counting them as they go."""

    def __init__(self, direction: str) -> None:
        self.direction = direction
        self.moved = 0  # bytes read from ssh (down) or written into ssh (up) so far
        self.proc: asyncio.subprocess.Process | None = None
        self.remote_count: int | None = None

    @property
    def in_flight(self) -> bool:
        """Some bytes have moved and some have not: strictly during the transfer."""
        return 0 < self.moved < SIZE

    async def run(self, config) -> None:
        if self.direction == "down":
            self.proc = await _ssh(config, "head", "-c", str(SIZE), "/dev/zero")
            assert self.proc.stdout is not None
            while chunk := await self.proc.stdout.read(CHUNK):
                self.moved += len(chunk)
            stdout = b""
        else:
            self.proc = await _ssh(config, "wc", "-c")
            assert self.proc.stdin is not None and self.proc.stdout is not None
            block = bytes(CHUNK)
            while self.moved < SIZE:
                self.proc.stdin.write(block)
                await self.proc.stdin.drain()
                self.moved += len(block)
            self.proc.stdin.close()
            stdout = await self.proc.stdout.read()
        assert self.proc.stderr is not None
        err = await self.proc.stderr.read()
        rc = await self.proc.wait()
        assert rc == 0, err.decode(errors="replace")[-500:]
        assert self.moved == SIZE, f"bulk moved {self.moved} of {SIZE} bytes"
        if self.direction == "up":
            self.remote_count = int(stdout.split()[0])


async def _scenario(config, direction: str) -> dict:
    typist = await _ssh(config, "cat")
    assert typist.stdin is not None and typist.stdout is not None
    # the interactive session works before the bulk one starts
    typist.stdin.write(b"hello\n")
    await typist.stdin.drain()
    assert await asyncio.wait_for(typist.stdout.readline(), 30) == b"hello\n"

    bulk = Bulk(direction)
    bulk_task = asyncio.create_task(bulk.run(config))
    while not bulk.moved:
        if bulk_task.done():
            bulk_task.result()  # raises what went wrong
            raise AssertionError("the bulk transfer ended without moving a byte")
        await asyncio.sleep(0.01)

    sent: list[bytes] = []
    echoes: list[bytes] = []
    during = 0  # echoes received while bulk bytes were still outstanding

    async def type_keys() -> None:
        after = 0
        for i in range(MAX_KEYS):
            if bulk_task.done():
                after += 1
                if after > AFTER:
                    break
            line = b"key-%06d\n" % i
            sent.append(line)
            typist.stdin.write(line)
            await typist.stdin.drain()
            await asyncio.sleep(KEY_INTERVAL)
        typist.stdin.close()

    async def read_echoes() -> None:
        nonlocal during
        while line := await typist.stdout.readline():
            echoes.append(line)
            if bulk.in_flight:
                during += 1

    typer = asyncio.create_task(type_keys())
    reader = asyncio.create_task(read_echoes())
    await bulk_task
    await typer
    await reader  # EOF once cat has echoed everything and exited
    err = await typist.stderr.read()
    assert await typist.wait() == 0, err.decode(errors="replace")[-500:]
    return {"sent": sent, "echoes": echoes, "during": during, "bulk": bulk}


@pytest.mark.parametrize("direction", ["down", "up"])
def test_keystrokes_echo_in_order_during_a_bulk_transfer(
    dt_cluster, dt_node, dt_bastion, tmp_path, direction
):
    name = f"typist{next(_users)}"
    dt_cluster.store.add_user(User(name, ("access",), (LOGIN,)))
    config = user_client(dt_cluster, tmp_path / name, name, bastion_port=dt_bastion.port)

    result = asyncio.run(asyncio.wait_for(_scenario(config, direction), BOUND))

    bulk = result["bulk"]
    assert bulk.moved == SIZE
    if direction == "up":
        assert bulk.remote_count == SIZE  # the node received every byte
    # every keystroke came back, each exactly once, in the order typed
    assert result["echoes"] == result["sent"], (len(result["echoes"]), len(result["sent"]))
    # the interactive session was served while the bulk one still had bytes to move
    assert result["during"] >= DURING_NEEDED, (
        f"only {result['during']} of {len(result['sent'])} keystrokes echoed while "
        f"the {SIZE >> 20} MiB transfer ({direction}) was in flight: the bulk session "
        "starves the interactive one"
    )
    assert dt_bastion.proc.poll() is None, dt_bastion.log()[-2000:]
    # both sessions were forwarded by the bastion and ended cleanly
    starts = [e for e in dt_cluster.store.list_audit(type="session.start") if e.user == name]
    assert len(starts) == 2
