"""Device registry rules: one id per device, configs and alerts go with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from iotmeter.config import env_name
from iotmeter.db.base import utcnow
from iotmeter.db.models import Device, DeviceConfig
from iotmeter.errors import Conflict, LimitReached, NotFound
from iotmeter.repositories.configs import ConfigRepository
from iotmeter.repositories.device_channel import ChannelRepository
from iotmeter.repositories.devices import DeviceReader, DeviceRepository, DeviceRow

CHANGED_DEVICES = "iotmeter.changed_devices"
"""`session.info` key: ids of devices whose type or existence changed in this transaction; the
request's session dependency tells `AppState.devices_changed` once it has committed."""


CHANGED_CONFIGS = "iotmeter.changed_configs"
"""`session.info` key: ids of devices whose desired configuration changed (published again)."""
DELETED_DEVICES = "iotmeter.deleted_devices"
"""`session.info` key: ids of deleted devices (their broker account and retained topics go)."""

CREDENTIALS_CHANGED = "iotmeter.credentials_changed"
"""`session.info` key: set when a credential was made, rotated or revoked in this transaction
(the broker account reconciler runs once it has committed)."""
CERTIFICATES_CHANGED = "iotmeter.certificates_changed"
"""`session.info` key: a certificate was revoked (the revocation list is written again)."""


def _changed(session: AsyncSession, device_id: str) -> None:
    session.info.setdefault(CHANGED_DEVICES, set()).add(device_id)


async def _config_changed(session: AsyncSession, device_id: str) -> None:
    """A new desired configuration: a new version, published once the change commits."""
    await ChannelRepository(session).bump_config_version(device_id)
    session.info.setdefault(CHANGED_CONFIGS, set()).add(device_id)


def _device_not_found(device_id: str) -> NotFound:
    return NotFound(
        f"device {device_id!r} not found; create it with POST /api/v1/devices or check the id"
    )


async def get_device(session: AsyncSession, device_id: str) -> Device:
    """The device, or `NotFound` naming the id."""
    device = await DeviceRepository(session).get(device_id)
    if device is None:
        raise _device_not_found(device_id)
    return device


async def read_device(connection: AsyncConnection, device_id: str) -> DeviceRow:
    """The device as a row, for read-only answers (no ORM session); `NotFound` naming the id."""
    row = await DeviceReader(connection).get(device_id)
    if row is None:
        raise _device_not_found(device_id)
    return row


async def require_device(connection: AsyncConnection, device_id: str) -> None:
    """`NotFound` unless the device exists."""
    if not await DeviceReader(connection).exists(device_id):
        raise _device_not_found(device_id)


def refuse_reserved(device_id: str, reserved: frozenset[str]) -> None:
    """`Conflict` when the id is the username of a broker account that is not a device."""
    if device_id in reserved:
        raise Conflict(
            f"{device_id!r} is the MQTT username of iotmeter's own broker account: a device with "
            "this id could act as that account; choose another id"
        )


async def create_device(
    session: AsyncSession,
    fields: dict[str, Any],
    *,
    max_devices: int = 0,
    reserved: frozenset[str] = frozenset(),
) -> Device:
    """Register a device; a taken or reserved id, or no room under `max_devices` (0: no
    limit), is a `Conflict`."""
    refuse_reserved(fields["id"], reserved)
    repository = DeviceRepository(session)
    if await repository.get(fields["id"]) is not None:
        raise Conflict(f"device {fields['id']!r} already exists; choose another id or PATCH it")
    if await repository.room_for(max_devices) == 0:
        raise LimitReached(
            f"the registry holds {max_devices} devices, the most "
            f"{env_name('max_devices')} allows; delete devices no longer used, or raise the "
            "limit"
        )
    now = utcnow()
    device = Device(
        id=fields["id"],
        name=fields["name"],
        type=fields["type"],
        location=fields.get("location"),
        attributes=fields.get("metadata") or {},
        status=fields.get("status", "active"),
        created_at=now,
        updated_at=now,
    )
    try:
        async with session.begin_nested():
            await repository.add(device)
    except IntegrityError:
        raise Conflict(
            f"device {fields['id']!r} already exists; choose another id or PATCH it"
        ) from None
    _changed(session, device.id)
    return device


async def update_device(session: AsyncSession, device_id: str, changes: dict[str, Any]) -> Device:
    """Apply the given fields only."""
    device = await get_device(session, device_id)
    for name, value in changes.items():
        setattr(device, "attributes" if name == "metadata" else name, value)
    device.updated_at = utcnow()
    await session.flush()
    _changed(session, device_id)
    return device


async def delete_device(session: AsyncSession, device_id: str) -> None:
    """Delete a device with its configs and alerts (its telemetry and archive stay)."""
    if not await DeviceRepository(session).delete(device_id):
        raise _device_not_found(device_id)
    # Its credential goes with its row (foreign key); its certificates are revoked and stay
    # listed until they expire, so the revocation list keeps naming them.
    if await ChannelRepository(session).revoke_certificates_of(device_id):
        session.info[CERTIFICATES_CHANGED] = True
    session.info[CREDENTIALS_CHANGED] = True
    _changed(session, device_id)
    session.info.setdefault(DELETED_DEVICES, set()).add(device_id)


async def list_configs(session: AsyncSession, device_id: str) -> Sequence[DeviceConfig]:
    await get_device(session, device_id)
    return await ConfigRepository(session).list(device_id)


async def get_config(session: AsyncSession, device_id: str, key: str) -> DeviceConfig:
    await get_device(session, device_id)
    config = await ConfigRepository(session).get(device_id, key)
    if config is None:
        raise NotFound(f"device {device_id!r} has no config key {key!r}")
    return config


async def put_config(
    session: AsyncSession, device_id: str, key: str, value: Any, *, max_keys: int
) -> DeviceConfig:
    """Set one key; `Conflict` when it is new and the device has `max_keys` already."""
    await get_device(session, device_id)
    # First: the new version's UPDATE holds the device's row, so the configuration writes of
    # one device take turns (in any other order two of them can deadlock).
    await _config_changed(session, device_id)
    repository = ConfigRepository(session)
    if await repository.get(device_id, key) is None:
        await repository.lock(device_id)  # so two new keys at once cannot pass the cap
        if await repository.count(device_id) >= max_keys:
            raise Conflict(
                f"device {device_id!r} has {max_keys} config keys, the most allowed; "
                "delete one or replace the whole configuration"
            )
    return await repository.put(device_id, key, value)


async def delete_config(session: AsyncSession, device_id: str, key: str) -> None:
    await get_device(session, device_id)
    await _config_changed(session, device_id)  # first, see put_config (undone if not found)
    if not await ConfigRepository(session).delete(device_id, key):
        raise NotFound(f"device {device_id!r} has no config key {key!r}")


async def replace_configs(
    session: AsyncSession, device_id: str, values: dict[str, Any]
) -> Sequence[DeviceConfig]:
    """Make the device's configuration exactly `values`."""
    await get_device(session, device_id)
    await _config_changed(session, device_id)  # first, see put_config
    repository = ConfigRepository(session)
    # Without the lock, two replacements at once could leave a mix of both bodies.
    await repository.lock(device_id)
    await repository.delete_all(device_id)
    await repository.insert_many(device_id, values)
    return await repository.list(device_id)
