"""The node's clear-text side of the SSH key exchange, as the bastion relays it.

The bastion forwards ``ssh -J`` as plain TCP and the client checks the node's host
key end to end. One thing the bastion refuses itself (checklist #3): a node whose
host key is a *user* certificate, so the refusal has its reason in the audit log and a
client that skips host key checks is not let through. Before NEWKEYS packets are
neither encrypted nor MACed (RFC 4253 section 6), so the key can be read on the way.
The scanner is pure; :func:`watch` hooks it onto a forwarder for the first packets only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

MSG_NEWKEYS, MSG_KEX_REPLY, MSG_KEX_DH_GEX_REPLY = 21, 31, 33  # RFC 4253, 4419, 5656
WATCH_LIMIT = 64 * 1024
WATCH_READS = 256


def watch(node_side: Any, refuse: Callable[[bytes], bool]) -> None:
    """Read what the node sends until its NEWKEYS; when its host key is a certificate,
    ask ``refuse(key_blob)`` and, if it says so, end the session after that packet.

    The packet that carries the key is still delivered, so a client that checks names
    the problem itself; nothing after it is. Watching stops at NEWKEYS, after 64 KiB
    or 256 reads, or at framing it does not understand; the bulk path then gets the
    forwarder's plain method back.
    """
    seen = bytearray()
    reads = 0
    forward = node_side.data_received

    def data_received(data: bytes, datatype: Any = None) -> None:
        nonlocal reads
        seen.extend(data)
        reads += 1  # bounds the rescans too: a node dribbling bytes costs little
        state, blob, end = scan(bytes(seen))
        if state == "more" and len(seen) < WATCH_LIMIT and reads < WATCH_READS:
            forward(data, datatype)
            return
        del node_side.data_received
        if state != "cert" or not refuse(blob):
            forward(data, datatype)
            return
        forward(data[: end - (len(seen) - len(data))], datatype)
        node_side.close()

    node_side.data_received = data_received


def scan(data: bytes) -> tuple[str, bytes, int]:
    """Where a node's clear-text handshake stands, from the first byte it sent.

    ``("more", b"", 0)`` until the packet carrying its host key (K_S, the first field of
    the KEX reply) has arrived; ``("cert", key_blob, end)`` when that key is an OpenSSH
    certificate, ``end`` being the offset just past its packet; ``("done", b"", 0)`` when
    there is nothing (more) to look at: a plain host key, the node's NEWKEYS, or framing
    this does not understand (it stops rather than guess). Before NEWKEYS packets are
    neither encrypted nor MACed (RFC 4253 section 6).
    """
    pos = 0
    while True:  # lines before the version string are allowed (RFC 4253 section 4.2)
        eol = data.find(b"\n", pos)
        if eol < 0:
            return "more", b"", 0
        line, pos = data[pos:eol], eol + 1
        if line.startswith(b"SSH-"):
            break
    while len(data) - pos >= 5:
        length, padding = struct.unpack_from(">IB", data, pos)
        if not 5 <= length <= 35000 or padding + 1 >= length:
            return "done", b"", 0
        end = pos + 4 + length
        if end > len(data):
            return "more", b"", 0
        payload = data[pos + 5 : end - padding]
        pos = end
        if payload[0] == MSG_NEWKEYS:
            return "done", b"", 0
        if payload[0] in (MSG_KEX_REPLY, MSG_KEX_DH_GEX_REPLY):
            # (in DH group exchange, 31 is the group: its first field names no algorithm)
            key = _ssh_string(payload, 1)
            name = _ssh_string(key, 0) if key is not None else None
            if key is not None and name is not None and name.endswith(b"-cert-v01@openssh.com"):
                return "cert", key, end
    return "more", b"", 0


def _ssh_string(data: bytes, pos: int) -> bytes | None:
    if len(data) - pos < 4:
        return None
    (n,) = struct.unpack_from(">I", data, pos)
    return data[pos + 4 : pos + 4 + n] if len(data) - pos - 4 >= n else None
