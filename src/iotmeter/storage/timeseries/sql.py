"""The SQL time-series store: the embedded default (SQLite) and PostgreSQL without InfluxDB.

Writes are one statement per table per batch: on PostgreSQL `INSERT ... SELECT FROM unnest(...)`
with arrays (the driver's bulk path, no per-row round trips), on SQLite an executemany; both
upsert on the primary key, so replaying a batch changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import asyncpg
from sqlalchemy import TextClause, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from iotmeter.db.engine import Database, is_unavailable, unavailable
from iotmeter.errors import BackendUnavailable, IotmeterError, ValidationFailed
from iotmeter.readings import ReadingSet
from iotmeter.storage.timeseries import compaction, partitions
from iotmeter.storage.timeseries.base import SeriesPoint, SeriesQuery
from iotmeter.storage.timeseries.compaction import CompactionRound
from iotmeter.storage.timeseries.points import one_series_scan, raw_and_compact
from iotmeter.storage.timeseries.rollups import (
    LATE_US,
    MINUTE_US,
    Clock,
    Coverage,
    Rollups,
    floor_to,
    levels_for,
    read_windows,
    system_clock_us,
    window_start,
)
from iotmeter.storage.usage import StoreUsage

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
# Minutes of late readings (written well after their time): recomputed by the rollups.
# DO UPDATE, not DO NOTHING: it locks an existing mark, so a worker claiming that mark at the
# same time waits for this transaction, finds a newer version of the row and leaves it (the
# mark survives for the reading it did not see); DO NOTHING would let it go.
_PG_MARK = """
INSERT INTO telemetry_rollup_dirty (device_id, field, bucket_us)
SELECT * FROM unnest(string_to_array($1, ','), string_to_array($2, ','), $3::bigint[])
ON CONFLICT (device_id, field, bucket_us) DO UPDATE SET bucket_us = EXCLUDED.bucket_us
"""
_SQLITE_MARK = """
INSERT INTO telemetry_rollup_dirty (device_id, field, bucket_us) VALUES (?, ?, ?)
ON CONFLICT (device_id, field, bucket_us) DO UPDATE SET bucket_us = excluded.bucket_us
"""
_SQLITE_LATEST = """
INSERT INTO telemetry_latest (device_id, field, epoch_us, value) VALUES (?, ?, ?, ?)
ON CONFLICT (device_id, field) DO UPDATE SET epoch_us = excluded.epoch_us, value = excluded.value
WHERE excluded.epoch_us >= telemetry_latest.epoch_us
"""

# One series in time order: the primary key (device_id, field, epoch_us) serves it as a range
# scan that stops after `limit` rows (`query` orders by field in the C collation, which that
# index cannot serve, so a limited read there sorts the whole rest of the range); on
# PostgreSQL the compacted hours too, in the same order.
_PG_SCAN = one_series_scan(compact=True)
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


DAY_US = partitions.DAY_US
ROLLUP_LOCK_KEY = 0x10_7E_7E_60
SQLITE_DELETE_CHUNK = 5_000
"""Rows one SQLite retention statement deletes (a short write lock each)."""


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """Retention and rollups of the SQL store (from `IOTMETER_TELEMETRY_RETENTION_DAYS` ...)."""

    retention_us: int | None = None
    rollup_retention_us: int | None = None
    rollups: bool = True
    compaction: bool = True
    partitions_ahead: int = 3

    def cutoff_us(self, now_us: int) -> int | None:
        return None if self.retention_us is None else now_us - self.retention_us

    def rollup_cutoff_us(self, now_us: int) -> int | None:
        keep = self.rollup_retention_us or self.retention_us
        return None if keep is None else now_us - keep


class SqlTimeSeriesStore:
    """Readings in the `telemetry` table of the registry database."""

    tags_device_type = False

    def __init__(
        self,
        database: Database,
        *,
        lifecycle: Lifecycle | None = None,
        clock: Clock = system_clock_us,
    ) -> None:
        self.database = database
        self.backend = f"sql ({database.dialect})"
        # Field order by code point on every database (PostgreSQL would follow its locale).
        self._bytewise = ' COLLATE "C"' if database.dialect == "postgresql" else ""
        self.lifecycle = lifecycle or Lifecycle()
        self.clock = clock
        self.compacts = database.dialect == "postgresql"
        """Whether reads include the compacted hours (PostgreSQL: always, compaction on or
        off, so that hours compacted earlier stay readable)."""
        self.rollups = (
            Rollups(database, clock=clock, compact=self.compacts)
            if self.lifecycle.rollups
            else None
        )
        self.expired_skipped = 0
        """Readings not written because they were older than the retention."""
        self.rollup_queries = 0
        """Queries answered from rollups."""
        self.compaction_rounds = 0
        self.compacted_hours = 0

    def _kept(self, readings: Sequence[ReadingSet]) -> Sequence[ReadingSet]:
        """The readings inside the retention (an expired day's partition may be gone)."""
        cutoff = self.lifecycle.cutoff_us(self.clock())
        if cutoff is None or all(reading.epoch_us >= cutoff for reading in readings):
            return readings
        kept = [reading for reading in readings if reading.epoch_us >= cutoff]
        self.expired_skipped += len(readings) - len(kept)
        return kept

    def _late_marks(self, columns: Columns) -> Columns | None:
        """(device, field, minute) of the points written long after their time, whose
        rollup windows must be recomputed; None when there is none (the usual case)."""
        if self.rollups is None:
            return None
        devices, fields, times, _ = columns
        late_before = self.clock() - LATE_US
        if not times or min(times) >= late_before:
            return None
        marks = {
            (device, field, floor_to(epoch_us, MINUTE_US))
            for device, field, epoch_us in zip(devices, fields, times, strict=True)
            if epoch_us < late_before
        }
        return (
            [mark[0] for mark in marks],
            [mark[1] for mark in marks],
            [mark[2] for mark in marks],
            [],
        )

    async def write(self, readings: Sequence[ReadingSet]) -> None:
        """Upsert every value of every reading set in one transaction."""
        readings = self._kept(readings)
        try:
            if self.database.dialect == "postgresql":
                columns = _point_columns(readings)
                if not columns[0]:
                    return
                try:
                    await self._write_postgresql(columns)
                except asyncpg.CheckViolationError as exc:
                    if "no partition" not in str(exc):
                        raise
                    # An hour without its partition: the lifecycle task makes them ahead, so
                    # a late reading for an hour compacted (and dropped) since, or a store
                    # used without the task. Only the hours the batch has are made.
                    hours = {floor_to(epoch_us, partitions.HOUR_US) for epoch_us in columns[2]}
                    async with self._driver() as driver:
                        for hour in sorted(hours):
                            await partitions.ensure_days(driver, "telemetry", hour, hour)
                    await self._write_postgresql(columns)
                return
            points, newest = _rows(readings)
            if not points:
                return
            marks = self._late_marks(_columns(points))
            async with self.database.engine.begin() as connection:
                await self._write_sqlite(connection, points, newest, marks)
        except (OperationalError, DBAPIError, OSError, asyncpg.InterfaceError) as exc:
            raise BackendUnavailable(f"time-series write failed: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise _translated(exc) from exc

    async def _write_postgresql(self, columns: Columns) -> None:
        devices, fields, times, values = columns
        # Device ids and field names as one comma-joined text each (neither may hold a
        # comma): asyncpg checks every element of a text[] argument in Python, which cost
        # 27 ms of CPU per 20,000 points against 12 ms this way.
        device_text, field_text = ",".join(devices), ",".join(fields)
        if device_text.count(",") + field_text.count(",") != 2 * (len(devices) - 1):
            raise ValidationFailed("a device id or field name holds a comma")
        marks = self._late_marks(columns)
        async with self.database.engine.begin() as connection:
            raw = await connection.get_raw_connection()
            driver: Any = raw.driver_connection
            await driver.execute(_PG_WRITE, device_text, field_text, times, values)
            if marks is not None:
                # The same transaction: the mark exists exactly when the reading does.
                await driver.execute(_PG_MARK, ",".join(marks[0]), ",".join(marks[1]), marks[2])

    @staticmethod
    async def _write_sqlite(
        connection: AsyncConnection,
        points: list[Row],
        newest: list[Row],
        marks: Columns | None,
    ) -> None:
        await connection.exec_driver_sql(_SQLITE_WRITE, points)
        await connection.exec_driver_sql(_SQLITE_LATEST, newest)
        if marks is not None:
            await connection.exec_driver_sql(
                _SQLITE_MARK, list(zip(marks[0], marks[1], marks[2], strict=True))
            )

    async def query(self, query: SeriesQuery) -> list[SeriesPoint]:
        """Raw points, or one point per field and window (aligned to the epoch)."""
        if query.every_us is not None and query.every_us <= 0:
            raise ValidationFailed("a window (every) must be positive")
        if query.fields is not None and not query.fields:
            return []
        if query.limit < 1 or query.stop_us <= query.start_us:
            return []
        if query.fields is None:
            # Every field by name: the primary key (device, field, time) then serves each
            # field's time range; with the device alone it reads the device's whole history
            # (PostgreSQL 15 has no skip scan) to find the range.
            fields = await self._fields_of(query.device_id)
            if not fields:
                return []
            query = dataclasses.replace(query, fields=fields)
        params: dict[str, Any] = {
            "device_id": query.device_id,
            "start": query.start_us,
            "stop": query.stop_us,
            "limit": query.limit,
        }
        raw_where = "r.device_id = :device_id AND r.epoch_us >= :start AND r.epoch_us < :stop"
        compact_where = "c.device_id = :device_id"
        if query.fields:
            names = [f"f{index}" for index in range(len(query.fields))]
            placeholders = ", ".join(":" + name for name in names)
            raw_where += f" AND r.field IN ({placeholders})"
            compact_where += f" AND c.field IN ({placeholders})"
            params.update(zip(names, query.fields, strict=True))
        source = raw_and_compact(
            compact=self.compacts,
            raw_where=raw_where,
            compact_where=compact_where,
            start=":start",
            stop=":stop",
        )
        if query.every_us is None:
            sql = (
                f"SELECT t.field, t.epoch_us, t.value FROM {source} "
                f"ORDER BY t.field{self._bytewise}, t.epoch_us LIMIT :limit"
            )
        else:
            params["every"] = query.every_us
            bucket = window_start("t.epoch_us", ":every")
            if query.aggregate in ("first", "last"):
                order = "t.epoch_us" if query.aggregate == "first" else "t.epoch_us DESC"
                sql = (
                    "SELECT field, bucket, value FROM ("
                    f"SELECT t.field AS field, {bucket} AS bucket, t.value AS value, "
                    f"ROW_NUMBER() OVER (PARTITION BY t.field, {bucket} ORDER BY {order}) "
                    f"AS position FROM {source}) AS ranked "
                    f"WHERE position = 1 ORDER BY field{self._bytewise}, bucket LIMIT :limit"
                )
            else:
                function = _AGGREGATE_SQL[query.aggregate]
                sql = (
                    f"SELECT t.field AS field, {bucket} AS bucket, {function}(t.value) "
                    f"FROM {source} GROUP BY t.field, bucket "
                    f"ORDER BY field{self._bytewise}, bucket LIMIT :limit"
                )
        try:
            async with self.database.autocommit_engine.connect() as connection:
                levels = levels_for(query.every_us) if query.every_us is not None else []
                if self.rollups is not None and levels:
                    coverage = await self.rollups.coverage(connection)
                    chain = [
                        (level, coverage[level.name]) for level in levels if level.name in coverage
                    ]
                    points = (
                        await read_windows(
                            connection,
                            self.database.dialect,
                            query,
                            chain,
                            compact=self.compacts,
                        )
                        if chain
                        else None
                    )
                    if points is not None:
                        self.rollup_queries += 1
                        return points
                result = await connection.execute(_statement(sql), params)
                rows = result.all()
        except (OperationalError, DBAPIError, OSError) as exc:
            raise _query_failed(exc) from exc
        return [SeriesPoint(field, int(epoch_us), float(value)) for field, epoch_us, value in rows]

    async def _fields_of(self, device_id: str) -> list[str]:
        """The fields a device has ever sent (`telemetry_latest` has one row for each,
        written with the points)."""
        try:
            async with self.database.autocommit_engine.connect() as connection:
                result = await connection.execute(
                    _statement("SELECT field FROM telemetry_latest WHERE device_id = :device_id"),
                    {"device_id": device_id},
                )
                return [str(row[0]) for row in result.all()]
        except (OperationalError, DBAPIError, OSError) as exc:
            raise _query_failed(exc) from exc

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

    async def prepare(self) -> None:
        """At start-up: today's and the coming days' partitions, the rollups' state (all
        processes sharing a database must agree on `IOTMETER_ROLLUPS_ENABLED`)."""
        if self.database.dialect == "postgresql":
            async with self._driver() as driver:
                await partitions.finish_interrupted_detaches(driver)
                await self._ensure_ahead(driver)
        if self.database.dialect == "postgresql":
            async with self._driver() as driver:
                await partitions.reattach_orphans(driver)
        if self.rollups is not None:
            await self.rollups.start()
        else:
            # Readings written while rollups are off mark nothing: forget how far they were
            # complete, so that turning them on again starts afresh (and backfills).
            async with self.database.engine.begin() as connection:
                await connection.execute(text("DELETE FROM telemetry_rollup_state"))
                await connection.execute(text("DELETE FROM telemetry_rollup_dirty"))

    @contextlib.asynccontextmanager
    async def _driver(self) -> AsyncIterator[Any]:
        """asyncpg's connection outside any transaction (DETACH ... CONCURRENTLY needs it)."""
        async with self.database.autocommit_engine.connect() as connection:
            raw = await connection.get_raw_connection()
            yield raw.driver_connection

    async def _ensure_ahead(self, driver: Any) -> None:
        now = self.clock()
        for table in partitions.TABLES:
            await partitions.ensure_days(
                driver, table, now, now + self.lifecycle.partitions_ahead * DAY_US
            )

    async def maintain(self, *, budget_s: float = 5.0) -> int:
        """One round of the lifecycle task: partitions ahead, expiry, rollups. Rows expired."""
        now = self.clock()
        cutoff = self.lifecycle.cutoff_us(now)
        rollup_cutoff = self.lifecycle.rollup_cutoff_us(now)
        expired = 0
        try:
            if self.database.dialect == "postgresql":
                async with self._driver() as driver:
                    await partitions.reattach_orphans(driver)
                    await partitions.finish_interrupted_detaches(driver)
                    await self._ensure_ahead(driver)
                    for table in partitions.TABLES:
                        raw = table in ("telemetry", "telemetry_compact")
                        table_cutoff = cutoff if raw else rollup_cutoff
                        if table_cutoff is not None:
                            expired += await partitions.drop_expired(
                                driver, table, table_cutoff, max_chunks=10
                            )
            else:
                expired += await self._expire_sqlite("telemetry", "epoch_us", cutoff)
                for table in ("telemetry_rollup_1m", "telemetry_rollup_1h"):
                    expired += await self._expire_sqlite(table, "bucket_us", rollup_cutoff)
            if self.rollups is not None:
                await self._roll_up(budget_s, rollup_cutoff)
            if self.database.dialect == "postgresql" and self.lifecycle.compaction:
                await self._compact(now, budget_s)
        except (OperationalError, DBAPIError, OSError, asyncpg.InterfaceError) as exc:
            raise BackendUnavailable(f"time-series maintenance failed: {exc}") from exc
        except asyncpg.PostgresError as exc:
            # The round is retried whole next time (each step is idempotent); the task lives.
            raise BackendUnavailable(
                f"time-series maintenance failed: {type(exc).__name__}: {exc}"
            ) from exc
        return expired

    async def _roll_up(self, budget_s: float, rollup_cutoff: int | None) -> None:
        """One process at a time (PostgreSQL: an advisory lock; a process that finds it
        taken skips its round): two workers could each compute a window from a different
        snapshot and the older one could be written last."""
        assert self.rollups is not None
        if self.database.dialect != "postgresql":
            await self.rollups.run_once(budget_s=budget_s, oldest_us=rollup_cutoff)
            return
        async with (
            self._driver() as driver,
            partitions.advisory_lock(driver, ROLLUP_LOCK_KEY, wait=False) as held,
        ):
            if held:
                await self.rollups.run_once(budget_s=budget_s, oldest_us=rollup_cutoff)

    async def _compact(self, now_us: int, budget_s: float) -> CompactionRound:
        """Closed hours into arrays: those that ended `GRACE_US` ago and, with rollups, that
        the rollups have passed (their windows are then computed from raw rows)."""
        before = floor_to(now_us - compaction.GRACE_US, partitions.HOUR_US)
        if self.rollups is not None:
            minute = (await self.rollup_coverage()).get("1m")
            if minute is None:
                return CompactionRound()
            before = min(before, floor_to(minute.until_us, partitions.HOUR_US))
        async with self._driver() as driver:
            done = await compaction.compact_closed_hours(
                driver, before_us=before, deadline=time.monotonic() + budget_s
            )
        self.compaction_rounds += 1
        self.compacted_hours += done.hours
        return done

    async def _expire_sqlite(self, table: str, column: str, cutoff: int | None) -> int:
        """Bounded deletes, each its own short transaction, so ingest goes on in between."""
        if cutoff is None:
            return 0
        deleted = 0
        for _ in range(20):
            async with self.database.engine.begin() as connection:
                result = await connection.exec_driver_sql(
                    f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} "
                    f"WHERE {column} < ? LIMIT {SQLITE_DELETE_CHUNK})",
                    (cutoff,),
                )
            count = max(0, result.rowcount or 0)
            deleted += count
            if count < SQLITE_DELETE_CHUNK:
                break
        return deleted

    async def rollup_coverage(self) -> dict[str, Coverage]:
        """Per rollup, the range in which every window is computed."""
        if self.rollups is None:
            return {}
        async with self.database.autocommit_engine.connect() as connection:
            return await self.rollups.coverage(connection)

    async def rollups_pending(self) -> bool:
        """Whether the rollups have work left: marked minutes, closed windows, a backfill."""
        if self.rollups is None:
            return False
        return await self.rollups.pending()

    async def usage(self) -> StoreUsage:
        """Oldest reading and the bytes of the time-series tables (rollups included)."""
        try:
            if self.database.dialect == "postgresql":
                return await self._usage_postgresql()
            return await self._usage_sqlite()
        except (OperationalError, DBAPIError, OSError, asyncpg.InterfaceError) as exc:
            raise BackendUnavailable(f"time-series usage failed: {exc}") from exc

    async def _usage_postgresql(self) -> StoreUsage:
        async with self._driver() as driver:
            size = 0
            oldest = None
            for table in (*partitions.TABLES, "telemetry_latest"):
                size += int(
                    await driver.fetchval(
                        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                        "WHERE c.oid = $1::regclass OR c.oid IN (SELECT inhrelid FROM "
                        "pg_inherits WHERE inhparent = $1::regclass)",
                        table,
                    )
                )
            for part in await partitions.partitions(driver, "telemetry"):
                if not await driver.fetchval(f"SELECT EXISTS (SELECT 1 FROM {part.name})"):
                    continue
                # One primary-key probe per series (the BRIN index cannot give a minimum).
                oldest = await driver.fetchval(
                    "SELECT min(first.epoch_us) FROM telemetry_latest s CROSS JOIN LATERAL "
                    f"(SELECT epoch_us FROM {part.name} t WHERE t.device_id = s.device_id "
                    "AND t.field = s.field ORDER BY epoch_us LIMIT 1) AS first"
                )
                break
            oldest_compacted = await driver.fetchval(
                "SELECT min(first.hour_us + first.offsets_us[1]) FROM telemetry_latest s "
                "CROSS JOIN LATERAL (SELECT hour_us, offsets_us FROM telemetry_compact c "
                "WHERE c.device_id = s.device_id AND c.field = s.field ORDER BY hour_us "
                "LIMIT 1) AS first"
            )
            if oldest_compacted is not None:
                oldest = oldest_compacted if oldest is None else min(oldest, oldest_compacted)
        return StoreUsage(oldest, size, "tables and indexes, rollups included")

    async def _usage_sqlite(self) -> StoreUsage:
        async with self.database.autocommit_engine.connect() as connection:
            oldest = (
                await connection.exec_driver_sql("SELECT min(epoch_us) FROM telemetry")
            ).scalar()
            try:
                size = (
                    await connection.exec_driver_sql(
                        "SELECT sum(pgsize) FROM dbstat WHERE name LIKE 'telemetry%' "
                        "OR name LIKE '%telemetry%'"
                    )
                ).scalar()
                detail = "tables and indexes, rollups included"
            except (OperationalError, DBAPIError):
                size = (
                    await connection.exec_driver_sql(
                        "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
                    )
                ).scalar()
                detail = "the whole database file (SQLite without dbstat)"
        return StoreUsage(
            int(oldest) if oldest is not None else None,
            int(size) if size is not None else None,
            detail,
        )
