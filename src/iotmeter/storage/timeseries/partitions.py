"""Daily partitions of the PostgreSQL time series: created ahead, dropped when expired.

`telemetry` and the rollup tables are partitioned by range of their time column (migration
0008). Each has a `_history` partition for every time before the first daily partition (the
table as it was before partitioning, or an empty one), then one partition per UTC day named
`{table}_p{YYYYMMDD}`. There is no default partition: a row whose day has no partition is
refused by PostgreSQL (`23514`), and the writer creates the missing days and writes again.

Locks: a new day is made as a plain table and then attached (SHARE UPDATE EXCLUSIVE on the
parent: ingest goes on; `CREATE TABLE ... PARTITION OF` would take ACCESS EXCLUSIVE), and an
expired day is detached with `DETACH PARTITION ... CONCURRENTLY` (PostgreSQL 14+, possible
because there is no default partition) before it is dropped, so neither waits for nor holds
up the writes of other days. Expiry never deletes rows from a daily partition; only the
history partition, which holds the data from before partitioning, is thinned by bounded
deletes.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

logger = logging.getLogger(__name__)

HOUR_US = 3_600_000_000
DAY_US = 86_400_000_000
TABLES: dict[str, tuple[str, int]] = {
    "telemetry": ("epoch_us", HOUR_US),
    "telemetry_compact": ("hour_us", DAY_US),
    "telemetry_rollup_1m": ("bucket_us", DAY_US),
    "telemetry_rollup_1h": ("bucket_us", DAY_US),
}
"""Each partitioned table, its time column and the span of one partition. The raw points
are partitioned by hour: an hour, once closed, is compacted into `telemetry_compact` and its
partition emptied (`iotmeter.storage.timeseries.compaction`)."""

HISTORY_DELETE_CHUNK = 10_000
"""Rows one statement deletes from a history partition (a short transaction each)."""

_BOUND = re.compile(r"FROM \((MINVALUE|'?-?\d+'?)\) TO \((MAXVALUE|'?-?\d+'?)\)")
# Serialises partition maintenance across processes (several collectors, the API).
_LOCK_KEY = 0x10_7E_7E_5E


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    start_us: int | None
    """None: MINVALUE (the history partition)."""
    stop_us: int


_PARTITION_NAME = re.compile(
    r"^(telemetry|telemetry_compact|telemetry_rollup_1m|telemetry_rollup_1h)"
    r"_(history|p\d{8}(h\d{2})?)$"
)


def is_partition(table_name: str) -> bool:
    """Whether a table is one of the partitions (not in the models: made by the app)."""
    return _PARTITION_NAME.match(table_name) is not None


def day_name(table: str, day_start_us: int) -> str:
    """The name of `table`'s partition starting at that time (a day, or an hour)."""
    moment = datetime.fromtimestamp(day_start_us / 1e6, UTC)
    if TABLES[table][1] == HOUR_US:
        return f"{table}_p{moment:%Y%m%d}h{moment:%H}"
    return f"{table}_p{moment:%Y%m%d}"


def _bound(text: str) -> int | None:
    return None if text in ("MINVALUE", "MAXVALUE") else int(text.strip("'"))


def parse_bound(expression: str) -> tuple[int | None, int] | None:
    """(start or None for MINVALUE, stop) of a range partition's bound expression."""
    match = _BOUND.search(expression)
    if match is None:
        return None
    stop = _bound(match.group(2))
    return None if stop is None else (_bound(match.group(1)), stop)


async def partitions(driver: Any, table: str) -> list[Partition]:
    """The partitions of `table`, oldest first."""
    rows = await driver.fetch(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass",
        table,
    )
    found = []
    for name, expression in rows:
        match = _BOUND.search(expression or "")
        if match is None:
            continue
        stop = _bound(match.group(2))
        if stop is None:
            continue
        found.append(Partition(name, _bound(match.group(1)), stop))
    return sorted(found, key=lambda part: part.stop_us)


@contextlib.asynccontextmanager
async def advisory_lock(driver: Any, key: int, *, wait: bool = True) -> AsyncIterator[bool]:
    """A session-level advisory lock on a pooled connection: yields whether it is held
    (`wait=False` tries once). If it cannot be released surely (the task was cancelled
    mid-statement, the unlock failed), the connection is closed, which releases it: a lock
    left on a pooled connection would stop every later holder."""
    if wait:
        await driver.execute("SELECT pg_advisory_lock($1)", key)
        held = True
    else:
        held = bool(await driver.fetchval("SELECT pg_try_advisory_lock($1)", key))
    released = not held
    try:
        yield held
        if held:
            await driver.execute("SELECT pg_advisory_unlock($1)", key)
            released = True
    finally:
        if not released:
            driver.terminate()


@contextlib.asynccontextmanager
async def maintenance_lock(driver: Any) -> AsyncIterator[None]:
    """One process at a time changes partitions."""
    async with advisory_lock(driver, _LOCK_KEY):
        yield


def bounds_from_name(name: str) -> tuple[str, int, int] | None:
    """(parent table, start, stop) of a daily or hourly partition's name."""
    match = _PARTITION_NAME.match(name)
    if match is None or match.group(2) == "history":
        return None
    table, stamp = match.group(1), match.group(2)[1:]
    fmt = "%Y%m%dh%H" if "h" in stamp else "%Y%m%d"
    start = int(datetime.strptime(stamp, fmt).replace(tzinfo=UTC).timestamp()) * 1_000_000
    return table, start, start + TABLES[table][1]


async def reattach_orphans(driver: Any) -> list[str]:
    """Attach again the partitions left detached by an interrupted drop or compaction (their
    rows would be invisible, and a late reading for their hour could not make its
    partition: the name is taken). The next round expires or compacts them as usual."""
    rows = await driver.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = current_schema() AND c.relkind = 'r' AND NOT c.relispartition "
        "AND c.relname ~ '^telemetry.*_p[0-9]{8}'"
    )
    attached = []
    async with maintenance_lock(driver):
        for (name,) in rows:
            parsed = bounds_from_name(name)
            if parsed is None:
                continue
            table, start, stop = parsed
            try:
                await driver.execute(
                    f"ALTER TABLE {table} ATTACH PARTITION {name} "
                    f"FOR VALUES FROM ({start}) TO ({stop})"
                )
            except (asyncpg.UndefinedTableError, asyncpg.InvalidObjectDefinitionError):
                continue
            logger.warning("attached %s again (left detached by an interrupted round)", name)
            attached.append(name)
    return attached


async def ensure_days(driver: Any, table: str, first_us: int, last_us: int) -> list[str]:
    """Partitions covering [first_us, last_us] (after the history partition); the names
    created. Daily tables are kept without gaps from their newest partition on (a rollup or
    a compacted hour can land on any day since); the hourly raw table gets only the hours
    asked for. Runs outside a transaction: each is attached in its own."""
    column, span = TABLES[table]
    created = []
    async with maintenance_lock(driver):
        existing = await partitions(driver, table)
        covered_until = max((part.stop_us for part in existing), default=None)
        history_stop = min((p.stop_us for p in existing if p.start_us is None), default=None)
        have = {part.start_us for part in existing}
        day = (first_us // span) * span
        if span == DAY_US and covered_until is not None:
            day = min(day, covered_until)
        if history_stop is not None:
            day = max(day, history_stop)
        while day <= last_us:
            if day not in have and (covered_until is None or not _overlaps(existing, day, span)):
                name = day_name(table, day)
                stop = day + span
                try:
                    async with driver.transaction():
                        await driver.execute(
                            f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING "
                            f"CONSTRAINTS, CHECK ({column} >= {day} AND {column} < {stop}))"
                        )
                        # The check lets ATTACH skip its validation scan (the table is empty).
                        await driver.execute(
                            f"ALTER TABLE {table} ATTACH PARTITION {name} "
                            f"FOR VALUES FROM ({day}) TO ({stop})"
                        )
                except asyncpg.DuplicateTableError:
                    # Left detached by an interrupted round: attached again, rows and all.
                    await reattach_orphans(driver)
                    day += span
                    continue
                created.append(name)
            day += span
    if created:
        logger.info(
            "created %d partition(s) of %s: %s",
            len(created),
            table,
            created[0] if len(created) == 1 else f"{created[0]} .. {created[-1]}",
        )
    return created


def _overlaps(existing: list[Partition], day: int, span: int) -> bool:
    stop = day + span
    return any(
        (part.start_us is None or part.start_us < stop) and part.stop_us > day for part in existing
    )


async def drop_expired(driver: Any, table: str, cutoff_us: int, *, max_chunks: int) -> int:
    """Detach and drop the daily partitions wholly older than `cutoff_us`; delete at most
    `max_chunks` chunks of older rows from the history partition. The rows removed from the
    history partition (dropped partitions are counted as their row estimate)."""
    column = TABLES[table][0]
    removed = 0
    async with maintenance_lock(driver):
        for part in await partitions(driver, table):
            if part.start_us is None and part.stop_us > cutoff_us:
                for _ in range(max_chunks):
                    status = await driver.execute(
                        f"DELETE FROM {part.name} WHERE ctid = ANY(ARRAY(SELECT ctid FROM "
                        f"{part.name} WHERE {column} < $1 LIMIT {HISTORY_DELETE_CHUNK}))",
                        cutoff_us,
                    )
                    deleted = int(status.split()[-1])
                    removed += deleted
                    if deleted < HISTORY_DELETE_CHUNK:
                        break
                continue
            if part.stop_us > cutoff_us:
                continue
            # Wholly expired, the history partition too: dropped whole.
            estimate = await driver.fetchval(
                "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE relname = $1",
                part.name,
            )
            # CONCURRENTLY: no lock that holds up the writes to other days (not in a
            # transaction block; a detach interrupted half-way is finished with FINALIZE).
            try:
                await driver.execute(
                    f"ALTER TABLE {table} DETACH PARTITION {part.name} CONCURRENTLY"
                )
            except (asyncpg.DeadlockDetectedError, asyncpg.LockNotAvailableError):
                # Lost to a concurrent write that makes a partition: the next round retries.
                logger.info("dropping %s waits for the next round (lock conflict)", part.name)
                await finish_interrupted_detaches(driver)
                continue
            await driver.execute(f"DROP TABLE {part.name}")
            logger.info("dropped expired partition %s (about %d rows)", part.name, estimate)
            removed += int(estimate or 0)
    return removed


async def finish_interrupted_detaches(driver: Any) -> None:
    """A `DETACH ... CONCURRENTLY` cut off half-way (a crash) leaves the partition pending,
    which blocks the next detach: finish it and attach the partition again (its rows are
    kept; the next round expires or compacts it as usual)."""
    async with maintenance_lock(driver):
        # Read under the lock: a detach in progress in another process is not pending.
        rows = await driver.fetch(
            "SELECT p.relname, c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits "
            "i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
            "WHERE i.inhdetachpending"
        )
        for parent, child, expression in rows:
            try:
                await driver.execute(f"ALTER TABLE {parent} DETACH PARTITION {child} FINALIZE")
            except asyncpg.UndefinedTableError:
                continue
            match = _BOUND.search(expression or "")
            if match is None:
                continue
            await driver.execute(
                f"ALTER TABLE {parent} ATTACH PARTITION {child} "
                f"FOR VALUES FROM ({match.group(1)}) TO ({match.group(2)})"
            )
            logger.warning("finished an interrupted detach of %s and attached it again", child)
