"""dt-api wire messages, shared by bastion and client: JSON lines, strictly decoded.

Each message is a frozen dataclass registered under its ``type``. ``encode`` gives
one compact line; ``decode`` refuses anything that is not exactly a known message:
non-UTF-8, non-JSON, unknown types or fields, missing fields, wrong types (a bool is
not an int; no floats; NaN refused), over-long strings, deep nesting, lines over
1 MiB. Bytes travel as standard base64, one encoding only. Every refusal is a
:class:`ProtocolError` with a message for people — never another exception.

A field at its default is left out of the line: an older peer, which refuses fields
it does not know, then reads a message of this version as long as it uses nothing
new (a bastion with no posture policy asks no PCR selection or event log).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, Union

from bastion.protocol.errors import DTError, ProtocolError, from_code

PROTOCOL_VERSION = 1
# One line. A device's answer carries its boot event log, zlib-compressed, in base64:
# the real firmware logs the tests replay are 14-38 KB and keep ~64% of their size in
# zlib (digests do not compress), and base64 adds a third, so such a log costs ~0.85 of
# its size on the line, and 1 MiB carries a log of ~1.2 MB: room for laptops whose
# logs measure many Secure Boot certificates. Held at most once per dt-api channel,
# which only an authenticated connection opens.
MAX_MESSAGE = 1024 * 1024
MAX_STRING = 16 * 1024  # a text field; a bytes field (base64) may fill the message
MAX_DEPTH = 6
MAX_ITEMS = 256

T = TypeVar("T")
REGISTRY: dict[str, type] = {}
_TYPE_NAMES: dict[type, str] = {}


# Why the bastion refused a login whose caller proved it (a locked account after the
# right password and code, a used or expired signup token): a keyboard-interactive
# round with no prompts, the message as its instructions (OpenSSH prints them too) and
# ``dt-error:<code>`` as its language tag, which dtclient turns back into the error.
REFUSAL_TAG = "dt-error:"


@typing.dataclass_transform(frozen_default=True)
def message(name: str) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as the wire message ``name``.

    Marked ``dataclass_transform`` so that type checkers see each message's fields
    (constructor arguments, attribute types) as they see a plain dataclass's."""

    def register(cls: type[T]) -> type[T]:
        cls = dataclasses.dataclass(frozen=True, slots=True)(cls)
        if name in REGISTRY:
            raise TypeError(f"dt-api message {name!r} registered twice")
        REGISTRY[name] = cls
        _TYPE_NAMES[cls] = name
        return cls

    return register


def type_name(msg: Any) -> str:
    return _TYPE_NAMES.get(type(msg), type(msg).__name__)


# -- encoding -----------------------------------------------------------------------------


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def encode(msg: Any) -> bytes:
    name = _TYPE_NAMES.get(type(msg))
    if name is None:
        raise TypeError(f"{type(msg).__name__} is not a dt-api message")
    body = {
        f.name: _to_json(getattr(msg, f.name))
        for f in dataclasses.fields(msg)
        if not _at_default(f, getattr(msg, f.name))
    }
    body["type"] = name
    line = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(line) + 1 > MAX_MESSAGE:
        raise ProtocolError(f"dt-api: message {name} is larger than {MAX_MESSAGE} bytes")
    return line + b"\n"


def _at_default(f: dataclasses.Field[Any], value: Any) -> bool:
    """Left out of the line: decode gives the same value back (see the module docstring)."""
    if f.default is not dataclasses.MISSING:
        return bool(value == f.default and type(value) is type(f.default))
    return False


# -- strict decoding ------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _text(value: str) -> None:
    """JSON's ``\\ud800`` escape decodes to a lone UTF-16 surrogate: a Python str that
    is not text and that fails later, far from here, when anything encodes it (it once
    dropped the whole SSH connection unanswered)."""
    if len(value) > MAX_STRING:
        raise ProtocolError("dt-api: a string is too long")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(
            "dt-api: a string holds an unpaired surrogate (\\ud800-\\udfff), which is not text"
        ) from None


def _depth(value: Any, level: int = 0, blob: bool = False) -> None:
    """Nesting, sizes and text of a decoded value. ``blob``: a bytes field's base64,
    bounded by the message size alone."""
    if blob and isinstance(value, str):
        return
    if level > MAX_DEPTH:
        raise ProtocolError("dt-api: message is nested too deeply")
    if isinstance(value, dict):
        if len(value) > MAX_ITEMS:
            raise ProtocolError("dt-api: object has too many fields")
        for k, v in value.items():
            _text(k)
            _depth(v, level + 1)
    elif isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise ProtocolError("dt-api: list has too many items")
        for v in value:
            _depth(v, level + 1)
    elif isinstance(value, float):
        raise ProtocolError("dt-api: numbers must be integers")
    elif isinstance(value, str):
        _text(value)


def _check(field: str, hint: Any, value: Any) -> Any:
    """Check one value against a type annotation; return it converted (bytes)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(field, inner, value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f'dt-api: field "{field}" must be true or false')
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 2**63:
            raise ProtocolError(f'dt-api: field "{field}" must be an integer')
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ProtocolError(f'dt-api: field "{field}" must be a string')
        return value
    if hint is bytes:
        if not isinstance(value, str):
            raise ProtocolError(f'dt-api: field "{field}" must be base64 bytes')
        try:
            return base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise ProtocolError(f'dt-api: field "{field}" must be base64 bytes') from None
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f'dt-api: field "{field}" must be a list')
        (inner,) = typing.get_args(hint)
        return [_check(f"{field}[]", inner, v) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f'dt-api: field "{field}" must be an object')
        args = typing.get_args(hint)
        if args and args[1] is str and not all(isinstance(v, str) for v in value.values()):
            raise ProtocolError(f'dt-api: field "{field}" must map strings to strings')
        return value
    raise TypeError(f"unsupported annotation {hint!r} on {field}")  # a bug in this module


def _is_bytes(hint: Any) -> bool:
    return hint is bytes or (
        typing.get_origin(hint) in (Union, types.UnionType) and bytes in typing.get_args(hint)
    )


def decode(line: bytes) -> Any:
    """Decode one line (with or without its newline) into a message, strictly."""
    if len(line) > MAX_MESSAGE:
        raise ProtocolError(f"dt-api: message is larger than {MAX_MESSAGE} bytes")
    try:
        text = line.decode("utf-8")
        body = json.loads(text, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("dt-api: message is not valid JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError("dt-api: message must be a JSON object")
    name = body.get("type")
    cls = REGISTRY.get(name) if isinstance(name, str) else None
    hints = typing.get_type_hints(cls) if cls is not None else {}
    if len(body) > MAX_ITEMS:
        raise ProtocolError("dt-api: object has too many fields")
    for key, value in body.items():
        _text(key)
        _depth(value, 1, blob=_is_bytes(hints.get(key)))
    body.pop("type", None)
    if cls is None:
        raise ProtocolError(f"dt-api: unknown message type {str(name)[:64]!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(body) - set(fields)
    if unknown:
        raise ProtocolError(f'dt-api: {name} has unknown field "{sorted(unknown)[0][:64]}"')
    kwargs = {}
    for fname, f in fields.items():
        if fname not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f'dt-api: {name} is missing field "{fname}"')
            continue
        kwargs[fname] = _check(fname, hints[fname], body[fname])
    return cls(**kwargs)


# -- framing --------------------------------------------------------------------------------


class LineBuffer:
    """Splits a byte stream into lines, never holding more than MAX_MESSAGE bytes."""

    def __init__(self) -> None:
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Appends to the partial line in place: a line of MAX_MESSAGE bytes that comes
        in 8 KiB reads is copied once, not once per read."""
        lines: list[bytes] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            self._partial += data[start:] if end < 0 else data[start:end]
            if len(self._partial) > MAX_MESSAGE:
                self._partial = bytearray()
                raise ProtocolError(f"dt-api: message is larger than {MAX_MESSAGE} bytes")
            if end < 0:
                return lines
            lines.append(bytes(self._partial))
            self._partial = bytearray()
            start = end + 1


class LineReader:
    """Bounded ``readline`` over any reader with ``read(n)``.

    asyncssh's own ``readline`` buffers without limit, so a peer could make us hold an
    endless line; this one refuses a line once it passes MAX_MESSAGE.
    """

    def __init__(self, reader: Any) -> None:
        self._reader = reader
        self._buffer = LineBuffer()
        self._lines: list[bytes] = []
        self._eof = False

    async def readline(self) -> bytes:
        while not self._lines and not self._eof:
            data = await self._reader.read(8192)
            if isinstance(data, str):
                data = data.encode("utf-8", "surrogateescape")
            if not data:
                self._eof = True
                break
            self._lines.extend(self._buffer.feed(data))
        if self._lines:
            return self._lines.pop(0) + b"\n"
        return b""  # EOF (a partial last line is dropped: the peer went away mid-message)


async def read_line(reader: Any, timeout: float) -> bytes:
    """One line from an asyncio or asyncssh reader (binary mode), bounded in size and time."""
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        raise ProtocolError(f"dt-api: timed out after {timeout:g}s waiting for a message") from None
    except (ValueError, asyncio.LimitOverrunError):
        raise ProtocolError(f"dt-api: message is larger than {MAX_MESSAGE} bytes") from None
    if isinstance(line, str):  # a reader opened in text mode by mistake
        line = line.encode("utf-8", "surrogateescape")
    if not line:
        raise EOFError
    if not line.endswith(b"\n"):
        if len(line) > MAX_MESSAGE:
            raise ProtocolError(f"dt-api: message is larger than {MAX_MESSAGE} bytes")
        raise EOFError  # a truncated last line: the peer went away mid-message
    return line[:-1]


async def read_message(reader: Any, timeout: float) -> Any:
    return decode(await read_line(reader, timeout))


async def write_message(writer: Any, msg: Any) -> None:
    writer.write(encode(msg))
    drain = getattr(writer, "drain", None)
    if drain is not None:
        await drain()


# -- messages ---------------------------------------------------------------------------------


@message("hello")
class Hello:
    """First message from the client: its protocol version and name."""

    version: int
    client: str


@message("welcome")
class Welcome:
    """The bastion's answer to hello: cluster name, who you are, how you authenticated."""

    version: int
    cluster: str
    server: str
    auth: str
    user: str | None = None


@message("error")
class Error:
    """A refusal: ``code`` is stable (bastion.protocol.errors), ``message`` is for people."""

    code: str
    message: str


@message("ok")
class Ok:
    pass


@message("cert_request")
class CertRequest:
    """Sign ``public_key`` (OpenSSH one-line form); ``device`` asks for device auth first."""

    public_key: str
    device: bool = False
    ttl_seconds: int | None = None


@message("device_challenge")
class DeviceChallenge:
    """``pcr_select``: the SHA-256 PCRs to quote, exactly (None: the bastion names none;
    quote bastion.protocol.quote.POSTURE_PCRS). ``event_log``: send the boot event log."""

    nonce: bytes
    pcr_select: list[int] | None = None
    event_log: bool = False


@message("device_response")
class DeviceResponse:
    """A quote by the device's AK over sha256(nonce || user public key blob), and the
    boot event log when asked: zlib-compressed (eventlog.compress_log), or why not."""

    asset_tag: str
    credential_id: str
    attest: bytes
    signature: bytes
    pcr_select: list[int]
    pcr_values: list[bytes]
    event_log: bytes | None = None
    event_log_error: str | None = None


@message("cert_issued")
class CertIssued:
    """``posture``: the verdict on the device's boot where a posture policy applies
    (pass, warn, withhold); ``attest_interval``: seconds between the quotes the client
    agent must answer during the session (continuous attestation), None: not asked."""

    certificate: str
    host_ca_keys: list[str]
    cluster: str
    roles: list[str]
    logins: list[str]
    device_warning: str | None = None
    attest_interval: int | None = None
    posture: str | None = None


@message("list_nodes")
class ListNodes:
    pass


@message("nodes")
class Nodes:
    """Each node: {name, addr, port, labels}."""

    nodes: list[dict[str, Any]]


@message("whoami")
class Whoami:
    pass


@message("identity")
class Identity:
    user: str
    roles: list[str]
    logins: list[str]
    device_trust_mode: str
    device: dict[str, Any] | None = None


@message("signup_begin")
class SignupBegin:
    token: str


@message("signup_info")
class SignupInfo:
    user: str
    totp_uri: str
    min_password_length: int


@message("signup_finish")
class SignupFinish:
    token: str
    password: str
    totp_code: str


@message("enroll_begin")
class EnrollBegin:
    """Step 1 of enrollment: proof of right (token or current_device), EK, AK."""

    device_data: dict[str, Any]
    ek_public: bytes
    ek_public_der: bytes
    ak_public: bytes
    token: str | None = None
    current_device: bool = False
    ek_cert_der: bytes | None = None


@message("enroll_challenge")
class EnrollChallenge:
    """``pcr_select`` and ``event_log`` as in device_challenge."""

    credential_blob: bytes
    encrypted_secret: bytes
    nonce: bytes
    pcr_select: list[int] | None = None
    event_log: bool = False


@message("enroll_finish")
class EnrollFinish:
    """Step 2: the activated secret and a quote by the AK over the nonce (and the boot
    event log, as in device_response)."""

    secret: bytes
    attest: bytes
    signature: bytes
    pcr_select: list[int]
    pcr_values: list[bytes]
    event_log: bytes | None = None
    event_log_error: str | None = None


@message("enrolled")
class Enrolled:
    device: dict[str, Any]


def error_from(exc: DTError) -> Error:
    return Error(code=exc.code, message=exc.message)


def raise_if_error(msg: Any) -> None:
    if isinstance(msg, Error):
        raise from_code(msg.code, msg.message)


# -- continuous attestation (dtclient agent) --------------------------------------------------


@message("attest_begin")
class AttestBegin:
    """The client agent, on a certificate connection with device extensions: this device
    (the certificate's) answers the bastion's attestation challenges from now on."""

    asset_tag: str
    credential_id: str


@message("attest_challenge")
class AttestChallenge:
    """Quote these PCRs (SHA-256 bank) now, over ``quote.attest_quote_data(nonce)``;
    the answer is due within ``grace`` seconds, the next challenge ``interval`` later."""

    nonce: bytes
    pcr_select: list[int]
    interval: int
    grace: int


@message("attest_response")
class AttestResponse:
    attest: bytes
    signature: bytes
    pcr_select: list[int]
    pcr_values: list[bytes]


@message("attest_result")
class AttestResult:
    """``ok`` (the next challenge in ``next_in`` s), ``failed`` (``reason``; the device's
    sessions are cut and the connection closed) or ``not_required`` (no role asks this
    device; ask again in ``next_in`` s)."""

    status: str
    reason: str = ""
    next_in: int = 0
