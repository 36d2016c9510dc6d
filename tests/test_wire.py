"""dt-api wire messages: round trips, strict refusals, bounded framing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.protocol import wire
from bastion.protocol.errors import AccessDenied, ProtocolError

_TEXT = st.text(max_size=40)
_SCALARS = {
    int: st.integers(min_value=-(2**62), max_value=2**62),
    str: _TEXT,
    bool: st.booleans(),
    bytes: st.binary(max_size=64),
}


def _strategy(hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, __import__("types").UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return st.none() | _strategy(inner)
    if hint in _SCALARS:
        return _SCALARS[hint]
    if origin is list:
        (inner,) = typing.get_args(hint)
        if inner is dict or typing.get_origin(inner) is dict:
            return st.lists(st.dictionaries(_TEXT, _TEXT, max_size=3), max_size=3)
        return st.lists(_strategy(inner), max_size=4)
    if origin is dict or hint is dict:
        return st.dictionaries(_TEXT, _TEXT | st.integers(0, 99), max_size=4)
    raise AssertionError(hint)


def _message_strategy(cls):
    hints = typing.get_type_hints(cls)
    return st.builds(cls, **{f.name: _strategy(hints[f.name]) for f in dataclasses.fields(cls)})


ALL_MESSAGES = st.one_of([_message_strategy(cls) for cls in wire.REGISTRY.values()])


@settings(max_examples=300, deadline=None)
@given(ALL_MESSAGES)
def test_every_message_round_trips(msg):
    line = wire.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert wire.decode(line[:-1]) == msg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_protocol_error(data):
    try:
        wire.decode(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
        max_leaves=20,
    )
)
def test_random_json_only_raises_protocol_error(value):
    for body in (value, {"type": "hello", "version": value, "client": value}):
        try:
            wire.decode(json.dumps(body).encode())
        except ProtocolError:
            pass


def test_every_truncation_is_refused():
    line = wire.encode(wire.DeviceChallenge(nonce=b"\x01" * 32))[:-1]
    for cut in range(len(line)):
        with pytest.raises(ProtocolError):
            wire.decode(line[:cut])


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"type": "hello", "version": True, "client": "x"}, "integer"),
        ({"type": "hello", "version": 1.0, "client": "x"}, "integers"),
        ({"type": "hello", "version": 1, "client": 5}, "string"),
        ({"type": "hello", "version": 1}, "missing"),
        ({"type": "hello", "version": 1, "client": "x", "extra": 1}, "unknown field"),
        ({"type": "nope"}, "unknown message type"),
        ({"version": 1}, "unknown message type"),
        ({"type": "device_challenge", "nonce": "aGk"}, "base64"),  # unpadded
        ({"type": "device_challenge", "nonce": "aGk=\n"}, "base64"),
        ({"type": "nodes", "nodes": "x"}, "list"),
        ({"type": "hello", "version": 1, "client": "x" * (wire.MAX_STRING + 1)}, "too long"),
    ],
)
def test_strict_refusals_name_the_problem(body, why):
    with pytest.raises(ProtocolError, match=why):
        wire.decode(json.dumps(body).encode())


def test_nan_and_deep_nesting_refused():
    with pytest.raises(ProtocolError):
        wire.decode(b'{"type":"hello","version":NaN,"client":"x"}')
    deep = {"type": "enrolled", "device": {}}
    node = deep["device"]
    for _ in range(20):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(ProtocolError, match="nested"):
        wire.decode(json.dumps(deep).encode())


def test_oversized_messages_refused_both_ways():
    with pytest.raises(ProtocolError, match="larger"):
        wire.decode(b"x" * (wire.MAX_MESSAGE + 1))
    with pytest.raises(ProtocolError, match="larger"):
        wire.encode(wire.Nodes(nodes=[{"n": "x" * 10_000}] * (wire.MAX_MESSAGE // 10_000 + 1)))


def test_line_buffer_is_bounded():
    buf = wire.LineBuffer()
    assert buf.feed(b"a\nb") == [b"a"]
    assert buf.feed(b"c\n") == [b"bc"]
    with pytest.raises(ProtocolError):
        for _ in range(wire.MAX_MESSAGE // 4096 + 2):
            buf.feed(b"x" * 4096)


def test_errors_travel_as_their_class():
    msg = wire.error_from(AccessDenied("no"))
    with pytest.raises(AccessDenied, match="no"):
        wire.raise_if_error(wire.decode(wire.encode(msg)))


def test_line_reader_over_a_stream():
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(wire.encode(wire.Ok()) + wire.encode(wire.Whoami()) + b'{"type"')
        reader.feed_eof()
        lines = wire.LineReader(reader)
        assert isinstance(await wire.read_message(lines, 1), wire.Ok)
        assert isinstance(await wire.read_message(lines, 1), wire.Whoami)
        with pytest.raises(EOFError):
            await wire.read_message(lines, 1)

        endless = asyncio.StreamReader()
        endless.feed_data(b"x" * (wire.MAX_MESSAGE + 10))
        with pytest.raises(ProtocolError, match="larger"):
            await wire.read_message(wire.LineReader(endless), 1)

        silent = asyncio.StreamReader()
        with pytest.raises(ProtocolError, match="timed out"):
            await wire.read_message(wire.LineReader(silent), 0.05)

    asyncio.run(go())


# -- what issue 15 added: posture fields that older peers never see ---------------------------


def test_fields_at_their_default_stay_off_the_line():
    """An older peer refuses fields it does not know: a challenge that asks for no PCR
    selection and no event log is the line it always was."""
    line = wire.encode(wire.DeviceChallenge(nonce=b"\x01" * 32))
    assert set(json.loads(line)) == {"type", "nonce"}
    issued = wire.CertIssued(certificate="c", host_ca_keys=[], cluster="x", roles=[], logins=[])
    assert set(json.loads(wire.encode(issued))) == {
        "type", "certificate", "host_ca_keys", "cluster", "roles", "logins"
    }  # fmt: skip
    asked = wire.DeviceChallenge(nonce=b"n", pcr_select=[0, 7], event_log=True)
    assert json.loads(wire.encode(asked))["pcr_select"] == [0, 7]
    assert wire.decode(wire.encode(asked)) == asked


def test_a_boot_event_log_may_fill_the_message_but_text_may_not():
    log = bytes(range(256)) * 200  # 51 KB: its base64 is over MAX_STRING
    msg = wire.EnrollFinish(
        secret=b"s", attest=b"a", signature=b"g", pcr_select=[0], pcr_values=[b"\0" * 32],
        event_log=log,
    )  # fmt: skip
    assert wire.decode(wire.encode(msg)).event_log == log
    body = json.loads(wire.encode(msg))
    body["event_log_error"] = "x" * (wire.MAX_STRING + 1)
    with pytest.raises(ProtocolError, match="too long"):
        wire.decode(json.dumps(body).encode())
    with pytest.raises(ProtocolError, match="larger"):
        wire.encode(dataclasses.replace(msg, event_log=b"\0" * wire.MAX_MESSAGE))


def test_the_event_log_travels_compressed_and_inflates_bounded():
    import zlib

    from bastion.protocol.errors import EventLogMalformed
    from bastion.protocol.eventlog import MAX_LOG_SIZE, compress_log, decompress_log

    log = b"\x00" * 1000 + bytes(range(256)) * 10
    packed = compress_log(log)
    assert len(packed) < len(log) and decompress_log(packed) == log
    bomb = zlib.compress(b"\x00" * (MAX_LOG_SIZE + 1), 9)  # ~4 KiB that inflate to 4 MiB+
    for data, why in (
        (bomb, "inflates to more than"),
        (packed[:-3], "cut short"),
        (packed + b"x", "trailing bytes"),
        (b"not zlib", "not zlib-compressed"),
    ):
        with pytest.raises(EventLogMalformed, match=why):
            decompress_log(data)
    with pytest.raises(EventLogMalformed):
        compress_log(b"\x00" * (MAX_LOG_SIZE + 1))


def test_a_real_boot_log_with_its_quote_fits_one_message():
    from pathlib import Path

    from bastion.protocol.eventlog import compress_log

    shipped = Path(__file__).resolve().parents[2] / "shared" / "eventlogs"
    biggest = max((p.read_bytes() for p in shipped.glob("*.bin")), key=len)
    answer = wire.DeviceResponse(
        asset_tag="SN1", credential_id="c" * 36, attest=b"a" * 200, signature=b"s" * 80,
        pcr_select=list(range(24)), pcr_values=[b"\0" * 32] * 24,
        event_log=compress_log(biggest),
    )  # fmt: skip
    line = wire.encode(answer)
    assert len(line) < 0.9 * len(biggest) + 4096  # what the MAX_MESSAGE comment counts on
    assert wire.decode(line).event_log == answer.event_log
