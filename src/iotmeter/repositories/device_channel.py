"""SQL for the device channel: credentials, certificates, configuration versions, status."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    DateTime,
    Integer,
    Table,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from iotmeter.db.base import utcnow
from iotmeter.db.models import Device, DeviceCertificate, DeviceConfig, DeviceCredential

_DEVICES = cast(Table, Device.__table__)
_CREDENTIALS = cast(Table, DeviceCredential.__table__)


@dataclass(frozen=True, slots=True)
class StatusChange:
    connected: bool
    at: datetime
    retained: bool
    """A retained message replayed at subscription: applied only when it changes the state
    (it says what the device is now, not when that began)."""


@dataclass(frozen=True, slots=True)
class ReportedConfig:
    version: int
    config: dict[str, Any]
    at: datetime
    retained: bool


class ChannelRepository:
    """The device channel's SQL on an ORM session (one transaction per call site)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def _insert(self) -> Any:
        postgresql = self.session.get_bind().dialect.name == "postgresql"
        return postgresql_insert if postgresql else sqlite_insert

    # --- credentials --------------------------------------------------------------------

    async def credential(self, device_id: str) -> DeviceCredential | None:
        return await self.session.get(DeviceCredential, device_id)

    async def put_credential(self, device_id: str, nonce: str, password_hash: str) -> None:
        """Create or replace the device's credential (rotation: a new nonce and hash)."""
        statement = self._insert()(DeviceCredential).values(
            device_id=device_id, nonce=nonce, password_hash=password_hash, created_at=utcnow()
        )
        statement = statement.on_conflict_do_update(
            index_elements=[DeviceCredential.device_id],
            set_={
                "nonce": statement.excluded.nonce,
                "password_hash": statement.excluded.password_hash,
                "created_at": statement.excluded.created_at,
            },
        )
        await self.session.execute(statement)

    async def add_missing_credentials(self, rows: Sequence[tuple[str, str, str]]) -> None:
        """(device id, nonce, hash) for devices without a credential; existing ones stay."""
        if not rows:
            return
        now = utcnow()
        statement = self._insert()(DeviceCredential).on_conflict_do_nothing(
            index_elements=[DeviceCredential.device_id]
        )
        await self.session.execute(
            statement,
            [
                {"device_id": d, "nonce": n, "password_hash": h, "created_at": now}
                for d, n, h in rows
            ],
        )

    async def delete_credential(self, device_id: str) -> bool:
        deleted = await self.session.scalar(
            delete(DeviceCredential)
            .where(DeviceCredential.device_id == device_id)
            .returning(DeviceCredential.device_id)
        )
        return deleted is not None

    async def nonces(self, device_ids: Sequence[str]) -> dict[str, str]:
        rows = await self.session.execute(
            select(DeviceCredential.device_id, DeviceCredential.nonce).where(
                DeviceCredential.device_id.in_(device_ids)
            )
        )
        return dict(rows.all())

    async def broker_accounts(self) -> dict[str, tuple[str, str | None]]:
        """device id -> (nonce, nonce the managed broker has)."""
        rows = await self.session.execute(
            select(
                DeviceCredential.device_id, DeviceCredential.nonce, DeviceCredential.broker_nonce
            )
        )
        return {device_id: (nonce, applied) for device_id, nonce, applied in rows}

    async def mark_broker_nonces(self, applied: Mapping[str, str]) -> None:
        if not applied:
            return
        table = _CREDENTIALS
        connection = await self.session.connection()
        await connection.execute(
            update(table)
            .where(table.c.device_id == bindparam("b_device_id"))
            .values(broker_nonce=bindparam("b_nonce")),
            [{"b_device_id": d, "b_nonce": n} for d, n in applied.items()],
        )

    # --- certificates -------------------------------------------------------------------

    async def add_certificate(self, certificate: DeviceCertificate) -> None:
        self.session.add(certificate)
        await self.session.flush()

    async def certificates(self, device_id: str) -> Sequence[DeviceCertificate]:
        rows = await self.session.scalars(
            select(DeviceCertificate)
            .where(DeviceCertificate.device_id == device_id)
            .order_by(DeviceCertificate.issued_at)
        )
        return rows.all()

    async def revoke_certificate(self, device_id: str, serial: str) -> bool:
        """Revoke one certificate of the device; False if it has none with that serial."""
        certificate = await self.session.get(DeviceCertificate, serial)
        if certificate is None or certificate.device_id != device_id:
            return False
        if certificate.revoked_at is None:
            certificate.revoked_at = utcnow()
            await self.session.flush()
        return True

    async def revoke_certificates_of(self, device_id: str) -> int:
        result = await self.session.execute(
            update(DeviceCertificate)
            .where(DeviceCertificate.device_id == device_id, DeviceCertificate.revoked_at.is_(None))
            .values(revoked_at=utcnow())
            .returning(DeviceCertificate.serial)
        )
        return len(result.all())

    async def revoked_certificates(self) -> list[tuple[str, datetime]]:
        """Revoked certificates not yet expired (what a revocation list must name)."""
        rows = await self.session.execute(
            select(DeviceCertificate.serial, DeviceCertificate.revoked_at)
            .where(
                DeviceCertificate.revoked_at.is_not(None),
                DeviceCertificate.expires_at > utcnow(),
            )
            .order_by(DeviceCertificate.serial)
        )
        return [(serial, revoked_at) for serial, revoked_at in rows if revoked_at]

    # --- configuration ------------------------------------------------------------------

    async def bump_config_version(self, device_id: str) -> int:
        """The desired configuration changed: its version grows by one (in this transaction,
        with the change, so a version always names one configuration)."""
        version = await self.session.scalar(
            update(Device)
            .where(Device.id == device_id)
            .values(config_version=Device.config_version + 1, updated_at=Device.updated_at)
            .returning(Device.config_version)
        )
        return int(version or 0)

    async def unpublished(self, limit: int, *, lock: bool = False) -> list[tuple[str, int]]:
        """Devices whose desired configuration changed since it was last published (with
        `lock`, their rows held to the end of the transaction; rows another transaction holds
        are skipped on PostgreSQL)."""
        statement = (
            select(Device.id, Device.config_version)
            .where(Device.config_version > Device.config_published_version)
            .order_by(Device.id)
            .limit(limit)
        )
        if lock and self.session.get_bind().dialect.name == "postgresql":
            statement = statement.with_for_update(skip_locked=True)
        rows = await self.session.execute(statement)
        return [(device_id, int(version)) for device_id, version in rows]

    async def desired(self, device_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        rows = await self.session.execute(
            select(DeviceConfig.device_id, DeviceConfig.key, DeviceConfig.value)
            .where(DeviceConfig.device_id.in_(device_ids))
            .order_by(DeviceConfig.device_id, DeviceConfig.key)
        )
        configs: dict[str, dict[str, Any]] = {device_id: {} for device_id in device_ids}
        for device_id, key, value in rows:
            configs[device_id][key] = value
        return configs

    async def mark_published(self, published: Mapping[str, int]) -> None:
        if not published:
            return
        table = _DEVICES
        connection = await self.session.connection()
        await connection.execute(
            update(table)
            .where(
                table.c.id == bindparam("b_id"),
                table.c.config_published_version < bindparam("b_version"),
            )
            .values(config_published_version=bindparam("b_version")),
            [{"b_id": d, "b_version": v} for d, v in published.items()],
        )

    async def channel_counts(self) -> tuple[int, int]:
        """(devices connected, devices whose reported configuration lags the desired one)."""
        c = _DEVICES.c
        row = (
            await self.session.execute(
                select(
                    func.count().filter(c.connected.is_(True)),
                    func.count().filter(
                        c.config_version != 0,
                        or_(
                            c.reported_config_version.is_(None),
                            c.reported_config_version != c.config_version,
                        ),
                    ),
                ).select_from(_DEVICES)
            )
        ).one()
        return int(row[0]), int(row[1])

    # --- what devices tell ----------------------------------------------------------------

    async def apply_status(self, changes: Mapping[str, StatusChange]) -> None:
        """Record connection status changes of registered devices (others are ignored)."""
        if not changes:
            return
        table = _DEVICES
        c = table.c
        connected = bindparam("b_connected", type_=Boolean)
        at = bindparam("b_at", type_=DateTime(timezone=True))
        retained = bindparam("b_retained", type_=Boolean)
        statement = (
            update(table)
            .where(
                c.id == bindparam("b_id"),
                or_(
                    retained.is_(False),
                    c.connected.is_(None),
                    c.connected != connected,
                ),
            )
            .values(
                connected=connected,
                last_connected_at=case((connected, at), else_=c.last_connected_at),
                last_disconnected_at=case((connected, c.last_disconnected_at), else_=at),
            )
        )
        connection = await self.session.connection()
        await connection.execute(
            statement,
            [
                {"b_id": d, "b_connected": s.connected, "b_at": s.at, "b_retained": s.retained}
                for d, s in changes.items()
            ],
        )

    async def apply_reported(self, reports: Mapping[str, ReportedConfig]) -> None:
        if not reports:
            return
        table = _DEVICES
        c = table.c
        version = bindparam("b_version", type_=Integer)
        statement = (
            update(table)
            .where(
                c.id == bindparam("b_id"),
                or_(
                    bindparam("b_retained", type_=Boolean).is_(False),
                    c.reported_config_version.is_(None),
                    c.reported_config_version != version,
                ),
            )
            .values(
                reported_config_version=version,
                reported_config=bindparam("b_config", type_=c.reported_config.type),
                reported_at=bindparam("b_at"),
            )
        )
        connection = await self.session.connection()
        await connection.execute(
            statement,
            [
                {
                    "b_id": d,
                    "b_version": r.version,
                    "b_config": r.config,
                    "b_at": r.at,
                    "b_retained": r.retained,
                }
                for d, r in reports.items()
            ],
        )


async def credential_hash(connection: AsyncConnection, device_id: str) -> str | None:
    """The password hash of the device's credential (None: it has none)."""
    table = DeviceCredential.__table__
    result = await connection.execute(
        select(table.c.password_hash).where(table.c.device_id == device_id)
    )
    return result.scalar_one_or_none()


async def certificate_revoked(connection: AsyncConnection, serial: str) -> bool:
    """True when iotmeter revoked the certificate with this serial (unknown serials: False,
    the CA's signature is what vouches for them)."""
    table = DeviceCertificate.__table__
    result = await connection.execute(
        select(table.c.revoked_at).where(table.c.serial == serial.lower())
    )
    return result.scalar_one_or_none() is not None
