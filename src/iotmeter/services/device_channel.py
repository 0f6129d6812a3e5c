"""Device channel rules: one MQTT credential per device, certificates, configuration state."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from iotmeter.db.models import DeviceCertificate
from iotmeter.devicelink.credentials import NewCredential, derive_password, new_credential
from iotmeter.errors import Conflict, NotFound, SettingsInvalid
from iotmeter.repositories.configs import ConfigRepository
from iotmeter.repositories.device_channel import ChannelRepository
from iotmeter.services.devices import (
    CERTIFICATES_CHANGED,
    CREDENTIALS_CHANGED,
    get_device,
    refuse_reserved,
)

if TYPE_CHECKING:
    from iotmeter.devicelink.certificates import DeviceCA


def _credentials_changed(session: AsyncSession) -> None:
    session.info[CREDENTIALS_CHANGED] = True


async def create_credential(
    session: AsyncSession, device_id: str, secret: bytes, reserved: frozenset[str]
) -> NewCredential:
    """Make or rotate the device's MQTT credential; the password is in the result only."""
    await get_device(session, device_id)
    refuse_reserved(device_id, reserved)
    credential = new_credential(secret, device_id)
    await ChannelRepository(session).put_credential(
        device_id, credential.nonce, credential.password_hash
    )
    _credentials_changed(session)
    return credential


async def revoke_credential(session: AsyncSession, device_id: str) -> None:
    await get_device(session, device_id)
    if not await ChannelRepository(session).delete_credential(device_id):
        raise NotFound(
            f"device {device_id!r} has no MQTT credential; create one with "
            f"POST /api/v1/devices/{device_id}/credentials"
        )
    _credentials_changed(session)


async def provision(
    session: AsyncSession, device_ids: Sequence[str], secret: bytes
) -> dict[str, str]:
    """Passwords of these (registered) devices, making credentials for those without one.
    Existing credentials are kept: the in-process simulator derives their passwords."""
    repository = ChannelRepository(session)
    have = await repository.nonces(device_ids)
    missing = [device_id for device_id in device_ids if device_id not in have]
    if missing:
        made = [new_credential(secret, device_id) for device_id in missing]
        await repository.add_missing_credentials(
            [(c.device_id, c.nonce, c.password_hash) for c in made]
        )
        _credentials_changed(session)
        have = await repository.nonces(device_ids)
    return {
        device_id: derive_password(secret, device_id, nonce) for device_id, nonce in have.items()
    }


async def issue_certificate(
    session: AsyncSession,
    device_id: str,
    ca: DeviceCA,
    csr_pem: bytes,
    days: int,
    *,
    secret: bytes,
    reserved: frozenset[str],
) -> tuple[DeviceCertificate, str]:
    """Sign the device's certificate request; the certificate row and its PEM.

    A device without an MQTT credential gets one, never shown: on Mosquitto the broker account
    (client and role) that iotmeter keeps for each credential is what lets a device that logs
    in by certificate publish and subscribe at all (the plugin denies by default)."""
    await get_device(session, device_id)
    refuse_reserved(device_id, reserved)
    # Signing takes milliseconds of CPU (RSA more): off the event loop.
    try:
        issued = await asyncio.to_thread(ca.sign_request, csr_pem, device_id, days)
    except SettingsInvalid as exc:  # the CA expired since start-up: the operator must act
        raise Conflict(str(exc)) from exc
    row = DeviceCertificate(
        serial=issued.serial_hex,
        device_id=device_id,
        fingerprint_sha256=issued.fingerprint_sha256,
        issued_at=issued.not_before.astimezone(UTC),
        expires_at=issued.not_after.astimezone(UTC),
        revoked_at=None,
    )
    repository = ChannelRepository(session)
    await repository.add_certificate(row)
    if await repository.credential(device_id) is None:
        account = new_credential(secret, device_id)
        await repository.put_credential(device_id, account.nonce, account.password_hash)
        _credentials_changed(session)
    return row, issued.pem


async def list_certificates(session: AsyncSession, device_id: str) -> Sequence[DeviceCertificate]:
    await get_device(session, device_id)
    return await ChannelRepository(session).certificates(device_id)


async def revoke_certificate(session: AsyncSession, device_id: str, serial: str) -> None:
    await get_device(session, device_id)
    # Serials compare as numbers: `openssl x509 -serial` prints them upper case, zero-padded.
    normalised = format(int(serial, 16), "x")
    if not await ChannelRepository(session).revoke_certificate(device_id, normalised):
        raise NotFound(f"device {device_id!r} has no certificate with serial {serial!r}")
    session.info[CERTIFICATES_CHANGED] = True


async def config_state(session: AsyncSession, device_id: str) -> dict[str, Any]:
    """Desired and reported configuration with their versions, and whether they agree."""
    device = await get_device(session, device_id)
    items = await ConfigRepository(session).list(device_id)
    desired = {item.key: item.value for item in items}
    in_sync = configs_in_sync(device.config_version, device.reported_config_version)
    return {
        "device_id": device_id,
        "desired": desired,
        "desired_version": device.config_version,
        "published_version": device.config_published_version,
        "reported": device.reported_config,
        "reported_version": device.reported_config_version,
        "reported_at": device.reported_at,
        "in_sync": in_sync,
        "items": items,
    }


def configs_in_sync(desired_version: int, reported_version: int | None) -> bool:
    """A device is in sync when it reported the version it was sent, or was never sent one."""
    return desired_version == 0 or reported_version == desired_version
