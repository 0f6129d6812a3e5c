"""Compaction of closed hours on PostgreSQL: each hour's raw rows become one row per series
in `telemetry_compact` (the times as microseconds after the hour and the values, as two
arrays that TOAST compresses), and the hour's partition is emptied, then dropped.

A raw row costs about 120 bytes with its primary-key entry (a 24-byte tuple header, the
device id and field name repeated, a line pointer, the index tuple); a compacted point costs
its 8-byte value, its time offset after compression and a share of one row per series and
hour (`bench/storage_size.py` measures both).

Safety, in one REPEATABLE READ transaction per hour and without a table lock: the hour's rows
are merged into the compacted row of each series (a point already compacted is replaced by
the raw row, the newer write) and deleted. Readers see the hour either as rows or as arrays,
never both or neither; a reading that arrives for the hour afterwards is
a raw row again (readers take each point once, raw first: `points.raw_and_compact`) until
the next round merges it. Running a round twice changes nothing: an empty hour has nothing to
merge. An emptied partition is detached (CONCURRENTLY) and dropped a round later.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from iotmeter.storage.timeseries import partitions

logger = logging.getLogger(__name__)

HOUR_US = partitions.HOUR_US
GRACE_US = 5 * 60 * 1_000_000
"""An hour is compacted once it ended this long ago (writes in flight have landed)."""
_COMPACTION_LOCK_KEY = 0x10_7E_7E_5F

# A first compaction of an hour: the rows in primary-key order, grouped per series.
_COMPACT = """
INSERT INTO telemetry_compact (device_id, field, hour_us, offsets_us, point_values)
SELECT device_id, field, $1::bigint, array_agg(epoch_us - $1::bigint ORDER BY epoch_us),
       array_agg(value ORDER BY epoch_us)
FROM {table} GROUP BY device_id, field
"""
# An hour compacted before, that got raw rows since: merged point by point, raw first.
_MERGE = """
INSERT INTO telemetry_compact AS compact (device_id, field, hour_us, offsets_us, point_values)
SELECT device_id, field, $1::bigint, array_agg(epoch_us - $1::bigint ORDER BY epoch_us),
       array_agg(value ORDER BY epoch_us)
FROM (
    SELECT DISTINCT ON (device_id, field, epoch_us) device_id, field, epoch_us, value
    FROM (
        SELECT device_id, field, epoch_us, value, 0 AS source FROM {table}
        UNION ALL
        SELECT c.device_id, c.field, c.hour_us + p.offset_us, p.value, 1
        FROM telemetry_compact c
        CROSS JOIN LATERAL unnest(c.offsets_us, c.point_values) AS p(offset_us, value)
        WHERE c.hour_us = $1::bigint
          AND (c.device_id, c.field) IN (SELECT DISTINCT device_id, field FROM {table})
    ) AS both_forms
    ORDER BY device_id, field, epoch_us, source
) AS merged
GROUP BY device_id, field
ON CONFLICT (device_id, field, hour_us) DO UPDATE
SET offsets_us = EXCLUDED.offsets_us, point_values = EXCLUDED.point_values
"""


@dataclass(slots=True)
class CompactionRound:
    hours: int = 0
    series_hours: int = 0
    dropped: int = 0
    skipped_changed: int = 0
    """Hours left for the next round: a row changed while they were compacted."""
    busy: bool = False
    """Another process was compacting: this round did nothing."""


async def compact_table(driver: Any, table: str, hour_us: int) -> int:
    """Move the rows of `table` (one hour's partition, attached or detached) into the
    compacted rows; the series rows written (0: nothing to do).

    One REPEATABLE READ transaction: the merge and the delete see the same rows, so a row
    written meanwhile is neither copied nor deleted (the next round takes it), and a row
    changed meanwhile (an upsert of a redelivery) makes the transaction fail to serialize
    and leave everything as it was. No table lock: readers and writers never wait for a
    compaction (a writer changing a row being deleted waits for that row only)."""
    async with driver.transaction(isolation="repeatable_read"):
        if not await driver.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
            return 0
        compacted_before = await driver.fetchval(
            "SELECT EXISTS (SELECT 1 FROM telemetry_compact WHERE hour_us = $1)", hour_us
        )
        statement = _MERGE if compacted_before else _COMPACT
        status = await driver.execute(statement.format(table=table), hour_us)
        # Not TRUNCATE: it would wait for, and then hold up, every reader of the hour.
        await driver.execute(f"DELETE FROM {table}")
    return max(1, int(status.split()[-1]))


async def compact_closed_hours(driver: Any, *, before_us: int, deadline: float) -> CompactionRound:
    """Compact every hour partition that ended before `before_us`, oldest first, and drop
    those emptied in an earlier round; stops at `deadline` (monotonic)."""
    done = CompactionRound()
    async with partitions.advisory_lock(driver, _COMPACTION_LOCK_KEY, wait=False) as held:
        if not held:
            done.busy = True
            return done
        await _compact_due(driver, before_us, deadline, done)
    return done


async def _compact_due(driver: Any, before_us: int, deadline: float, done: CompactionRound) -> None:
    for part in await partitions.partitions(driver, "telemetry"):
        if part.start_us is None or part.stop_us > before_us:
            continue
        if part.stop_us - part.start_us != HOUR_US:
            continue
        if time.monotonic() > deadline:
            break
        try:
            moved = await compact_table(driver, part.name, part.start_us)
        except asyncpg.SerializationError:
            done.skipped_changed += 1
            continue
        if moved:
            done.hours += 1
            done.series_hours += moved
            logger.info("compacted %s: %d series", part.name, moved)
            continue
        if await _drop_empty(driver, part):
            done.dropped += 1


async def _drop_empty(driver: Any, part: partitions.Partition) -> bool:
    """Detach an emptied hour (CONCURRENTLY: no lock that stops the writes of other hours),
    merge what slipped in meanwhile, drop it. Under the partitions' lock, so a late writer
    does not recreate the hour under the same name before the drop; on any failure after
    the detach the hour is attached again (a detached hour is invisible to readers), and
    `partitions.reattach_orphans` does it after a crash."""
    if part.start_us is None:
        return False
    async with partitions.maintenance_lock(driver):
        try:
            await driver.execute(f"ALTER TABLE telemetry DETACH PARTITION {part.name} CONCURRENTLY")
        except asyncpg.UndefinedTableError:
            return False
        try:
            await compact_table(driver, part.name, part.start_us)
            await driver.execute(f"DROP TABLE {part.name}")
        except BaseException:
            await partitions.reattach_orphans(driver)
            raise
    return True
