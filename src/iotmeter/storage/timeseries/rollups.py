"""1-minute and 1-hour rollups of the SQL time series, and queries that read them.

Each rollup row holds min, max, sum, count, first and last of one (device, field) over one
window aligned to the epoch. Rows are always recomputed from their source (the raw points for
1-minute rows, the 1-minute rows for 1-hour rows), never incremented, so a replay or a late
reading cannot leave a rollup wrong once its window is recomputed.

Completeness: `telemetry_rollup_state` keeps, per rollup, the range `[from, until)` in which
every window has been computed. The lifecycle task moves `until` up to the windows that closed
at least `SETTLE_US` ago. A reading written more than `LATE_US` after its own time marks its
minute in `telemetry_rollup_dirty` (in the same transaction as the reading), and the task
recomputes marked minutes and their hours. Why those two figures make the pair exact: a
reading that is not marked was written less than `LATE_US` after its time, so its write began
before the task reached its window (`SETTLE_US - LATE_US` = 45 s later); a write transaction
is one statement that takes milliseconds, so the reading is committed and counted. (This
takes the clocks of the writing and the rolling-up processes to agree within that margin,
and every process of one database to have the same `IOTMETER_ROLLUPS_ENABLED`.) Marks are
claimed by deleting them in the transaction that recomputes, before it reads: a reading
committed later marks again.

Queries (`read_windows`): `every` a multiple of 1 h reads the hourly rows, a multiple of 1 min
the minute rows; windows are unions of whole rollup windows. The part of the range the rollup
does not cover (an unaligned start or stop, the last minute or two, time before `from`) and
the windows holding a marked minute (their rows are stale until recomputed; the mark commits
with the reading) are aggregated from the points into the same partial form, and partials are
combined per window in Python (mean = sum / count): the answer is the raw answer at any
moment, not only once the task has caught up. Sums are added in another order than a raw `AVG` or
`SUM` would, so `mean` and `sum` can differ from the raw answer in the last bits of a float.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from iotmeter.db.engine import Database
from iotmeter.storage.timeseries import partitions
from iotmeter.storage.timeseries.base import Aggregate, SeriesPoint, SeriesQuery
from iotmeter.storage.timeseries.partitions import HOUR_US
from iotmeter.storage.timeseries.points import raw_and_compact

logger = logging.getLogger(__name__)

MINUTE_US = 60_000_000
LATE_US = 15_000_000
"""A reading written this long after its own time is late: it marks its minute dirty (ingest
takes well under a second end to end; a backlog or a replay is late)."""
SETTLE_US = 60_000_000
"""Windows are rolled up once they closed this long ago: the newest complete minute ended at
most 2 minutes ago with the task's 10-second interval. `SETTLE_US - LATE_US` = 45 s is how
long a write may take from its lateness check to its commit (a wait for a pooled
connection, at most 10 s, included)."""
UNBOUNDED_US = -(2**62)
"""A coverage that starts here starts at the beginning of time."""
DIRTY_BATCH = 2000
"""Marked minutes recomputed per transaction."""

Clock = Callable[[], int]


def system_clock_us() -> int:
    return time.time_ns() // 1000


def floor_to(value: int, step: int) -> int:
    return value - value % step


def ceil_to(value: int, step: int) -> int:
    return -floor_to(-value, step)


def window_start(column: str, step: int | str) -> str:
    """SQL: the start of the epoch-aligned window of `step` (a number or a parameter) that
    holds `column`. Floor, not truncation toward zero: windows before 1970 align too."""
    return f"({column} - ((({column} % {step}) + {step}) % {step}))"


@dataclass(frozen=True, slots=True)
class _Source:
    """What a partials query aggregates: points or finer rollup rows."""

    time: str
    minimum: str
    maximum: str
    total: str
    count: str | None
    """The column of finer counts to add up; None: count the rows (points)."""
    first: str
    last: str


_POINTS = _Source("epoch_us", "value", "value", "value", None, "value", "value")
_ROLLUP_ROWS = _Source(
    "bucket_us", "min_value", "max_value", "sum_value", "count", "first_value", "last_value"
)


def _partials_sql(dialect: str, keys: str, step: int, source: str, where: str, of: _Source) -> str:
    """SELECT {keys}, bucket, min, max, sum, count, first, last grouped by `keys` and
    windows of `step`; `source` is a FROM clause whose rows are `t`."""
    bucket = window_start(f"t.{of.time}", step)
    count = "COUNT(*)" if of.count is None else f"SUM(t.{of.count})"
    if dialect == "postgresql":
        return (
            f"SELECT {keys}, {bucket} AS bucket, MIN(t.{of.minimum}), MAX(t.{of.maximum}), "
            f"SUM(t.{of.total}), {count}, (array_agg(t.{of.first} ORDER BY t.{of.time}))[1], "
            f"(array_agg(t.{of.last} ORDER BY t.{of.time} DESC))[1] "
            f"FROM {source} WHERE {where} GROUP BY {keys}, bucket"
        )
    # SQLite has no ordered aggregate: first and last by rank within each window.
    plain = keys.replace("t.", "")
    columns = sorted(
        {of.minimum, of.maximum, of.total, of.first, of.last} | ({of.count} if of.count else set())
    )
    count = count.replace("t.", "")
    selected = ", ".join(f"t.{column} AS {column}" for column in columns)
    return (
        f"SELECT {plain}, bucket, MIN({of.minimum}), MAX({of.maximum}), SUM({of.total}), "
        f"{count}, MAX(CASE WHEN first_rank = 1 THEN {of.first} END), "
        f"MAX(CASE WHEN last_rank = 1 THEN {of.last} END) FROM ("
        f"SELECT {keys}, {selected}, {bucket} AS bucket, ROW_NUMBER() OVER ("
        f"PARTITION BY {keys}, {bucket} ORDER BY t.{of.time}) AS first_rank, ROW_NUMBER() OVER ("
        f"PARTITION BY {keys}, {bucket} ORDER BY t.{of.time} DESC) AS last_rank "
        f"FROM {source} WHERE {where}) AS ranked GROUP BY {plain}, bucket"
    )


def raw_partials_sql(dialect: str, keys: str, step: int, source: str, where: str) -> str:
    """Partials of the points `t` (epoch_us, value)."""
    return _partials_sql(dialect, keys, step, source, where, _POINTS)


def rollup_partials_sql(dialect: str, keys: str, step: int, source: str, where: str) -> str:
    """The same partials, combined from finer rollup rows `t` (bucket_us, min_value, ...)."""
    return _partials_sql(dialect, keys, step, source, where, _ROLLUP_ROWS)


_COLUMNS = (
    "device_id, field, bucket_us, min_value, max_value, sum_value, count, first_value, last_value"
)
_UPSERT = (
    " ON CONFLICT (device_id, field, bucket_us) DO UPDATE SET min_value = excluded.min_value, "
    "max_value = excluded.max_value, sum_value = excluded.sum_value, count = excluded.count, "
    "first_value = excluded.first_value, last_value = excluded.last_value"
)


@dataclass(frozen=True, slots=True)
class Level:
    name: str
    table: str
    step: int
    source_is_raw: bool


MINUTE = Level("1m", "telemetry_rollup_1m", MINUTE_US, True)
HOUR = Level("1h", "telemetry_rollup_1h", HOUR_US, False)
LEVELS = (MINUTE, HOUR)


@dataclass(slots=True)
class Coverage:
    """Every window of the level in [from_us, until_us) is computed (except marked ones
    being recomputed)."""

    from_us: int
    until_us: int


def _params(values: Sequence[Any], prefix: str) -> tuple[str, dict[str, Any]]:
    names = [f"{prefix}{index}" for index in range(len(values))]
    return ", ".join(":" + name for name in names), dict(zip(names, values, strict=True))


def _keys_cte(keys: Sequence[tuple[str, str, int]]) -> tuple[str, dict[str, Any]]:
    rows = []
    params: dict[str, Any] = {}
    for index, (device_id, field, bucket_us) in enumerate(keys):
        rows.append(f"(:d{index}, :f{index}, CAST(:b{index} AS BIGINT))")
        params.update({f"d{index}": device_id, f"f{index}": field, f"b{index}": bucket_us})
    return f"k(device_id, field, bucket_us) AS (VALUES {', '.join(rows)})", params


class Rollups:
    """Keeps the rollup tables complete; run by the lifecycle task."""

    def __init__(
        self, database: Database, *, clock: Clock = system_clock_us, compact: bool = False
    ) -> None:
        self.database = database
        self.compact = compact
        """Whether raw points are also read from the compacted hours (PostgreSQL)."""
        self.dialect = database.dialect
        self.clock = clock
        self._backfill_found = False
        """The backfill's last hour had readings (the next hour back is computed without
        looking for the newest older reading first: one probe per series)."""

    async def coverage(self, connection: AsyncConnection) -> dict[str, Coverage]:
        rows = (
            await connection.execute(text("SELECT name, done_until_us FROM telemetry_rollup_state"))
        ).all()
        values = {str(name): int(until) for name, until in rows}
        found = {}
        for level in LEVELS:
            start, until = values.get(level.name + ":from"), values.get(level.name + ":until")
            if start is not None and until is not None:
                found[level.name] = Coverage(start, until)
        return found

    async def start(self) -> None:
        """First start: the rollups are complete from the current window on (older data is
        read raw)."""
        now = self.clock()
        async with self.database.engine.begin() as connection:
            if await self.coverage(connection):
                return
            minute = floor_to(now - SETTLE_US, MINUTE_US)
            # The hour the rollups begin in is rolled up once it is complete (its minutes
            # before `minute` by the backfill); the hours before it can follow at once.
            hour = floor_to(minute, HOUR_US)
            for name, value in (
                ("1m:from", minute),
                ("1m:until", minute),
                ("1h:from", hour),
                ("1h:until", hour),
            ):
                await connection.execute(
                    text(
                        "INSERT INTO telemetry_rollup_state (name, done_until_us) "
                        "VALUES (:name, :value) ON CONFLICT (name) DO NOTHING"
                    ),
                    {"name": name, "value": value},
                )

    async def pending(self) -> bool:
        """Marked minutes, closed windows not yet rolled up, or older data to cover."""
        target = floor_to(self.clock() - SETTLE_US, MINUTE_US)
        async with self.database.autocommit_engine.connect() as connection:
            marked = (
                await connection.execute(text("SELECT 1 FROM telemetry_rollup_dirty LIMIT 1"))
            ).first()
            coverage = await self.coverage(connection)
            minute, hour = coverage.get("1m"), coverage.get("1h")
            if minute is None or hour is None:
                return True
            hour_floor = (
                UNBOUNDED_US if minute.from_us == UNBOUNDED_US else ceil_to(minute.from_us, HOUR_US)
            )
            return (
                marked is not None
                or minute.until_us < target
                or hour.until_us < floor_to(minute.until_us, HOUR_US)
                or minute.from_us > UNBOUNDED_US
                or hour_floor < hour.from_us <= floor_to(minute.until_us, HOUR_US)
            )

    async def run_once(self, *, budget_s: float = 5.0, oldest_us: int | None = None) -> int:
        """Recompute marked minutes, then roll up the windows that closed; stops after about
        `budget_s` (the next run goes on). Keys older than `oldest_us` (rollup retention) are
        not recomputed. The number of rollup windows written."""
        deadline = time.monotonic() + budget_s
        written = await self._recompute_marked(deadline, oldest_us)
        target = floor_to(self.clock() - SETTLE_US, MINUTE_US)
        while time.monotonic() < deadline:
            async with self.database.engine.begin() as connection:
                coverage = await self.coverage(connection)
                minute, hour = coverage.get("1m"), coverage.get("1h")
                if minute is None or hour is None:
                    return written
                if minute.until_us < target:
                    stop = min(target, minute.until_us + MINUTE_US)
                    written += await self._compute_range(connection, MINUTE, minute.until_us, stop)
                    await self._set(connection, "1m:until", stop)
                    continue
                hour_target = floor_to(minute.until_us, HOUR_US)
                if hour.until_us < hour_target and minute.from_us <= hour.until_us:
                    stop = hour.until_us + HOUR_US
                    written += await self._compute_range(connection, HOUR, hour.until_us, stop)
                    await self._set(connection, "1h:until", stop)
                    continue
                # Hours before the hourly coverage, once their minutes are all computed
                # (the hour the coverage began in, the hours the backfill reached), a day
                # at a time, alongside the minutes' backfill.
                hour_floor = (
                    UNBOUNDED_US
                    if minute.from_us == UNBOUNDED_US
                    else ceil_to(minute.from_us, HOUR_US)
                )
                if hour_floor < hour.from_us <= floor_to(minute.until_us, HOUR_US):
                    written += await self._extend_hours(connection, hour, hour_floor)
                    continue
                if minute.from_us > UNBOUNDED_US:
                    written += await self._backfill(connection, minute, oldest_us)
                    continue
            break
        return written

    async def _extend_hours(
        self, connection: AsyncConnection, hour: Coverage, hour_floor: int
    ) -> int:
        start = max(hour_floor, hour.from_us - 24 * HOUR_US)
        written = await self._compute_range(connection, HOUR, start, hour.from_us)
        if written == 0 and start > hour_floor:
            # Nothing in that day: jump to the newest older minute row, if any.
            newest = (
                await connection.execute(
                    text(f"SELECT max(bucket_us) FROM {MINUTE.table} WHERE bucket_us < :before"),
                    {"before": start},
                )
            ).scalar()
            if newest is None or int(newest) < hour_floor:
                start = hour_floor
            else:
                start = max(hour_floor, floor_to(int(newest), HOUR_US))
                written = await self._compute_range(connection, HOUR, start, hour.from_us)
        await self._set(connection, "1h:from", start)
        return written

    async def _backfill(
        self, connection: AsyncConnection, minute: Coverage, oldest_us: int | None
    ) -> int:
        """Extend the minute coverage back over readings written before it began (the
        store's data from before the rollups, a seeded history): the hour of the newest older
        reading at a time; with none left, the coverage starts at the beginning of time (a
        reading written there later is late, so it marks its minute). The hours follow in
        `run_once`."""
        if self._backfill_found:
            # The hour before had readings: most likely this one too; no probe needed.
            start = floor_to(minute.from_us - 1, HOUR_US)
        else:
            newest_older = await self._newest_before(connection, minute.from_us)
            if newest_older is None or (oldest_us is not None and newest_older < oldest_us):
                await self._set(connection, "1m:from", UNBOUNDED_US)
                return 0
            start = floor_to(newest_older, HOUR_US)
        written = await self._compute_range(connection, MINUTE, start, minute.from_us, older=True)
        self._backfill_found = written > 0
        await self._set(connection, "1m:from", start)
        return written

    async def _newest_before(self, connection: AsyncConnection, before_us: int) -> int | None:
        if self.dialect == "postgresql":
            # One primary-key probe per series: the BRIN index on the time cannot give a
            # maximum, and a scan of every older row could take minutes.
            sql = (
                "SELECT max(older.epoch_us) FROM telemetry_latest s CROSS JOIN LATERAL ("
                "SELECT epoch_us FROM telemetry t WHERE t.device_id = s.device_id AND "
                "t.field = s.field AND t.epoch_us < :before ORDER BY t.epoch_us DESC LIMIT 1"
                ") AS older"
            )
            if self.compact:
                # A compacted hour counts up to its end (or `before`): an upper bound that
                # is safe, the backfill computes the whole hour.
                raw_newest = sql.replace("max(older.epoch_us)", "max(older.epoch_us) AS newest")
                sql = (
                    f"SELECT max(newest) FROM ({raw_newest} "
                    "UNION ALL SELECT max(least(chunk.hour_us + "
                    f"{HOUR_US} - 1, :before - 1)) FROM telemetry_latest s CROSS JOIN LATERAL ("
                    "SELECT hour_us FROM telemetry_compact c WHERE c.device_id = s.device_id "
                    "AND c.field = s.field AND c.hour_us < :before ORDER BY c.hour_us DESC "
                    "LIMIT 1) AS chunk) AS both_stores"
                )
        else:
            sql = "SELECT max(epoch_us) FROM telemetry WHERE epoch_us < :before"
        value = (await connection.execute(text(sql), {"before": before_us})).scalar()
        return int(value) if value is not None else None

    @staticmethod
    async def _set(connection: AsyncConnection, name: str, value: int) -> None:
        await connection.execute(
            text("UPDATE telemetry_rollup_state SET done_until_us = :value WHERE name = :name"),
            {"name": name, "value": value},
        )

    def _insert_sql(self, level: Level, source: str, where: str, keys: str) -> str:
        builder = raw_partials_sql if level.source_is_raw else rollup_partials_sql
        select = builder(self.dialect, keys, level.step, source, where)
        if self.dialect == "sqlite":
            # SQLite needs a WHERE before ON CONFLICT when the INSERT reads from a SELECT.
            select = f"SELECT * FROM ({select}) WHERE true"
        return f"INSERT INTO {level.table} ({_COLUMNS}) {select}{_UPSERT}"

    async def _compute_range(
        self,
        connection: AsyncConnection,
        level: Level,
        start_us: int,
        stop_us: int,
        *,
        older: bool = False,
    ) -> int:
        """Every series' windows in [start, stop). `older`: a range compaction may have
        reached (the backfill); the windows that just closed are never compacted yet."""
        column = "epoch_us" if level.source_is_raw else "bucket_us"
        source = "telemetry t" if level.source_is_raw else f"{MINUTE.table} t"
        where = f"t.{column} >= :start AND t.{column} < :stop"
        if level.source_is_raw and older and self.compact:
            source = raw_and_compact(
                compact=True,
                raw_where="r.epoch_us >= :start AND r.epoch_us < :stop",
                compact_where="true",
                start=":start",
                stop=":stop",
            )
            where = "true"
        sql = self._insert_sql(level, source, where, "t.device_id, t.field")
        if level.source_is_raw and self.dialect == "postgresql":
            await self._summarize_time_index(connection, start_us, stop_us)
            # A slice of a partition: through the BRIN index, whatever the statistics say
            # (a partition filled since its last ANALYZE looks small enough to scan whole).
            await connection.execute(text("SET LOCAL enable_seqscan = off"))
        result = await connection.execute(text(sql), {"start": start_us, "stop": stop_us})
        return max(0, result.rowcount or 0)

    @staticmethod
    async def _summarize_time_index(
        connection: AsyncConnection, start_us: int, stop_us: int
    ) -> None:
        """Summarize the new page ranges of the BRIN time index of the partitions holding
        [start, stop): unsummarized ranges match every query, so without it each minute
        of an hour would read the whole hour written so far (summarizing reads each new
        page once)."""
        rows = (
            await connection.execute(
                text(
                    "SELECT i.inhrelid, pg_get_expr(t.relpartbound, t.oid) FROM pg_inherits i "
                    "JOIN pg_index x ON x.indexrelid = i.inhrelid "
                    "JOIN pg_class t ON t.oid = x.indrelid "
                    "WHERE i.inhparent = 'ix_telemetry_epoch_us'::regclass"
                )
            )
        ).all()
        for index_oid, expression in rows:
            bounds = partitions.parse_bound(str(expression or ""))
            if bounds is None:
                continue
            lower, upper = bounds
            if (lower is None or lower < stop_us) and upper > start_us:
                try:
                    async with connection.begin_nested():
                        await connection.execute(
                            text("SELECT brin_summarize_new_values(CAST(:i AS oid)::regclass)"),
                            {"i": int(index_oid)},
                        )
                except DBAPIError as exc:
                    # Not the index's owner: the scan reads more pages, nothing else changes.
                    logger.warning("cannot summarize the time index: %s", exc.orig)
                    return

    async def _claim_marked(self, connection: AsyncConnection) -> list[tuple[str, str, int]]:
        if self.dialect == "postgresql":
            claim = (
                "DELETE FROM telemetry_rollup_dirty WHERE ctid = ANY(ARRAY("
                f"SELECT ctid FROM telemetry_rollup_dirty LIMIT {DIRTY_BATCH})) "
                "RETURNING device_id, field, bucket_us"
            )
        else:
            claim = (
                "DELETE FROM telemetry_rollup_dirty WHERE rowid IN ("
                f"SELECT rowid FROM telemetry_rollup_dirty LIMIT {DIRTY_BATCH}) "
                "RETURNING device_id, field, bucket_us"
            )
        rows = (await connection.execute(text(claim))).all()
        return [(str(d), str(f), int(b)) for d, f, b in rows]

    async def _recompute_marked(self, deadline: float, oldest_us: int | None) -> int:
        written = 0
        while time.monotonic() < deadline:
            async with self.database.engine.begin() as connection:
                # Claimed (deleted) before the raw points are read: a reading committed after
                # this statement marks its minute again.
                claimed = await self._claim_marked(connection)
                if not claimed:
                    break
                coverage = await self.coverage(connection)
                if oldest_us is not None:
                    claimed = [key for key in claimed if key[2] >= oldest_us]
                if claimed:
                    written += await self._recompute(connection, MINUTE, claimed)
                    hour = coverage.get("1h")
                    hours = sorted({(d, f, floor_to(b, HOUR_US)) for d, f, b in claimed})
                    if hour is not None:
                        hours = [key for key in hours if key[2] < hour.until_us]
                    if hours:
                        written += await self._recompute(connection, HOUR, hours)
        return written

    async def _recompute(
        self, connection: AsyncConnection, level: Level, keys: list[tuple[str, str, int]]
    ) -> int:
        """Windows of `keys` recomputed from their source; a window whose source has no
        point left (retention) loses its row."""
        written = 0
        for offset in range(0, len(keys), 500):
            part = keys[offset : offset + 500]
            cte, params = _keys_cte(part)
            await connection.execute(
                text(
                    f"WITH {cte} DELETE FROM {level.table} WHERE EXISTS (SELECT 1 FROM k "
                    f"WHERE k.device_id = {level.table}.device_id AND k.field = "
                    f"{level.table}.field AND k.bucket_us = {level.table}.bucket_us)"
                ),
                params,
            )
            column = "epoch_us" if level.source_is_raw else "bucket_us"
            table = "telemetry" if level.source_is_raw else MINUTE.table
            source = (
                f"k JOIN {table} t ON t.device_id = k.device_id AND t.field = k.field "
                f"AND t.{column} >= k.bucket_us AND t.{column} < k.bucket_us + {level.step}"
            )
            if level.source_is_raw and self.compact:
                points = raw_and_compact(
                    compact=True,
                    raw_where="r.device_id = k.device_id AND r.field = k.field AND "
                    f"r.epoch_us >= k.bucket_us AND r.epoch_us < k.bucket_us + {level.step}",
                    compact_where="c.device_id = k.device_id AND c.field = k.field",
                    start="k.bucket_us",
                    stop=f"k.bucket_us + {level.step}",
                )
                source = f"k CROSS JOIN LATERAL {points}"
            sql = self._insert_sql(level, source, "true", "t.device_id, t.field")
            result = await connection.execute(text(f"WITH {cte} {sql}"), params)
            written += max(0, result.rowcount or 0)
        return written


# -- reading ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Partial:
    minimum: float
    maximum: float
    total: float
    count: int
    first: float
    first_at: int
    last: float
    last_at: int

    def merge(self, other: _Partial) -> None:
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)
        self.total += other.total
        self.count += other.count
        if other.first_at < self.first_at:
            self.first, self.first_at = other.first, other.first_at
        if other.last_at > self.last_at:
            self.last, self.last_at = other.last, other.last_at

    def value(self, aggregate: Aggregate) -> float:
        match aggregate:
            case "mean":
                return self.total / self.count
            case "min":
                return self.minimum
            case "max":
                return self.maximum
            case "sum":
                return self.total
            case "count":
                return float(self.count)
            case "first":
                return self.first
            case "last":
                return self.last


def levels_for(every_us: int) -> list[Level]:
    """The rollups whose windows divide `every`, coarsest first (none: read raw points)."""
    return [level for level in (HOUR, MINUTE) if every_us % level.step == 0]


Only = tuple[set[tuple[str, int]], int] | None
"""Windows to keep: (field, window start) pairs and the windows' length."""


def _keep(rows: list[Any], only: Only) -> list[Any]:
    if only is None:
        return rows
    keys, step = only
    return [row for row in rows if (str(row[0]), floor_to(int(row[1]), step)) in keys]


class _PartialReader:
    """Partial aggregates of one device's fields over a range, from a chain of rollup levels
    (coarsest first) and the points below them."""

    def __init__(
        self,
        connection: AsyncConnection,
        dialect: str,
        params: dict[str, Any],
        field_filter: str,
        compact: bool,
        finest: Level,
    ) -> None:
        self.connection = connection
        self.dialect = dialect
        self.params = params
        self.field_filter = field_filter
        self.compact = compact
        self.finest = finest

    async def partials(
        self, start: int, stop: int, levels: list[tuple[Level, Coverage]], only: Only
    ) -> list[Any]:
        """Rows (field, bucket, min, max, sum, count, first, last) covering [start, stop),
        each bucket inside one window of every level (they divide each other)."""
        if stop <= start:
            return []
        if not levels:
            return _keep(await self._raw(start, stop), only)
        (level, coverage), finer = levels[0], levels[1:]
        inner_start = ceil_to(max(start, coverage.from_us), level.step)
        inner_stop = floor_to(min(stop, coverage.until_us), level.step)
        if inner_stop <= inner_start:
            return await self.partials(start, stop, finer, only)
        inner = {**self.params, "inner_start": inner_start, "inner_stop": inner_stop}
        ff = self.field_filter
        # Minutes marked by a late reading and not recomputed yet: rows of this level that
        # hold one are stale, so those windows come from the finer level (the mark and the
        # reading commit together).
        marked = {
            (str(field), floor_to(int(bucket), level.step))
            for field, bucket in (
                await self.connection.execute(
                    text(
                        "SELECT field, bucket_us FROM telemetry_rollup_dirty t WHERE "
                        "t.device_id = :device_id AND t.bucket_us >= :inner_start AND "
                        f"t.bucket_us < :inner_stop{ff}"
                    ),
                    inner,
                )
            ).all()
        }
        rows: list[Any] = [
            row
            for row in (
                await self.connection.execute(
                    text(
                        f"SELECT field, bucket_us, min_value, max_value, sum_value, count, "
                        f"first_value, last_value FROM {level.table} t WHERE t.device_id = "
                        f":device_id AND t.bucket_us >= :inner_start AND "
                        f"t.bucket_us < :inner_stop{ff}"
                    ),
                    inner,
                )
            ).all()
            if (row[0], row[1]) not in marked
        ]
        rows = _keep(rows, only)
        rows += await self.partials(start, inner_start, finer, only)
        rows += await self.partials(inner_stop, stop, finer, only)
        if marked:
            first_marked = min(bucket for _, bucket in marked)
            last_marked = max(bucket for _, bucket in marked) + level.step
            again = await self.partials(first_marked, last_marked, finer, (marked, level.step))
            rows += _keep(again, only)
        return rows

    async def _raw(self, start: int, stop: int) -> list[Any]:
        ff = self.field_filter
        source = raw_and_compact(
            compact=self.compact,
            raw_where="r.device_id = :device_id AND r.epoch_us >= :edge_start "
            "AND r.epoch_us < :edge_stop" + ff.replace("t.field", "r.field"),
            compact_where="c.device_id = :device_id" + ff.replace("t.field", "c.field"),
            start=":edge_start",
            stop=":edge_stop",
        )
        sql = raw_partials_sql(self.dialect, "t.field", self.finest.step, source, "true")
        params = {**self.params, "edge_start": start, "edge_stop": stop}
        return list((await self.connection.execute(text(sql), params)).all())


async def read_windows(
    connection: AsyncConnection,
    dialect: str,
    query: SeriesQuery,
    levels: Sequence[tuple[Level, Coverage]],
    *,
    compact: bool = False,
) -> list[SeriesPoint] | None:
    """The query's windows from the coarsest rollup rows where complete, finer ones around
    them, points last; None when no rollup covers any of the range (the caller reads raw)."""
    assert query.every_us is not None
    every = query.every_us
    if not any(
        floor_to(min(query.stop_us, coverage.until_us), level.step)
        > ceil_to(max(query.start_us, coverage.from_us), level.step)
        for level, coverage in levels
    ):
        return None
    params: dict[str, Any] = {"device_id": query.device_id}
    field_filter = ""
    if query.fields:
        placeholders, field_params = _params(list(query.fields), "f")
        field_filter = f" AND t.field IN ({placeholders})"
        params.update(field_params)
    reader = _PartialReader(connection, dialect, params, field_filter, compact, levels[-1][0])
    rows = await reader.partials(query.start_us, query.stop_us, list(levels), None)
    windows: dict[tuple[str, int], _Partial] = {}
    for field, bucket, minimum, maximum, total, count, first, last in rows:
        bucket = int(bucket)
        partial = _Partial(
            float(minimum),
            float(maximum),
            float(total),
            int(count),
            float(first),
            bucket,
            float(last),
            bucket,
        )
        key = (str(field), floor_to(bucket, every))
        known = windows.get(key)
        if known is None:
            windows[key] = partial
        else:
            known.merge(partial)
    points = [
        SeriesPoint(field, window, partial.value(query.aggregate))
        for (field, window), partial in sorted(windows.items(), key=lambda item: item[0])
    ]
    return points[: query.limit]
