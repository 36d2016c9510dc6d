"""TCP_QUICKACK on the SSH front until a client has authenticated (see below)."""

from __future__ import annotations

import socket
from typing import Any

import asyncssh


def until_authenticated(conn: asyncssh.SSHServerConnection) -> None:
    """Acknowledge every handshake segment at once instead of after Linux's 40 ms
    delayed-ACK timer.

    OpenSSH's client leaves Nagle's algorithm on until it has authenticated, so each
    time it writes two small packets in a row (KEX init after KEXINIT, service request
    after NEWKEYS) the second waits for our ACK of the first; we answer neither (it is
    not our turn), so the kernel holds the ACK back and the handshake stalls twice
    for ~40 ms. TCP_QUICKACK, set as each segment is read, sends that ACK now. After
    authentication the client sets TCP_NODELAY itself, so this stops there.
    """
    sock = conn.get_extra_info("socket")
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if sock is None or quickack is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    original = conn.data_received

    def data_received(data: bytes, datatype: Any = None) -> None:
        if conn.get_extra_info("username") is None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            except OSError:
                pass
        else:
            del conn.data_received  # authenticated: the bulk path gets the plain method
        original(data, datatype)

    conn.data_received = data_received  # type: ignore[method-assign]
