"""PROXY protocol parsing: both versions, and every malformed or truncated header."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.protocol.errors import ProtocolError
from bastion.proxy import proxyproto as pp

SRC, DST = ("203.0.113.7", 51000), ("10.0.0.5", 3022)
SRC6, DST6 = ("2001:db8::7", 51000), ("2001:db8::5", 3022)


@pytest.mark.parametrize("build", [pp.build_v1, pp.build_v2])
@pytest.mark.parametrize(("src", "dst"), [(SRC, DST), (SRC6, DST6)])
def test_round_trip(build, src, dst):
    header = build(src, dst)
    parsed = pp.parse(header + b"SSH-2.0-OpenSSH_9.2\r\n")
    assert parsed.source == src and parsed.destination == dst
    assert parsed.length == len(header)


def test_v1_unknown_and_v2_local_keep_the_socket_address():
    assert pp.parse(b"PROXY UNKNOWN\r\n").source is None
    local = pp.V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])
    assert pp.parse(local) == pp.ProxyHeader(16, None, None)


@pytest.mark.parametrize(
    "bad",
    [
        b"SSH-2.0-OpenSSH\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2",  # no CRLF
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY " + b"A" * 200 + b"\r\n",
        pp.V2_SIGNATURE + bytes([0x31, 0x11, 0, 12]) + bytes(12),
        pp.V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12),
        pp.V2_SIGNATURE + bytes([0x21, 0x31, 0, 0]),
        pp.V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]) + bytes(100),
    ],
)
def test_malformed_headers_are_refused(bad):
    with pytest.raises(ProtocolError):
        pp.parse(bad)


@pytest.mark.parametrize("build", [pp.build_v1, pp.build_v2])
def test_every_truncation_is_refused_or_asks_for_more(build):
    header = build(SRC, DST)
    for cut in range(len(header)):
        prefix = header[:cut]
        if pp.needed(prefix):
            continue
        with pytest.raises(ProtocolError):
            pp.parse(prefix)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data):
    try:
        pp.parse(data)
    except ProtocolError:
        pass
    pp.needed(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60))
def test_random_v2_payloads_never_crash(tail):
    try:
        pp.parse(pp.V2_SIGNATURE + tail)
    except ProtocolError:
        pass
