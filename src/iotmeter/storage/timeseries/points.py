"""Where the SQL store's points are read from: the raw rows and, on PostgreSQL, the compacted
hours (`telemetry_compact`: one row per series and hour, the times and values as arrays).

A compaction moves an hour from one form to the other in one transaction, but a reading that
arrives later for a compacted hour is written as a raw row again, and a redelivered one then
repeats a compacted point, until the next compaction merges them. Readers therefore take each
(device, field, time) once, the raw row first: it is the newer write, as an upsert would have
kept it.
"""

from __future__ import annotations

from iotmeter.storage.timeseries.partitions import HOUR_US


def raw_and_compact(
    *,
    compact: bool,
    raw_where: str,
    compact_where: str,
    start: str,
    stop: str,
) -> str:
    """A FROM item `t(device_id, field, epoch_us, value)`.

    `raw_where` filters `r` (telemetry), `compact_where` filters `c` (telemetry_compact, by
    `hour_us`); `start` and `stop` are SQL expressions bounding the points' times."""
    raw = f"SELECT r.device_id, r.field, r.epoch_us, r.value FROM telemetry r WHERE {raw_where}"
    if not compact:
        return f"({raw}) AS t"
    return (
        "(SELECT DISTINCT ON (u.device_id, u.field, u.epoch_us) u.device_id, u.field, "
        "u.epoch_us, u.value FROM ("
        f"SELECT r.device_id, r.field, r.epoch_us, r.value, 0 AS source FROM telemetry r "
        f"WHERE {raw_where} UNION ALL "
        "SELECT c.device_id, c.field, c.hour_us + p.offset_us, p.value, 1 "
        "FROM telemetry_compact c CROSS JOIN LATERAL "
        "unnest(c.offsets_us, c.point_values) AS p(offset_us, value) "
        f"WHERE {compact_where} AND c.hour_us > ({start}) - {HOUR_US} AND c.hour_us < ({stop}) "
        f"AND c.hour_us + p.offset_us >= ({start}) AND c.hour_us + p.offset_us < ({stop})"
        ") AS u ORDER BY u.device_id, u.field, u.epoch_us, u.source) AS t"
    )


def one_series_scan(*, compact: bool) -> str:
    """(epoch_us, value) of one series ($1 device, $2 field) in [$3, $4), time order, at
    most $5: both sides read in time order from their primary key and stop at the limit."""
    raw = (
        "SELECT epoch_us, value FROM telemetry WHERE device_id = $1 AND field = $2 "
        "AND epoch_us >= $3 AND epoch_us < $4 ORDER BY epoch_us LIMIT $5"
    )
    if not compact:
        return raw
    return (
        "SELECT DISTINCT ON (epoch_us) epoch_us, value FROM ("
        "(SELECT epoch_us, value, 0 AS source FROM telemetry WHERE device_id = $1 "
        "AND field = $2 AND epoch_us >= $3 AND epoch_us < $4 ORDER BY epoch_us LIMIT $5) "
        "UNION ALL "
        # The chunks in hour order, each one's points in array order (ascending): no sort
        # of the rest of the range, however long.
        "(SELECT c.hour_us + p.offset_us, p.value, 1 FROM telemetry_compact c CROSS JOIN "
        "LATERAL unnest(c.offsets_us, c.point_values) WITH ORDINALITY AS p(offset_us, value, n) "
        f"WHERE c.device_id = $1 AND c.field = $2 AND c.hour_us > $3 - {HOUR_US} "
        "AND c.hour_us < $4 AND c.hour_us + p.offset_us >= $3 AND c.hour_us + p.offset_us < $4 "
        "ORDER BY c.hour_us, p.n LIMIT $5)"
        ") AS u ORDER BY epoch_us, source LIMIT $5"
    )
