"""A connection the flood limits refuse as it arrives, told why before any key exchange.

``BastionServer.connection_made`` decides admission (:mod:`bastion.authz.limits`) before
asyncssh has sent its version line. A disconnect sent from there came ahead of that
line, and OpenSSH's ``ssh`` printed "banner line contains invalid characters", never
the reason. Lines ahead of the version line (RFC 4253 4.2) are no way to say it: ssh 9.2
shows them only with -v. A key exchange first (as the blind refusal in ``begin_auth``)
would let ssh print it too, but would cost the bastion a key agreement per connection
of a flood.

So :func:`refuse_before_kex` takes the socket from asyncssh and answers alone: the
version line and an SSH_MSG_DISCONNECT in the clear (before any key exchange a binary
packet has no cipher and no MAC, RFC 4253 6), which ssh prints: "Received disconnect
from HOST port PORT:12: <reason>". Then end of file. What the client sends (its version
line and KEXINIT) is read and dropped unparsed, and the socket closed once the client
hangs up: closed at once with that unread, the connection is reset, and the reset can
overtake the reason ("Connection reset by peer", 2 times in 6 on loopback). A client
that does not hang up is cut after ``LINGER`` seconds or ``MAX_READ`` bytes; beyond
``MAX_LINGERING`` such sockets at once (a flood) a refusal is closed at once.

A refused connection never took a connection slot, so it holds none.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncssh
from asyncssh.constants import DEFAULT_LANG, MSG_DISCONNECT
from asyncssh.packet import Byte, String, UInt32

LINGER = 2.0
MAX_READ = 16 * 1024
MAX_LINGERING = 1024

_lingering: set[_Refused] = set()


def disconnect_packet(code: int, reason: str) -> bytes:
    """SSH_MSG_DISCONNECT as the binary packet of a connection without keys yet."""
    payload = Byte(MSG_DISCONNECT) + UInt32(code) + String(reason) + String(DEFAULT_LANG)
    padding = -(5 + len(payload)) % 8
    if padding < 4:
        padding += 8
    return UInt32(1 + len(payload) + padding) + Byte(padding) + payload + os.urandom(padding)


def refuse_before_kex(
    conn: asyncssh.SSHServerConnection, version: str, code: int, reason: str
) -> None:
    """Answer ``conn`` with ``version`` and a disconnect, from inside its owner's
    ``connection_made`` (asyncssh has sent nothing yet), and take it from asyncssh."""
    transport = conn._transport
    assert transport is not None  # set before asyncssh calls connection_made
    conn._transport = None  # asyncssh sends nothing more, not even its version line
    loop = asyncio.get_running_loop()
    loop.call_soon(conn._cleanup, None)  # its login timer, and the owner's connection_lost
    refused = _Refused(transport)
    transport.set_protocol(refused)
    transport.write(f"SSH-2.0-{version}\r\n".encode() + disconnect_packet(code, reason))
    if len(_lingering) >= MAX_LINGERING:
        transport.close()  # what was written still goes out
        return
    _lingering.add(refused)
    transport.write_eof()
    refused.timer = loop.call_later(LINGER, transport.abort)


class _Refused(asyncio.Protocol):
    """The connection :func:`refuse_before_kex` took: read and dropped until end of file."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.timer: asyncio.TimerHandle | None = None
        self.read = 0

    def data_received(self, data: bytes) -> None:
        self.read += len(data)
        if self.read > MAX_READ:
            self.transport.abort()

    def eof_received(self) -> Any:
        return False  # the transport closes: our end was shut already

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        _lingering.discard(self)
