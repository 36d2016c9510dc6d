"""The device inventory and each device's enrolled credential.

The credential (AK public key, EK hash, attestation type) is one JSON column, written
and read with the device row, so an enrollment is one row change.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from typing import Any

from bastion.authz.records import Device, DeviceCredential
from bastion.protocol.errors import AlreadyExists, NotFound
from bastion.storage.base import Duplicate, StoreBase
from bastion.storage.codec import dumps as _j


class DeviceStore(StoreBase):
    """The devices table."""

    @staticmethod
    def _device(row: dict[str, Any]) -> Device:
        cred = None
        if row["credential"]:
            c = json.loads(row["credential"])
            cred = DeviceCredential(
                id=c["id"],
                public_key_der=bytes.fromhex(c["public_key_der"]),
                attestation_type=c["attestation_type"],
                ek_pub_hash=c["ek_pub_hash"],
                ak_public=bytes.fromhex(c.get("ak_public", "")),
            )
        return Device(
            id=row["id"],
            asset_tag=row["asset_tag"],
            os_type=row["os_type"],
            enroll_status=row["enroll_status"],
            owner=row["owner"] or "",
            credential=cred,
            collected_data=tuple(json.loads(row["collected_data"] or "[]")),
            profile=json.loads(row["profile"] or "{}"),
            ek_pub_hash=row["ek_pub_hash"],
            created=row["created"] or 0.0,
            updated=row["updated"] or 0.0,
        )

    @staticmethod
    def _device_params(d: Device) -> tuple[Any, ...]:
        cred = None
        if d.credential is not None:
            cred = _j(
                {
                    "id": d.credential.id,
                    "public_key_der": d.credential.public_key_der.hex(),
                    "attestation_type": d.credential.attestation_type,
                    "ek_pub_hash": d.credential.ek_pub_hash,
                    "ak_public": d.credential.ak_public.hex(),
                }
            )
        return (
            d.asset_tag,
            d.os_type,
            d.enroll_status,
            d.owner,
            cred,
            _j(list(d.collected_data)),
            _j(d.profile),
            d.ek_pub_hash,
            d.updated,
            d.id,
        )

    def add_device(self, device: Device) -> Device:
        now = time.time()
        device = replace(device, id=device.id or str(uuid.uuid4()), created=now, updated=now)
        try:
            self._exec(
                "INSERT INTO devices (asset_tag, os_type, enroll_status, owner, credential, "
                "collected_data, profile, ek_pub_hash, updated, id, created) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (*self._device_params(device), now),
                unique=True,
            )
        except Duplicate:
            raise AlreadyExists(f'device "{device.asset_tag}" already exists') from None
        return device

    def find_device(self, asset_tag: str) -> Device | None:
        row = self._one("SELECT * FROM devices WHERE asset_tag = ?", (asset_tag,))
        return self._device(row) if row else None

    def get_device(self, asset_tag: str) -> Device:
        device = self.find_device(asset_tag)
        if device is None:
            raise NotFound(f'device "{asset_tag}" not found')
        return device

    def find_device_by_id(self, device_id: str) -> Device | None:
        row = self._one("SELECT * FROM devices WHERE id = ?", (device_id,))
        return self._device(row) if row else None

    def list_devices(self) -> list[Device]:
        return [self._device(r) for r in self._all("SELECT * FROM devices ORDER BY asset_tag")]

    def update_device(self, device: Device) -> Device:
        device = replace(device, updated=time.time())
        try:
            count = self._exec(
                "UPDATE devices SET asset_tag=?, os_type=?, enroll_status=?, owner=?, "
                "credential=?, collected_data=?, profile=?, ek_pub_hash=?, updated=? WHERE id=?",
                self._device_params(device),
                unique=True,
            )
        except Duplicate:
            raise AlreadyExists(f'device "{device.asset_tag}" already exists') from None
        if count != 1:
            raise NotFound(f'device "{device.asset_tag}" not found')
        return device

    def remove_device(self, asset_tag: str) -> None:
        """The device and its posture record (``bastion.storage.posture``)."""
        with self.transaction():
            self._execute(
                "DELETE FROM device_posture WHERE device_id IN "
                "(SELECT id FROM devices WHERE asset_tag = ?)",
                (asset_tag,),
            )
            if self._execute("DELETE FROM devices WHERE asset_tag = ?", (asset_tag,)) != 1:
                raise NotFound(f'device "{asset_tag}" not found')
