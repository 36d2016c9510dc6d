"""Less work per SSH packet in asyncssh, the bastion's share of forwarding's CPU.

A forwarded session costs the bastion one SSH packet decrypted (or encrypted) per
16-32 KiB, and asyncssh does some of that work again on every packet when once per
connection is enough. py-spy during a 1 GiB ``ssh -J`` upload (docs/benchmarks.md,
"forwarding") showed, besides the recv/send system calls and AES-GCM itself:

- ``GCMCipher`` builds a new ``AESGCM`` (key schedule included) for every packet and
  recomputes the nonce by slicing and re-joining bytes; here one ``AESGCM`` per key
  and an integer counter (the same nonces, RFC 5647: 4 fixed bytes, 8 counting);
- every read cancels the keepalive timer and schedules a new one (a heap push and a
  cancelled handle left in the loop's heap per read); here a read only notes the
  time, and the timer, when it fires, looks: data came since, so it waits again for
  the rest of the interval. Keepalives go out after the same silence as before.

:func:`install` patches asyncssh once per process (``dt-bastion serve`` calls it),
checked against the asyncssh it was written for: an asyncssh whose internals moved
is left alone, and logged.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("bastion.proxy")

_GCM_TAG = 16
_COUNTER_MASK = (1 << 64) - 1
_installed = False


class FastGCMCipher:
    """asyncssh's ``GCMCipher`` with its AEAD object made once, not per packet."""

    def __init__(self, cipher_name: str, key: bytes, iv: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)  # as asyncssh's: AES-GCM is its only GCM cipher
        self._fixed = iv[:4]
        self._counter = int.from_bytes(iv[4:], "big")

    def _nonce(self) -> bytes:
        nonce = self._fixed + self._counter.to_bytes(8, "big")
        self._counter = (self._counter + 1) & _COUNTER_MASK
        return nonce

    def encrypt_and_sign(self, header: bytes, data: bytes) -> tuple[bytes, bytes]:
        sealed = self._aead.encrypt(self._nonce(), data, header)
        body = memoryview(sealed)
        return header + body[:-_GCM_TAG], sealed[-_GCM_TAG:]

    def verify_and_decrypt(self, header: bytes, data: bytes, mac: bytes) -> bytes | None:
        from cryptography.exceptions import InvalidTag

        nonce = self._nonce()
        try:
            return self._aead.decrypt(nonce, data + mac, header)
        except InvalidTag:
            return None


def _reset_keepalive_timer(self: Any) -> None:
    if self._auth_complete:
        self._dt_last_read = self._loop.time()
        if self._keepalive_timer is None:
            self._set_keepalive_timer()


def _keepalive_timer_callback(self: Any) -> None:
    last = getattr(self, "_dt_last_read", None)
    interval = self._keepalive_interval
    if last is not None and interval:
        due = last + interval
        if due > self._loop.time() + 0.001:  # data came since this timer was set
            self._keepalive_timer = self._loop.call_at(due, self._keepalive_timer_callback)
            return
    _ORIGINAL_CALLBACK(self)


_ORIGINAL_CALLBACK: Any = None


def install() -> bool:
    """Patch asyncssh (once); False, logged, if its internals are not as expected."""
    global _installed, _ORIGINAL_CALLBACK
    if _installed:
        return True
    import asyncssh.encryption
    from asyncssh.connection import SSHConnection
    from asyncssh.crypto import cipher

    original = getattr(cipher, "GCMCipher", None)
    expected = (
        getattr(asyncssh.encryption, "GCMCipher", None) is original
        and hasattr(original, "verify_and_decrypt")
        and getattr(cipher, "AESGCM", None) is not None
        and all(
            hasattr(SSHConnection, name)
            for name in (
                "_reset_keepalive_timer",
                "_keepalive_timer_callback",
                "_set_keepalive_timer",
            )
        )
    )
    if not expected:
        log.warning("asyncssh %s: its packet path changed; running it unpatched", _version())
        return False
    asyncssh.encryption.GCMCipher = FastGCMCipher  # type: ignore[assignment,misc]
    _ORIGINAL_CALLBACK = SSHConnection._keepalive_timer_callback
    SSHConnection._reset_keepalive_timer = _reset_keepalive_timer  # type: ignore[method-assign]
    SSHConnection._keepalive_timer_callback = _keepalive_timer_callback  # type: ignore[method-assign]
    _installed = True
    return True


def _version() -> str:
    import asyncssh

    return str(getattr(asyncssh, "__version__", "?"))
