"""The SQL time-series store: the embedded default (SQLite) and PostgreSQL without InfluxDB.

Writes are one statement per table per batch: on PostgreSQL `INSERT ... SELECT FROM unnest(...)`
with arrays (the driver's bulk path, no per-row round trips), on SQLite an executemany; both
upsert on the primary key, so replaying a batch changes nothing.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import asyncpg
from sqlalchemy import TextClause, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from iotmeter.db.engine import Database, is_unavailable, unavailable
from iotmeter.errors import BackendUnavailable, IotmeterError, ValidationFailed
from iotmeter.readings import ReadingSet
from iotmeter.storage.timeseries.base import SeriesPoint, SeriesQuery

logger = logging.getLogger(__name__)

# One statement, one round trip, the arrays sent once: the points are upserted and the newest
# point per device and field moves `telemetry_latest` (a CTE that writes runs exactly once).
_PG_WRITE = """
WITH input AS (
    SELECT * FROM unnest(
        string_to_array($1, ','), string_to_array($2, ','), $3::bigint[], $4::float8[]
    ) AS point (device_id, field, epoch_us, value)
), written AS (
    INSERT INTO telemetry (device_id, field, epoch_us, value)
    SELECT device_id, field, epoch_us, value FROM input
    ON CONFLICT (device_id, field, epoch_us) DO UPDATE SET value = EXCLUDED.value
)
INSERT INTO telemetry_latest AS latest (device_id, field, epoch_us, value)
SELECT DISTINCT ON (device_id, field) device_id, field, epoch_us, value FROM input
ORDER BY device_id, field, epoch_us DESC
ON CONFLICT (device_id, field) DO UPDATE SET epoch_us = EXCLUDED.epoch_us, value = EXCLUDED.value
WHERE EXCLUDED.epoch_us >= latest.epoch_us
"""
_SQLITE_WRITE = """
INSERT INTO telemetry (device_id, field, epoch_us, value) VALUES (?, ?, ?, ?)
ON CONFLICT (device_id, field, epoch_us) DO UPDATE SET value = excluded.value
"""
_SQLITE_LATEST = """
INSERT INTO telemetry_latest (device_id, field, epoch_us, value) VALUES (?, ?, ?, ?)
ON CONFLICT (device_id, field) DO UPDATE SET epoch_us = excluded.epoch_us, value = excluded.value
WHERE excluded.epoch_us >= telemetry_latest.epoch_us
"""

# One series in time order: the primary key (device_id, field, epoch_us) serves it as a range
# scan that stops after `limit` rows (`query` orders by field in the C collation, which that
# index cannot serve, so a limited read there sorts the whole rest of the range).
_PG_SCAN = (
    "SELECT epoch_us, value FROM telemetry WHERE device_id = $1 AND field = $2 "
    "AND epoch_us >= $3 AND epoch_us < $4 ORDER BY epoch_us LIMIT $5"
)
_SQLITE_SCAN = (
    "SELECT epoch_us, value FROM telemetry WHERE device_id = ? AND field = ? "
    "AND epoch_us >= ? AND epoch_us < ? ORDER BY epoch_us LIMIT ?"
)

_AGGREGATE_SQL = {"mean": "AVG", "min": "MIN", "max": "MAX", "sum": "SUM", "count": "COUNT"}

Row = tuple[str, str, int, float]

_CONTENT_ERRORS = ("22", "23")
"""SQLSTATE classes of errors caused by the data written (data exception, integrity)."""


def _translated(exc: asyncpg.PostgresError) -> IotmeterError:
    """asyncpg's own errors (the write goes to the driver directly) as the project's: a fault of
    what was written is an `IotmeterError` (the runner finds the record that causes it); any
    other (connection, server shutting down, missing table, out of resources) means the store
    cannot take writes now."""
    state = str(exc.sqlstate or "")
    message = f"time-series write failed: {type(exc).__name__}: {exc}"
    if state[:2] in _CONTENT_ERRORS:
        return IotmeterError(message)
    if state[:2] == "42":
        message += " (is the schema up to date? run `iotmeter migrate`)"
    return BackendUnavailable(message)


def _query_failed(exc: BaseException) -> IotmeterError:
    """A failed query as the project's error, without the SQL text or its parameters (they
    belong in the log, never in a response): an unreachable database is a 503, anything else
    a 500 whose cause is logged here."""
    if is_unavailable(exc):
        return unavailable(exc)
    logger.error("time-series query failed", exc_info=exc)
    return IotmeterError("time-series query failed; see the server log")


@lru_cache(maxsize=256)
def _statement(sql: str) -> TextClause:
    """The same object for the same SQL: parsed once, and SQLAlchemy keeps its cache key."""
    return text(sql)


def _rows(readings: Sequence[ReadingSet]) -> tuple[list[Row], list[Row]]:
    """Deduplicated rows for `telemetry` (last write wins) and the newest per device/field."""
    points: dict[tuple[str, str, int], float] = {}
    newest: dict[tuple[str, str], tuple[int, float]] = {}
    for reading in readings:
        device_id, epoch_us = reading.device_id, reading.epoch_us
        for field, raw_value in reading.values.items():
            value = float(raw_value)
            points[(device_id, field, epoch_us)] = value
            known = newest.get((device_id, field))
            if known is None or known[0] <= epoch_us:
                newest[(device_id, field)] = (epoch_us, value)
    return (
        [(d, f, t, v) for (d, f, t), v in points.items()],
        [(d, f, t, v) for (d, f), (t, v) in newest.items()],
    )


Columns = tuple[list[str], list[str], list[int], list[float]]


def _point_columns(readings: Sequence[ReadingSet]) -> Columns:
    """Every point as four arrays, deduplicated (last write wins) only if it needs to be: a
    point repeats only when a (device, time) does, as a redelivered message does."""
    if len({(reading.device_id, reading.epoch_us) for reading in readings}) < len(readings):
        return _columns(_rows(readings)[0])
    devices: list[str] = []
    fields: list[str] = []
    times: list[int] = []
    values: list[float] = []
    for reading in readings:
        count = len(reading.values)
        devices.extend(itertools.repeat(reading.device_id, count))
        fields.extend(reading.values)
        times.extend(itertools.repeat(reading.epoch_us, count))
        values.extend(map(float, reading.values.values()))
    return devices, fields, times, values


def _columns(rows: list[Row]) -> Columns:
    return (
        [row[0] for row in rows],
        [row[1] for row in rows],
        [row[2] for row in rows],
        [row[3] for row in rows],
    )


class SqlTimeSeriesStore:
    """Readings in the `telemetry` table of the registry database."""

    tags_device_type = False

    def __init__(self, database: Database) -> None:
        self.database = database
        self.backend = f"sql ({database.dialect})"
        # Field order by code point on every database (PostgreSQL would follow its locale).
        self._bytewise = ' COLLATE "C"' if database.dialect == "postgresql" else ""

    async def write(self, readings: Sequence[ReadingSet]) -> None:
        """Upsert every value of every reading set in one transaction."""
        try:
            if self.database.dialect == "postgresql":
                devices, fields, times, values = _point_columns(readings)
                if not devices:
                    return
                # Device ids and field names as one comma-joined text each (neither may hold
                # a comma): asyncpg checks every element of a text[] argument in Python,
                # which cost 27 ms of CPU per 20,000 points against 12 ms this way.
                device_text, field_text = ",".join(devices), ",".join(fields)
                if device_text.count(",") + field_text.count(",") != 2 * (len(devices) - 1):
                    raise ValidationFailed("a device id or field name holds a comma")
                async with self.database.engine.begin() as connection:
                    raw = await connection.get_raw_connection()
                    driver: Any = raw.driver_connection
                    await driver.execute(_PG_WRITE, device_text, field_text, times, values)
                return
            points, newest = _rows(readings)
            if not points:
                return
            async with self.database.engine.begin() as connection:
                await self._write_sqlite(connection, points, newest)
        except (OperationalError, DBAPIError, OSError, asyncpg.InterfaceError) as exc:
            raise BackendUnavailable(f"time-series write failed: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise _translated(exc) from exc

    @staticmethod
    async def _write_sqlite(
        connection: AsyncConnection, points: list[Row], newest: list[Row]
    ) -> None:
        await connection.exec_driver_sql(_SQLITE_WRITE, points)
        await connection.exec_driver_sql(_SQLITE_LATEST, newest)

    async def query(self, query: SeriesQuery) -> list[SeriesPoint]:
        """Raw points, or one point per field and window (aligned to the epoch)."""
        if query.every_us is not None and query.every_us <= 0:
            raise ValidationFailed("a window (every) must be positive")
        if query.fields is not None and not query.fields:
            return []
        if query.limit < 1 or query.stop_us <= query.start_us:
            return []
        params: dict[str, Any] = {
            "device_id": query.device_id,
            "start": query.start_us,
            "stop": query.stop_us,
            "limit": query.limit,
        }
        where = "device_id = :device_id AND epoch_us >= :start AND epoch_us < :stop"
        if query.fields:
            names = [f"f{index}" for index in range(len(query.fields))]
            where += f" AND field IN ({', '.join(':' + name for name in names)})"
            params.update(zip(names, query.fields, strict=True))
        if query.every_us is None:
            sql = (
                f"SELECT field, epoch_us, value FROM telemetry WHERE {where} "
                f"ORDER BY field{self._bytewise}, epoch_us LIMIT :limit"
            )
        else:
            params["every"] = query.every_us
            # Floor, not truncation toward zero: windows before 1970 stay aligned too.
            bucket = "(epoch_us - (((epoch_us % :every) + :every) % :every))"
            if query.aggregate in ("first", "last"):
                order = "epoch_us" if query.aggregate == "first" else "epoch_us DESC"
                sql = (
                    "SELECT field, bucket, value FROM ("
                    f"SELECT field, {bucket} AS bucket, value, ROW_NUMBER() OVER ("
                    f"PARTITION BY field, {bucket} ORDER BY {order}) AS position "
                    f"FROM telemetry WHERE {where}) AS ranked "
                    f"WHERE position = 1 ORDER BY field{self._bytewise}, bucket LIMIT :limit"
                )
            else:
                function = _AGGREGATE_SQL[query.aggregate]
                sql = (
                    f"SELECT field, {bucket} AS bucket, {function}(value) FROM telemetry "
                    f"WHERE {where} GROUP BY field, bucket "
                    f"ORDER BY field{self._bytewise}, bucket LIMIT :limit"
                )
        try:
            async with self.database.autocommit_engine.connect() as connection:
                result = await connection.execute(_statement(sql), params)
                rows = result.all()
        except (OperationalError, DBAPIError, OSError) as exc:
            raise _query_failed(exc) from exc
        return [SeriesPoint(field, int(epoch_us), float(value)) for field, epoch_us, value in rows]

    async def scan(
        self, device_id: str, field: str, start_us: int, stop_us: int, limit: int
    ) -> list[tuple[int, float]]:
        """One series in time order, at most `limit` points (straight to the driver: an
        export reads millions of rows, and SQLAlchemy's row objects cost more than the query)."""
        if limit < 1 or stop_us <= start_us:
            return []
        try:
            async with self.database.autocommit_engine.connect() as connection:
                if self.database.dialect == "postgresql":
                    raw = await connection.get_raw_connection()
                    driver: Any = raw.driver_connection
                    records = await driver.fetch(
                        _PG_SCAN, device_id, field, start_us, stop_us, limit
                    )
                    return [(record[0], record[1]) for record in records]
                result = await connection.exec_driver_sql(
                    _SQLITE_SCAN, (device_id, field, start_us, stop_us, limit)
                )
                rows: list[Any] = list(result.all())
                return [(int(row[0]), float(row[1])) for row in rows]
        except (OperationalError, DBAPIError, OSError) as exc:
            raise _query_failed(exc) from exc
        except asyncpg.InterfaceError as exc:
            raise BackendUnavailable(f"time-series read failed: {exc}") from exc
        except asyncpg.PostgresError as exc:
            # Connection (08), operator intervention such as a shutdown (57), resources (53).
            if str(exc.sqlstate or "")[:2] in ("08", "53", "57"):
                raise BackendUnavailable(f"time-series read failed: {exc}") from exc
            raise _query_failed(exc) from exc

    async def latest(self, device_ids: Sequence[str]) -> dict[str, dict[str, SeriesPoint]]:
        if not device_ids:
            return {}
        names = [f"d{index}" for index in range(len(device_ids))]
        sql = (
            "SELECT device_id, field, epoch_us, value FROM telemetry_latest "
            f"WHERE device_id IN ({', '.join(':' + name for name in names)}) "
            "ORDER BY device_id, field"
        )
        try:
            async with self.database.autocommit_engine.connect() as connection:
                result = await connection.execute(
                    _statement(sql), dict(zip(names, device_ids, strict=True))
                )
                rows = result.all()
        except (OperationalError, DBAPIError, OSError) as exc:
            raise _query_failed(exc) from exc
        latest: dict[str, dict[str, SeriesPoint]] = {}
        for device_id, field, epoch_us, value in rows:
            latest.setdefault(device_id, {})[field] = SeriesPoint(field, epoch_us, float(value))
        return latest

    async def health(self) -> str | None:
        await self.database.ping()
        return self.backend
