"""SQL for devices."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Row,
    Select,
    String,
    Table,
    and_,
    bindparam,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from iotmeter.db.base import utcnow
from iotmeter.db.models import Device, DeviceSeries


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


_DEVICES = Device.__table__
assert isinstance(_DEVICES, Table)
# The ORM attribute names, so a row reads like a `Device` (`row.attributes`).
_DEVICE_COLUMNS = [
    column.label("attributes") if column.name == "metadata" else column for column in _DEVICES.c
]
_GET = select(*_DEVICE_COLUMNS).where(_DEVICES.c.id == bindparam("device_id"))
_EXISTS = select(_DEVICES.c.id).where(_DEVICES.c.id == bindparam("device_id"))
_SEARCH = bindparam("search", type_=String)
_FILTERS: dict[str, ColumnElement[bool]] = {
    "type": _DEVICES.c.type == bindparam("type"),
    "status": _DEVICES.c.status == bindparam("status"),
    "location": _DEVICES.c.location == bindparam("location"),
    "search": or_(
        func.lower(_DEVICES.c.id).like(_SEARCH, escape="\\"),
        func.lower(_DEVICES.c.name).like(_SEARCH, escape="\\"),
    ),
    "connected": _DEVICES.c.connected.is_(True),
    "not_connected": or_(_DEVICES.c.connected.is_(False), _DEVICES.c.connected.is_(None)),
    # Matches `services.device_channel.configs_in_sync`.
    "config_in_sync": or_(
        _DEVICES.c.config_version == 0,
        _DEVICES.c.reported_config_version == _DEVICES.c.config_version,
    ),
    "config_out_of_sync": and_(
        _DEVICES.c.config_version != 0,
        or_(
            _DEVICES.c.reported_config_version.is_(None),
            _DEVICES.c.reported_config_version != _DEVICES.c.config_version,
        ),
    ),
}


@cache  # one entry per combination of filters: 144 at most
def _list_statements(filters: tuple[str, ...]) -> tuple[Select[Any], Select[Any]]:
    """The page with the total of every match in one statement, and the total alone.

    Built once per combination, with the values as parameters: a statement object that is
    reused keeps its cache key, which SQLAlchemy would otherwise compute on each request.
    """
    conditions = [_FILTERS[name] for name in filters]
    count = select(func.count()).select_from(_DEVICES).where(*conditions)
    page = (
        select(*_DEVICE_COLUMNS, count.scalar_subquery().label("total"))
        .where(*conditions)
        .order_by(_DEVICES.c.id)
        .limit(bindparam("limit", type_=Integer))
        .offset(bindparam("offset", type_=Integer))
    )
    return page, count


_DEVICE_FIELDS = tuple(column.name for column in _DEVICE_COLUMNS)
_REGISTRATION_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
_REGISTRATION_LOCK_KEY = 0x696F746D_64657673  # "iotm" "devs": iotmeter's device registrations
_TYPES_OF_ARRAY = text("SELECT id, type FROM devices WHERE id = ANY(CAST(:ids AS varchar[]))")

DeviceRow = dict[str, Any]
"""A device as read by `DeviceReader`: the attributes of `Device` by name, without the ORM."""


def _device(row: Row[*tuple[Any, ...]]) -> DeviceRow:
    # zip() stops at the device's columns (a page's rows carry the total after them), and is
    # several times faster than Row._asdict().
    return dict(zip(_DEVICE_FIELDS, row, strict=False))


class DeviceReader:
    """Device reads on a plain connection (no ORM session): one statement, one round trip."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def get(self, device_id: str) -> DeviceRow | None:
        result = await self.connection.execute(_GET, {"device_id": device_id})
        row = result.first()
        return None if row is None else _device(row)

    async def exists(self, device_id: str) -> bool:
        result = await self.connection.execute(_EXISTS, {"device_id": device_id})
        return result.first() is not None

    async def list(
        self,
        *,
        type: str | None = None,
        status: str | None = None,
        location: str | None = None,
        search: str | None = None,
        connected: bool | None = None,
        config_in_sync: bool | None = None,
        limit: int,
        offset: int,
    ) -> tuple[Sequence[DeviceRow], int]:
        """A page ordered by id and the count of every match, in one statement."""
        filters: dict[str, str] = {}
        flags: list[str] = []
        if connected is not None:
            flags.append("connected" if connected else "not_connected")
        if config_in_sync is not None:
            flags.append("config_in_sync" if config_in_sync else "config_out_of_sync")
        if type is not None:
            filters["type"] = type
        if status is not None:
            filters["status"] = status
        if location is not None:
            filters["location"] = location
        if search:
            filters["search"] = f"%{_escape_like(search.lower())}%"
        page, count = _list_statements((*filters, *flags))
        result = await self.connection.execute(page, {**filters, "limit": limit, "offset": offset})
        rows = result.all()
        if rows:
            return [_device(row) for row in rows], int(rows[0].total)
        if offset == 0:
            return [], 0
        # A page past the end has no row to carry the count.
        return [], int(await self.connection.scalar(count, filters) or 0)


class DeviceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, device_id: str) -> Device | None:
        return await self.session.get(Device, device_id)

    async def add(self, device: Device) -> Device:
        self.session.add(device)
        await self.session.flush()
        return device

    async def delete(self, device_id: str) -> bool:
        """Delete a device (its configs and alerts go by ON DELETE CASCADE); False if absent.

        One statement with no prior read, so of two requests at once only one deletes it.
        """
        deleted = await self.session.scalar(
            delete(Device).where(Device.id == device_id).returning(Device.id)
        )
        if deleted is not None:
            await self.session.execute(
                delete(DeviceSeries).where(DeviceSeries.device_id == device_id)
            )
        return deleted is not None

    async def types_of(self, device_ids: Iterable[str]) -> dict[str, str]:
        """The registered type of each of these devices that exists."""
        ids = list(device_ids)
        if not ids:
            return {}
        if self.session.get_bind().dialect.name == "postgresql":
            # One array parameter, one statement text whatever the number of devices: an IN
            # list would make a new prepared statement (on every pooled connection) for
            # each batch size the collector happens to see.
            rows = await self.session.execute(_TYPES_OF_ARRAY, {"ids": ids})
        else:
            rows = await self.session.execute(
                select(Device.id, Device.type).where(Device.id.in_(ids))
            )
        return {str(device_id): str(device_type) for device_id, device_type in rows}

    async def count(self) -> int:
        return int(await self.session.scalar(select(func.count()).select_from(Device)) or 0)

    async def hold_registrations(self) -> None:
        """Serialise device creation until this transaction ends, so that a limit on the number
        of devices holds with several writers: a transaction-scoped advisory lock on PostgreSQL.
        SQLite has no such lock; there two creations at the same instant may both pass."""
        if self.session.get_bind().dialect.name == "postgresql":
            await self.session.execute(_REGISTRATION_LOCK, {"key": _REGISTRATION_LOCK_KEY})

    async def room_for(self, limit: int) -> int | None:
        """How many more devices `limit` allows (None: no limit), holding registrations."""
        if not limit:
            return None
        await self.hold_registrations()
        return max(0, limit - await self.count())

    async def register_missing(self, devices: dict[str, str], *, limit: int = 0) -> dict[str, str]:
        """Insert the devices (id -> type) that do not exist yet; existing ones are untouched.

        With a `limit` on the number of devices, only the first ones that fit are inserted.
        Returns the devices inserted (or found registered meanwhile)."""
        room = await self.room_for(limit)
        if room is not None and room < len(devices):
            devices = dict(list(devices.items())[:room])
        if not devices:
            return {}
        now = utcnow()
        rows = [
            {
                "id": device_id,
                "name": device_id,
                "type": device_type,
                "attributes": {"registered_by": "collector"},
                "status": "active",
                "created_at": now,
                "updated_at": now,
            }
            for device_id, device_type in devices.items()
        ]
        dialect = self.session.get_bind().dialect.name
        insert_ = postgresql_insert if dialect == "postgresql" else sqlite_insert
        await self.session.execute(insert_(Device).on_conflict_do_nothing(), rows)
        return devices

    async def touch_last_seen(self, seen: dict[str, datetime]) -> None:
        """Move each device's last_seen_at forward (never back): one statement per batch."""
        if not seen:
            return
        if self.session.get_bind().dialect.name == "postgresql":
            await self.session.execute(
                text(
                    "UPDATE devices SET last_seen_at = seen.at FROM ("
                    "SELECT unnest(CAST(:ids AS varchar[])) AS id, "
                    "unnest(CAST(:ats AS timestamptz[])) AS at) AS seen "
                    "WHERE devices.id = seen.id "
                    "AND (devices.last_seen_at IS NULL OR devices.last_seen_at < seen.at)"
                ),
                {"ids": list(seen), "ats": list(seen.values())},
            )
            return
        # SQLite runs in-process: an executemany has no round trips to save.
        table = Device.__table__
        assert isinstance(table, Table)
        connection = await self.session.connection()
        await connection.execute(
            update(table)
            .where(
                table.c.id == bindparam("device_id"),
                or_(table.c.last_seen_at.is_(None), table.c.last_seen_at < bindparam("seen_at")),
            )
            .values(last_seen_at=bindparam("seen_at")),
            [{"device_id": key, "seen_at": value} for key, value in seen.items()],
        )

    async def count_by_type(self) -> dict[str, int]:
        rows = await self.session.execute(select(Device.type, func.count()).group_by(Device.type))
        return {str(key): int(count) for key, count in rows}

    async def count_seen_since(self, since: datetime) -> int:
        count = await self.session.scalar(
            select(func.count()).select_from(Device).where(Device.last_seen_at >= since)
        )
        return count or 0
