"""PROXY protocol v1 and v2 headers (haproxy's spec), parsed without I/O.

A load balancer in front of the bastion hides the client's address; with the PROXY
protocol it states it in a header before the SSH banner. The header is believed only
from configured load-balancer addresses (the caller's check): from anyone else it
would let a client forge the address that audit events and source checks see.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from bastion.protocol.errors import ProtocolError

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's bound, CRLF included
V2_MAX_PAYLOAD = 4096  # generous for TLVs; the spec allows 64 KiB but nothing sends that


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """``source`` is None for LOCAL / UNKNOWN headers: keep the socket's own address."""

    length: int  # bytes of the stream the header took
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def needed(data: bytes) -> int:
    """How many bytes must be buffered before ``parse`` can decide (0: enough)."""
    if len(data) < 16:
        if V2_SIGNATURE.startswith(data[:12]) or V1_PREFIX.startswith(data[:6]):
            return 16 - len(data)
        return 0
    if data.startswith(V2_SIGNATURE):
        (length,) = struct.unpack("!H", data[14:16])
        return max(0, 16 + length - len(data))
    if data.startswith(V1_PREFIX) and b"\r\n" not in data[:V1_MAX]:
        return 1 if len(data) < V1_MAX else 0
    return 0


def parse(data: bytes) -> ProxyHeader:
    """Parse the header at the start of ``data``; anything malformed is refused."""
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    raise ProtocolError("PROXY protocol header expected from this load balancer")


def _parse_v1(data: bytes) -> ProxyHeader:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        raise ProtocolError("PROXY v1 header is too long or not terminated")
    try:
        fields = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProtocolError("PROXY v1 header is not ASCII") from None
    if fields[1:2] == ["UNKNOWN"]:
        return ProxyHeader(end + 2, None, None)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProtocolError("PROXY v1 header is malformed")
    version = 4 if fields[1] == "TCP4" else 6
    src = _address(fields[2], fields[4], version)
    dst = _address(fields[3], fields[5], version)
    return ProxyHeader(end + 2, src, dst)


def _address(host: str, port: str, version: int) -> tuple[str, int]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ProtocolError(f"PROXY header has a bad address {host!r}") from None
    if ip.version != version:
        raise ProtocolError("PROXY header address family does not match")
    if not port.isdigit() or (len(port) > 1 and port[0] == "0") or not 0 <= int(port) < 65536:
        raise ProtocolError(f"PROXY header has a bad port {port!r}")
    return str(ip), int(port)


def _parse_v2(data: bytes) -> ProxyHeader:
    if len(data) < 16:
        raise ProtocolError("PROXY v2 header is truncated")
    ver_cmd, family, length = struct.unpack("!BBH", data[12:16])
    if ver_cmd >> 4 != 2:
        raise ProtocolError("PROXY v2 header has an unknown version")
    if length > V2_MAX_PAYLOAD:
        raise ProtocolError("PROXY v2 header is too long")
    if len(data) < 16 + length:
        raise ProtocolError("PROXY v2 header is truncated")
    payload = data[16 : 16 + length]
    command = ver_cmd & 0x0F
    if command == 0:  # LOCAL: a health check from the balancer itself
        return ProxyHeader(16 + length, None, None)
    if command != 1:
        raise ProtocolError("PROXY v2 header has an unknown command")
    if family == 0x11:  # TCP over IPv4
        if length < 12:
            raise ProtocolError("PROXY v2 IPv4 addresses are truncated")
        src, dst = payload[0:4], payload[4:8]
        sport, dport = struct.unpack("!HH", payload[8:12])
    elif family == 0x21:  # TCP over IPv6
        if length < 36:
            raise ProtocolError("PROXY v2 IPv6 addresses are truncated")
        src, dst = payload[0:16], payload[16:32]
        sport, dport = struct.unpack("!HH", payload[32:36])
    elif family == 0x00:  # UNSPEC
        return ProxyHeader(16 + length, None, None)
    else:
        raise ProtocolError("PROXY v2 header has an unsupported address family")
    return ProxyHeader(
        16 + length,
        (str(ipaddress.ip_address(src)), sport),
        (str(ipaddress.ip_address(dst)), dport),
    )


def build_v1(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """What a load balancer sends; used by tests and benchmarks."""
    family = "TCP6" if ":" in src[0] else "TCP4"
    return f"PROXY {family} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()


def build_v2(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    family = 0x11 if s.version == 4 else 0x21
    payload = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(payload)) + payload
