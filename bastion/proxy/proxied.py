"""Accepting connections behind a load balancer that speaks the PROXY protocol.

Only used when ``proxy_protocol_from`` lists the balancers' networks. From those
addresses the header is required, parsed (bastion.proxy.proxyproto) and consumed
before SSH starts, and the client address it states is what audit events and
source-address checks see. From anywhere else a PROXY header is refused: believing
it would let any client forge its address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from typing import Any

import asyncssh

from bastion.protocol.errors import DTError, ProtocolError
from bastion.proxy import proxyproto
from bastion.proxy.server import Bastion, BastionServer

log = logging.getLogger("bastion.proxied")
HEADER_TIMEOUT = 10.0


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


async def read_header(
    sock: socket.socket, timeout: float = HEADER_TIMEOUT
) -> proxyproto.ProxyHeader:
    """Peek until the header is complete, then consume exactly its bytes."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    want = 16
    while True:
        try:
            data = sock.recv(max(want, 16) + 256, socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        if data == b"":
            raise ProtocolError("connection closed before the PROXY header")
        if data is not None:
            missing = proxyproto.needed(data)
            if not missing:
                header = proxyproto.parse(data)
                sock.recv(header.length)  # consume it; SSH starts right after
                return header
            want = len(data) + missing
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError("timed out waiting for the PROXY header")
        await asyncio.wait_for(_readable(loop, sock), remaining)


def unmapped(addr: str) -> str:
    """``::ffff:10.0.0.5`` as ``10.0.0.5``: on a dual-stack listener ([::]) an IPv4
    peer arrives IPv4-mapped; compared as it is with ``proxy_protocol_from``
    (10.0.0.0/8) a trusted balancer was refused as a forger."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped) if mapped is not None else addr


class ProxyProtocolAcceptor:
    def __init__(self, bastion: Bastion, options: dict[str, Any], listener: socket.socket) -> None:
        self.bastion = bastion
        self.options = options
        self.sockets = [listener]
        self._listener = listener
        self._networks = [
            ipaddress.ip_network(n, strict=False) for n in bastion.config.proxy_protocol_from
        ]
        self._task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, bastion: Bastion, options: dict[str, Any]) -> ProxyProtocolAcceptor:
        config = bastion.config
        family = socket.AF_INET6 if ":" in config.listen_host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and ipaddress.ip_address(config.listen_host).is_unspecified:
            # [::] is dual-stack whatever net.ipv6.bindv6only says: IPv4 balancers
            # arrive as ::ffff:a.b.c.d (see unmapped).
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((config.listen_host, config.listen_port))
        listener.listen(1024)
        listener.setblocking(False)
        acceptor = cls(bastion, options, listener)
        acceptor._task = asyncio.get_running_loop().create_task(acceptor._accept())
        return acceptor

    def trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, peer = await loop.sock_accept(self._listener)
            task = loop.create_task(self._serve(sock, unmapped(str(peer[0]))))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve(self, sock: socket.socket, peer: str) -> None:
        client = None
        try:
            if self.trusted(peer):
                header = await read_header(sock)
                client = unmapped(header.source[0]) if header.source else None
            else:
                await self._refuse_forged(sock, peer)
        except (DTError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            self._audit(peer, client, reason)
            sock.close()
            return
        # The address audit events and source-address checks see: the header's, else
        # the socket's own (unmapped: a client reaching [::] by IPv4 is 10.0.0.5).
        addr = client or peer
        try:
            await asyncssh.run_server(
                sock, server_factory=lambda: BastionServer(self.bastion, addr), **self.options
            )
        except (OSError, asyncssh.Error):
            # BastionServer.connection_lost has seen this end and audited what deserves
            # it; the error's text may be the client's own (its disconnect reason).
            sock.close()

    async def _refuse_forged(self, sock: socket.socket, peer: str) -> None:
        """A PROXY header from a client that is not a trusted balancer: refuse it."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(_readable(loop, sock), 2.0)
            first = sock.recv(16, socket.MSG_PEEK)
        except (TimeoutError, BlockingIOError):
            return  # a client that waits for our banner first: plain SSH
        if first.startswith(proxyproto.V1_PREFIX) or first.startswith(proxyproto.V2_SIGNATURE[:12]):
            raise ProtocolError(
                f"PROXY protocol header from {peer}, which is not a trusted load balancer"
            )

    def _audit(self, peer: str, client: str | None, reason: str) -> None:
        self.bastion.workers.audit_soon(
            "auth.failed",
            success=False,
            message=reason,
            remote_addr=client or peer,
            balancer=peer if client else None,
        )

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._listener.close()

    async def wait_closed(self) -> None:
        for task in list(self._conns):
            task.cancel()
        await asyncio.sleep(0)
