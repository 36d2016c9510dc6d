"""One ``direct-tcpip`` channel (what ``ssh -J`` opens): decided, connected, recorded.

The order is what makes a change during the open count:

1. decide (off the loop): an inventory node, everything the user's roles, device and
   certificate allow now, and a certificate that has not expired;
2. register the session, before the TCP connect to the node starts: from here on every
   re-check of the watcher sees it, and a cut cancels the connect;
3. connect to the node (a slow node takes seconds; a lock may commit meanwhile);
4. decide again, then record the start (:meth:`Registry.begin`); only then are bytes
   forwarded. A session cut at any point before that never forwards.

Every refusal is audited as ``session.denied`` with its reason before the client
hears it (unless the database is locked: then the row follows, the client does not
wait for it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import asyncssh

from bastion.ca.certs import parse_cert
from bastion.protocol.errors import AccessDenied, DTError
from bastion.proxy import node_handshake, policy
from bastion.proxy.sessions import CountingForwarder, LiveSession, audit_fields

if TYPE_CHECKING:
    from bastion.proxy.server import BastionServer

log = logging.getLogger("bastion.forwarding")


class _Unreachable(DTError):
    code = "node_unreachable"


async def open_forward(
    server: BastionServer,
    chan: Any,
    identity: policy.Identity | None,
    dest_host: str,
    dest_port: int,
) -> CountingForwarder:
    """The session for one channel, or ChannelOpenError (audited) with the reason."""
    bastion, workers = server.bastion, server.bastion.workers
    try:
        if identity is None:
            raise AccessDenied("log in with a certificate first (dtclient login)")
        if server.ending is not None:
            raise AccessDenied(server.ending)
        node = await workers.read(
            policy.open_channel, identity, dest_host, dest_port, time.time()
        )  # 1.
    except DTError as exc:
        await server.audit_denied(
            "session.denied", exc.message, identity, target=f"{dest_host}:{dest_port}"
        )
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, exc.message
        ) from None
    live = LiveSession(identity, node, server.remote_addr, lambda: None, owner=server)
    bastion.registry.track(live)  # 2.
    try:
        peer = await _connect(server, live)  # 3.
        try:
            await bastion.registry.begin(live)  # 4.
            if live.ended:  # cut between its start being recorded and now
                raise AccessDenied(live.terminated_reason or "the session was closed")
        except BaseException:
            peer.close()
            raise
    except DTError as exc:
        bastion.registry.untrack(live)
        await server.audit_denied("session.denied", _refusal(exc, live), identity, node=node.name)
        raise asyncssh.ChannelOpenError(_open_code(exc), _refusal(exc, live)) from None
    except BaseException:  # the connection went away meanwhile (it may have been cut)
        bastion.registry.untrack(live)
        if live.terminated_reason is not None:
            server.bastion.workers.audit_soon(
                "session.denied",
                success=False,
                message=live.terminated_reason,
                **audit_fields(live),
            )
        raise
    # open from here on: a cut closes the channel (and says why, see close_forward)
    live.close = functools.partial(server.close_forward, chan, live)
    return CountingForwarder(bastion.registry, live, upstream=True, peer=peer)


def _refusal(exc: DTError, live: LiveSession) -> str:
    if isinstance(exc, AccessDenied | _Unreachable):
        return exc.message
    log.error("cannot record a session to %s: %s", live.node.name, exc.message)
    return "the bastion cannot record this session right now; try again later"


def _open_code(exc: DTError) -> int:
    if isinstance(exc, AccessDenied):
        return asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
    return asyncssh.OPEN_CONNECT_FAILED


async def _connect(server: BastionServer, live: LiveSession) -> CountingForwarder:
    """Connect to the node; a cut meanwhile (``live.close``) cancels the connect."""
    bastion, node = server.bastion, live.node
    loop = asyncio.get_running_loop()

    def node_side() -> CountingForwarder:
        forwarder = CountingForwarder(bastion.registry, live, upstream=False)
        _watch_node_host_key(server, forwarder, live)
        return forwarder

    task = asyncio.ensure_future(
        asyncio.wait_for(
            loop.create_connection(node_side, node.host, node.port),
            bastion.config.node_connect_timeout,
        )
    )

    def abandon() -> None:
        task.cancel()

    live.close = abandon
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task.cancelled():
        raise AccessDenied(live.terminated_reason or "the session was closed while connecting")
    try:
        _, peer = task.result()
    except (OSError, TimeoutError) as exc:
        raise _Unreachable(f"node {node.name} ({node.addr}) is unreachable: {_why(exc)}") from None
    return peer


def _watch_node_host_key(
    server: BastionServer, node_side: CountingForwarder, live: LiveSession
) -> None:
    def refuse_user_cert(blob: bytes) -> bool:
        reason = _bad_node_host_key(server, blob, live)
        if reason is not None:
            _audit_node_refusal(server, live, reason)
        return reason is not None

    def unreadable(why: str) -> None:
        _audit_node_refusal(
            server,
            live,
            f"node {live.node.name} sent an SSH handshake the bastion cannot check: {why}",
        )

    node_handshake.watch(node_side, refuse_user_cert, unreadable)


def _bad_node_host_key(server: BastionServer, blob: bytes, live: LiveSession) -> str | None:
    try:
        cert = parse_cert(policy.openssh_line(blob))
    except DTError:
        return None  # unreadable to us: the client's own check decides
    ca = server.bastion.cluster.ca
    names = {
        ca.host_ca_fingerprint: "the cluster's host CA",
        ca.user_ca_fingerprint: "the cluster's user CA",
    }
    try:
        policy.check_node_host_cert(cert, live.node, names)
    except DTError as exc:
        return exc.message
    return None


def _audit_node_refusal(server: BastionServer, live: LiveSession, reason: str) -> None:
    log.warning("refusing session %s: %s", live.id, reason)
    server.bastion.workers.audit_soon(
        "session.denied", success=False, message=reason, **audit_fields(live)
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    if isinstance(exc, OSError) and exc.errno:
        # asyncio puts "Connect call failed (addr)" in strerror; the errno says why
        return os.strerror(exc.errno)
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
