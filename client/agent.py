"""This cluster's identities in the user's ssh-agent: one pair at a time, gone at logout.

Every login makes a fresh key, and its key and certificate go into the agent so that
plain ``ssh -J`` uses them. Left alone, each login would add a pair beside the old
ones, and logout (which deletes only the files) would leave certificates that still
work in the agent. So the identities dtclient adds carry a comment naming the cluster
(``dtclient:CLUSTER:USER``); login removes the cluster's old ones before adding the new
pair, and logout removes them all. Identities whose public key is the one in the key
files are removed too, which covers pairs added by older versions under another comment.
Nothing else in the agent is touched.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from pathlib import Path

from bastion.protocol import console
from bastion.protocol.errors import DTError
from client.sshlib import asyncssh

COMMENT_PREFIX = "dtclient:"


def key_comment(cluster: str, user: str) -> str:
    """The comment of the session key (and so of its agent identities)."""
    return f"{COMMENT_PREFIX}{cluster}:{user}"


def is_ours(comment: str, cluster: str) -> bool:
    return comment.startswith(f"{COMMENT_PREFIX}{cluster}:")


def public_blobs(*paths: Path) -> set[bytes]:
    """The key blobs in OpenSSH public key or certificate files (missing ones skipped)."""
    blobs = set()
    for path in paths:
        try:
            fields = path.read_text().split()
            blobs.add(base64.b64decode(fields[1], validate=True))
        except (OSError, IndexError, ValueError, binascii.Error):
            continue
    return blobs


def agent_configured() -> bool:
    return bool(os.environ.get("SSH_AUTH_SOCK"))


async def replace(cluster: str, known: set[bytes], key_path: Path, cert_path: Path) -> None:
    """Remove this cluster's identities (and ``known`` blobs), then add the new pair."""
    if not agent_configured():
        return
    try:
        agent = await asyncssh.connect_agent()
    except (OSError, asyncssh.Error) as exc:
        console.note(f"could not reach ssh-agent to add the key: {exc}")
        return
    try:
        await _remove(agent, cluster, known)
        lifetime = _lifetime(cert_path)
        keypairs = asyncssh.load_keypairs([(str(key_path), str(cert_path))])
        await agent.add_keys(keypairs, lifetime=lifetime)
    except (OSError, asyncssh.Error, ValueError, DTError) as exc:
        console.note(f"could not add the key to ssh-agent: {exc}")
    finally:
        agent.close()
        await agent.wait_closed()


async def remove(cluster: str | None, known: set[bytes]) -> int:
    """Remove this cluster's identities (and ``known`` blobs); how many were removed.

    A failure is said on stderr: the certificates would still work from the agent.
    """
    if not agent_configured():
        return 0
    try:
        agent = await asyncssh.connect_agent()
    except (OSError, asyncssh.Error) as exc:
        console.note(f"could not reach ssh-agent to remove the key: {exc}")
        return 0
    try:
        return await _remove(agent, cluster, known)
    except (OSError, asyncssh.Error, ValueError) as exc:
        console.note(
            f"could not remove the key from ssh-agent ({exc}); "
            "remove it by hand: ssh-add -D (removes every identity)"
        )
        return 0
    finally:
        agent.close()
        await agent.wait_closed()


async def _remove(agent: asyncssh.SSHAgentClient, cluster: str | None, known: set[bytes]) -> int:
    removed = 0
    for identity in await agent.get_keys():
        comment = (identity.get_comment_bytes() or b"").decode("utf-8", "replace")
        if (cluster is not None and is_ours(comment, cluster)) or identity.public_data in known:
            await agent.remove_keys([identity])  # what SSHAgentKeyPair.remove() does
            removed += 1
    return removed


def _lifetime(cert_path: Path) -> int:
    """Seconds until the certificate expires (at least a minute), for ``ssh-add -t``."""
    from bastion.protocol.certs import parse_cert

    cert = parse_cert(cert_path.read_bytes())
    return max(60, int(cert.valid_before - time.time()))
