"""The node's clear-text side of the SSH key exchange, as the bastion relays it.

The bastion forwards ``ssh -J`` as plain TCP and the client checks the node's host
key end to end. One thing the bastion refuses itself (checklist #3): a node whose
host key is a *user* certificate, so the refusal has its reason in the audit log and a
client that skips host key checks is not let through. Before NEWKEYS packets are
neither encrypted nor MACed (RFC 4253 section 6), so the key can be read on the way.
The scanner is pure; :func:`watch` hooks it onto a forwarder until NEWKEYS.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from typing import Any

MSG_NEWKEYS, MSG_KEX_REPLY, MSG_KEX_DH_GEX_REPLY = 21, 31, 33  # RFC 4253, 4419, 5656
PACKET_MAX = 256 * 1024  # OpenSSH's own limit on one packet
WATCH_LIMIT = 512 * 1024  # a real handshake up to NEWKEYS is a few KiB


def watch(
    node_side: Any, refuse: Callable[[bytes], bool], unreadable: Callable[[str], None]
) -> None:
    """Read what the node sends until its NEWKEYS; when its host key is a certificate,
    ask ``refuse(key_blob)`` and, if it says so, end the session after that packet.

    The packet that carries the key is still delivered, so a client that checks names
    the problem itself; nothing after it is. A handshake this cannot follow (broken
    framing, or no NEWKEYS within 512 KiB) is not waved through: ``unreadable(why)`` is
    told and the session ends, or a hostile node could pad its way past the check. Once
    NEWKEYS is seen the forwarder gets its plain method back.
    """
    scanner = Scanner()
    forward = node_side.data_received
    # Decided once: None while watching, then True (pass everything) or False (the
    # session is over). An event loop that keeps the method it was given (uvloop
    # caches ``protocol.data_received``) goes on calling this wrapper after the
    # plain method is back on the forwarder, so it must answer for itself.
    verdict: bool | None = None

    def data_received(data: bytes, datatype: Any = None) -> None:
        nonlocal verdict
        if verdict is not None:
            if verdict:
                forward(data, datatype)
            return
        state, blob, end = scanner.feed(data)
        if state == "more":
            forward(data, datatype)
            return
        verdict = state == "done" or (state == "cert" and not refuse(blob))
        with contextlib.suppress(AttributeError):
            del node_side.data_received
        if verdict:
            forward(data, datatype)
            return
        if state == "cert":
            forward(data[: end - (scanner.fed - len(data))], datatype)
        else:
            unreadable(blob.decode())
        node_side.close()

    node_side.data_received = data_received


class Scanner:
    """Where a node's clear-text handshake stands, fed as it arrives; each byte is
    parsed once. ``feed`` returns:

    * ``("more", b"", 0)`` until the packet carrying the host key (K_S, the first field
      of the KEX reply) has arrived, and after a plain host key until NEWKEYS;
    * ``("cert", key_blob, end)`` when that key is an OpenSSH certificate, ``end`` being
      the stream offset just past its packet;
    * ``("done", b"", 0)`` at the node's NEWKEYS: from there on it is encrypted;
    * ``("bad", reason, 0)`` for framing this does not follow, or no NEWKEYS within
      ``WATCH_LIMIT``.

    Before NEWKEYS packets are neither encrypted nor MACed (RFC 4253 section 6).
    """

    def __init__(self) -> None:
        self._buf = bytearray()  # not yet parsed
        self._versioned = False
        self.fed = 0  # bytes fed in all

    def feed(self, data: bytes) -> tuple[str, bytes, int]:
        self._buf += data
        self.fed += len(data)
        result = self._parse()
        if result[0] == "more" and self.fed > WATCH_LIMIT:
            return "bad", f"no key exchange within {WATCH_LIMIT // 1024} KiB".encode(), 0
        return result

    def _parse(self) -> tuple[str, bytes, int]:
        buf = self._buf
        while not self._versioned:  # lines may precede the version (RFC 4253 section 4.2)
            eol = buf.find(b"\n")
            if eol < 0:
                return "more", b"", 0
            self._versioned = buf[:eol].startswith(b"SSH-")
            del buf[: eol + 1]
        while len(buf) >= 5:
            length, padding = struct.unpack_from(">IB", buf, 0)
            if not 5 <= length <= PACKET_MAX or padding + 1 >= length:
                return "bad", f"a packet framed as {length} bytes".encode(), 0
            if len(buf) < 4 + length:
                return "more", b"", 0
            payload = bytes(buf[5 : 4 + length - padding])
            del buf[: 4 + length]
            if payload[0] == MSG_NEWKEYS:
                return "done", b"", 0
            if payload[0] in (MSG_KEX_REPLY, MSG_KEX_DH_GEX_REPLY):
                # (in DH group exchange, 31 is the group: its first field names no algorithm)
                key = _ssh_string(payload, 1)
                name = _ssh_string(key, 0) if key is not None else None
                if key is not None and name is not None and name.endswith(b"-cert-v01@openssh.com"):
                    return "cert", key, self.fed - len(buf)
        return "more", b"", 0


def scan(data: bytes) -> tuple[str, bytes, int]:
    """The state of a handshake given all at once (for tests and callers without a stream)."""
    return Scanner().feed(data)


def _ssh_string(data: bytes, pos: int) -> bytes | None:
    if len(data) - pos < 4:
        return None
    (n,) = struct.unpack_from(">I", data, pos)
    return data[pos + 4 : pos + 4 + n] if len(data) - pos - 4 >= n else None
