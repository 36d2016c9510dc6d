"""Only a certificate with device extensions may speak for a device's continuous
attestation: `attest_begin` on any other dt-api connection is refused with the reason
and audited (device.attest), and the connection goes on as for any refused request.

Attack: a stolen key and certificate *without* the device (or a password login) opens
dt-api and claims to be the device's attestation agent, to keep its sessions alive.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from bastion.protocol import wire
from bastion.protocol.errors import AccessDenied
from client.api import HostTrust, open_session
from tests.test_dtapi_recheck import certificate_user, env, password_user  # noqa: F401

pytestmark = pytest.mark.integration


async def begin(env, creds) -> AccessDenied:  # noqa: F811
    session = await open_session("127.0.0.1", env.bastion.port, creds, HostTrust(trusted=(env.ca,)))
    try:
        with pytest.raises(AccessDenied) as refused:
            await session.call(
                wire.AttestBegin(asset_tag="ALICE-LAPTOP", credential_id="c"), wire.AttestChallenge
            )
        # the connection goes on: a refused request is only that
        assert (await session.call(wire.Whoami(), wire.Identity)).user == creds.user
    finally:
        await session.close()
    return refused.value


def attest_rows(env, user):  # noqa: F811
    """The device.attest rows of ``user`` (queued by the bastion: waited for)."""
    deadline = time.monotonic() + 5
    while not (rows := env.cluster.store.list_audit(type="device.attest", user=user)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return rows


def test_a_certificate_without_device_extensions_is_no_agent(env):  # noqa: F811
    creds, _pub, _serial = certificate_user(env)
    refusal = asyncio.run(begin(env, creds))
    assert "certificate with device extensions" in refusal.message, refusal.message
    (row,) = attest_rows(env, "alice")
    assert not row.success and "attestation agent refused" in row.message
    assert row.device == "ALICE-LAPTOP"


def test_a_password_login_is_no_agent(env):  # noqa: F811
    creds, _pub = password_user(env)
    refusal = asyncio.run(begin(env, creds))
    assert "certificate login with device extensions" in refusal.message, refusal.message
    (row,) = attest_rows(env, "pat")
    assert not row.success
