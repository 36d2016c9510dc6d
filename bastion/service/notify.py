"""Readiness and state for systemd (``Type=notify``), by the sd_notify protocol.

systemd passes ``$NOTIFY_SOCKET`` (a unix datagram socket: a path, or ``@name`` in the
abstract namespace); each message is newline-separated ``KEY=VALUE`` lines. Without it
(not under systemd, or another ``Type=``) nothing is sent. A send that fails is logged
once and never stops the bastion.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("bastion.service")


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self._warned = False

    def send(self, **states: str | int) -> None:
        if self.address is None:
            return
        text = "\n".join(f"{key.upper()}={value}" for key, value in states.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(text.encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd on NOTIFY_SOCKET: %s", exc.strerror or exc)

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status, mainpid=os.getpid())

    def reloading(self) -> None:
        # systemd 253+ matches the reload to this monotonic time stamp (sd_notify(3)).
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(reloading=1, monotonic_usec=usec, status="reloading the configuration")

    def stopping(self, status: str) -> None:
        self.send(stopping=1, status=status)

    def status(self, status: str) -> None:
        self.send(status=status)
