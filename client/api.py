"""The client end of the dt-api subsystem: one SSH connection to the bastion.

Host trust comes first: the bastion presents a host certificate, and the client
accepts it only if it is signed by a host CA it already trusts, or — on first
contact — by a CA whose fingerprint matches ``--ca-pin`` or that the person accepts
at a prompt. asyncssh asks us (``validate_host_ca_key``) during key exchange, before
any password or code is sent, so a man in the middle never sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bastion.protocol import wire
from bastion.protocol.certs import fingerprint, load_public_key
from bastion.protocol.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    DTError,
    ProtocolError,
    UsageError,
)
from client.sshlib import asyncssh

CLIENT_NAME = "dtclient/0.1"
SUBSYSTEM = "dt-api"
SIGNUP_USER = "-dt-signup"
BOT_USER = "-dt-bot"  # the SSH user name a bot token logs in as
CONNECT_TIMEOUT = 15.0
STEP_TIMEOUT = 60.0  # a real TPM can take seconds per step on the client side


@dataclass
class HostTrust:
    """Which host CAs to accept, and how to decide about a new one."""

    trusted: tuple[str, ...] = ()  # OpenSSH public key lines
    pin: str | None = None  # SHA256:... of the host CA
    # Asked on first contact without a pin: (fingerprint) -> accept?
    confirm: Callable[[str], bool] | None = None
    accepted: list[str] = field(default_factory=list)  # CA lines accepted this time
    refused: str | None = None  # why a CA was refused, for the error message


@dataclass
class Credentials:
    """How to authenticate: a password and TOTP code, a signup token, or a certificate."""

    user: str
    password: str | None = None
    totp_code: str | None = None
    signup_token: str | None = None
    bot_token: str | None = None
    bot_name: str | None = None  # the bot the token should belong to (--user)
    client_key: Any = None  # asyncssh private key
    certificate: Any = None  # asyncssh certificate
    # Asked for (password, code) only when the bastion's login prompt arrives, so after
    # the host CA was checked (pin or trust prompt): nothing is typed for a stranger.
    ask: Callable[[], tuple[str, str]] | None = None


REFUSAL_TAG = wire.REFUSAL_TAG
BASTION_VERSION = "SSH-2.0-dt-bastion"


class _Client(asyncssh.SSHClient):
    def __init__(self, trust: HostTrust, creds: Credentials) -> None:
        self.trust = trust
        self.creds = creds
        self._answered = False
        self.conn: asyncssh.SSHClientConnection | None = None
        self.refusal: DTError | None = None  # why the bastion refused, when it said
        self.banners: list[str] = []
        self.prompt_time = 0.0  # seconds spent waiting for a person
        self.failure: DTError | None = None  # a prompt that failed (no answer on stdin)

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn

    def _asking(self, prompt: Callable[..., Any], *args: Any) -> Any:
        """A prompt, whose time a person takes does not count against the deadline."""
        start = time.monotonic()
        try:
            return prompt(*args)
        except DTError as exc:  # raised inside asyncssh's handshake: carried out by hand
            self.failure = exc
            raise
        finally:
            self.prompt_time += time.monotonic() - start

    def _is_bastion(self) -> bool:
        version = str(self.conn.get_extra_info("server_version") or "") if self.conn else ""
        if version.startswith(BASTION_VERSION):
            return True
        self.trust.refused = (
            f"this is not a dt-bastion: the SSH server here says {version or 'nothing'!r} "
            "and has no dt-api (is --proxy the bastion's address and port?)"
        )
        return False

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        if self._is_bastion():
            self.trust.refused = (
                "the bastion presented a plain host key, not a host certificate: "
                "refusing to connect (possible man in the middle)"
            )
        return False

    def _confirm(self, fp: str) -> bool:
        confirm = self.trust.confirm
        if confirm is None:
            return False
        try:
            return bool(self._asking(confirm, fp))
        except DTError:
            return False

    def auth_banner_received(self, msg: str, lang: str) -> None:
        """What the bastion says before refusing (why a proven certificate is refused)."""
        text = msg.strip().removeprefix("dt-bastion:").strip()
        self.banners.append(text.removeprefix("certificate refused:").strip())

    def validate_host_ca_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        if not self._is_bastion():
            return False
        line = key.export_public_key("openssh").decode().strip()
        fp = fingerprint(load_public_key(line.encode()))
        if self.trust.pin is not None:
            if fp != self.trust.pin:
                self.trust.refused = (
                    f"the bastion's host CA is {fp}, not the pinned {self.trust.pin}: "
                    "refusing to connect (possible man in the middle)"
                )
                return False
        elif not self._confirm(fp):
            self.trust.refused = f"the bastion's host CA {fp} is not trusted"
            return False
        self.trust.accepted.append(line)
        return True

    def kbdint_auth_requested(self) -> str | None:
        return ""  # let the server choose its submethods

    def kbdint_challenge_received(
        self, name: str, instructions: str, lang: str, prompts: Sequence[tuple[str, bool]]
    ) -> list[str] | None:
        if not prompts:
            if lang.startswith(REFUSAL_TAG) and instructions.strip():
                from bastion.protocol.errors import from_code

                self.refusal = from_code(lang[len(REFUSAL_TAG) :], instructions.strip())
            return []
        if self._answered:
            return None  # the answers were refused once: do not retry them (lockout)
        self._answered = True
        if self.creds.ask is not None and self.creds.password is None:
            try:
                self.creds.password, self.creds.totp_code = self._asking(self.creds.ask)
            except DTError:
                return None  # ends keyboard-interactive; open_session raises the failure
        return [self._answer(prompt.lower()) for prompt, _echo in prompts]

    def _answer(self, prompt: str) -> str:
        if "bot token" in prompt and self.creds.bot_token is not None:
            return self.creds.bot_token
        if "token" in prompt and self.creds.signup_token is not None:
            return self.creds.signup_token
        if "password" in prompt and self.creds.password is not None:
            return self.creds.password
        if "code" in prompt and self.creds.totp_code is not None:
            return self.creds.totp_code
        return ""


class ApiSession:
    """A dt-api session: send one message, read one answer, with a deadline."""

    def __init__(self, conn: asyncssh.SSHClientConnection, writer: Any, reader: Any) -> None:
        self.conn = conn
        self._writer = writer
        self._reader = reader
        self.welcome: Any = None

    async def send(self, msg: Any) -> None:
        await wire.write_message(self._writer, msg)

    async def call(self, msg: Any, expect: Any, timeout: float = STEP_TIMEOUT) -> Any:
        await self.send(msg)
        return await self.receive(expect, timeout)

    async def receive(self, expect: Any, timeout: float = STEP_TIMEOUT) -> Any:
        """The next message, which must be of ``expect`` (a class or a tuple of them)."""
        try:
            answer = await wire.read_message(self._reader, timeout)
        except (asyncssh.Error, ConnectionError, asyncio.IncompleteReadError) as exc:
            raise ConnectionFailed(f"the bastion closed the dt-api session: {exc}") from None
        wire.raise_if_error(answer)
        if not isinstance(answer, expect):
            raise ProtocolError(f"dt-api: unexpected {wire.type_name(answer)!r} from the bastion")
        return answer

    async def close(self) -> None:
        try:
            self._writer.write_eof()
        except (OSError, asyncssh.Error):
            pass
        self.conn.close()
        await self.conn.wait_closed()


async def open_session(host: str, port: int, creds: Credentials, trust: HostTrust) -> ApiSession:
    """Connect, authenticate, open the dt-api subsystem and say hello."""
    ca_keys = [asyncssh.import_public_key(line) for line in trust.trusted]
    options: dict[str, Any] = {
        "username": creds.user,
        # (trusted host keys, trusted CA keys, revoked keys): never ~/.ssh/known_hosts
        "known_hosts": ([], ca_keys, []),
        "agent_path": None,
        "config": None,
        "connect_timeout": None,  # ours below: a person typing a password is no timeout
        "kbdint_auth": creds.client_key is None,
        "public_key_auth": creds.client_key is not None,
        "client_keys": [(creds.client_key, creds.certificate)] if creds.client_key else None,
    }
    client = _Client(trust, creds)
    try:
        conn = await _within_deadline(
            asyncssh.create_connection(lambda: client, host, port, password_auth=False, **options),
            client,
        )
    except asyncssh.HostKeyNotVerifiable as exc:
        if client.failure is not None:
            raise client.failure from None
        raise ConnectionFailed(
            trust.refused or f"cannot verify the bastion: {exc.reason}"
        ) from None
    except asyncssh.PermissionDenied as exc:
        if client.failure is not None:
            raise client.failure from None
        if client.refusal is not None:
            raise client.refusal from None
        if creds.client_key is not None:
            said = "; ".join(b for b in client.banners if b)
            raise AuthenticationFailed(
                "the bastion refused your certificate"
                + (f": {said}" if said else " (revoked, of a rotated CA, or your account locked)")
            ) from None
        raise AuthenticationFailed(_denied_message(exc.reason, client.banners)) from None
    except asyncssh.DisconnectError as exc:
        raise ConnectionFailed(f"the bastion refused the connection: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ConnectionFailed(f"cannot reach the bastion at {host}:{port}: {reason}") from None
    try:
        writer, reader, _ = await conn.open_session(subsystem=SUBSYSTEM, encoding=None)
        session = ApiSession(conn, writer, wire.LineReader(reader))
        session.welcome = await session.call(
            wire.Hello(version=wire.PROTOCOL_VERSION, client=CLIENT_NAME), wire.Welcome
        )
    except (asyncssh.Error, OSError) as exc:
        conn.close()
        raise ConnectionFailed(
            f"{host}:{port} has no dt-api subsystem ({exc}): is --proxy a dt-bastion?"
        ) from None
    except DTError:
        conn.close()
        raise
    return session


async def _within_deadline(connecting: Any, client: _Client) -> Any:
    """The connection within CONNECT_TIMEOUT of the bastion's own time: the seconds a
    person spends at a prompt (the trust question, the password) do not count."""
    task = asyncio.ensure_future(connecting)
    start = time.monotonic()
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            conn, _client = task.result()
            return conn
        if time.monotonic() - start - client.prompt_time > CONNECT_TIMEOUT:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise TimeoutError("no answer in time")


def _denied_message(reason: str, banners: Sequence[str] = ()) -> str:
    said = "; ".join(b for b in banners if b)
    if said:
        return f"login failed: {said}"
    reason = (reason or "").strip()
    if not reason or reason.lower().startswith("permission denied"):
        return "login failed: wrong user name, password or code (or the account is locked)"
    return f"login failed: {reason}"


def parse_pin(pin: str | None) -> str | None:
    if pin is None:
        return None
    if not pin.startswith("SHA256:") or len(pin) < 20:
        raise UsageError(
            f"invalid --ca-pin {pin!r}: expected SHA256:... as `dtadmin ca export` prints"
        )
    return pin
