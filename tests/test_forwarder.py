"""The bastion's forwarder pair, driven directly: nothing the node sends before the
client's channel exists may be lost (checklist #28 found the banner going missing)."""

from __future__ import annotations

from bastion.authz.records import Node
from bastion.proxy import policy
from bastion.proxy.sessions import CountingForwarder, LiveSession


class FakeTransport:
    """Records what a forwarder writes, in order, as an SSH channel or socket would."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.events.append(data)

    def write_eof(self) -> None:
        self.events.append("eof")

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


class Registry:
    def __init__(self) -> None:
        self.ended: list[LiveSession] = []

    def end(self, session: LiveSession) -> None:
        self.ended.append(session)


def pair(early: bytes = b"", eof: bool = False, lost: bool = False):
    registry = Registry()
    live = LiveSession(
        policy.Identity("alice", 1, "alice-1"),
        Node("node-1", "127.0.0.1", 22, {}),
        None,
        lambda: None,
    )
    node_side = CountingForwarder(registry, live, upstream=False)  # type: ignore[arg-type]
    node_sock = FakeTransport()
    node_side.connection_made(node_sock)  # type: ignore[arg-type]
    if early:
        node_side.data_received(early)  # the node speaks before the pairing
    if eof:
        node_side.eof_received()
    if lost:
        node_side.connection_lost(None)
    client_side = CountingForwarder(registry, live, upstream=True, peer=node_side)  # type: ignore[arg-type]
    return registry, live, node_side, node_sock, client_side


def test_bytes_before_and_after_pairing_arrive_in_order_once_the_channel_opens():
    _, live, node_side, _, client_side = pair(b"SSH-2.0-OpenSSH_9.2\r\n")
    node_side.data_received(b"more, still before the channel")  # paired, no channel yet
    channel = FakeTransport()
    client_side.connection_made(channel)  # type: ignore[arg-type]
    node_side.data_received(b"after")
    assert channel.events == [b"SSH-2.0-OpenSSH_9.2\r\nmore, still before the channel", b"after"]
    assert (
        live.bytes_down
        == len(b"SSH-2.0-OpenSSH_9.2\r\n") + len(b"more, still before the channel") + 5
    )


def test_an_early_eof_is_delivered_after_the_early_bytes():
    _, _, _, _, client_side = pair(b"bye\r\n", eof=True)
    channel = FakeTransport()
    client_side.connection_made(channel)  # type: ignore[arg-type]
    assert channel.events == [b"bye\r\n", "eof"]
    assert not channel.closed


def test_a_node_that_hung_up_early_closes_the_channel_after_its_last_words():
    registry, live, _, node_sock, client_side = pair(b"Exceeded MaxStartups\r\n", lost=True)
    channel = FakeTransport()
    client_side.connection_made(channel)  # type: ignore[arg-type]
    assert channel.events == [b"Exceeded MaxStartups\r\n"]
    assert channel.closed and node_sock.closed
    client_side.connection_lost(None)  # the channel's close comes back
    assert registry.ended == [live]


def test_a_node_that_hangs_up_between_pairing_and_the_channel_still_closes_it():
    _, _, node_side, _, client_side = pair(b"banner\r\n")
    node_side.connection_lost(None)
    channel = FakeTransport()
    client_side.connection_made(channel)  # type: ignore[arg-type]
    assert channel.events == [b"banner\r\n"] and channel.closed
