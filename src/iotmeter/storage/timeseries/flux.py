"""Flux queries of the InfluxDB store; every value reaches Flux as an escaped string literal.

Shapes, chosen so that InfluxDB can push the work down to its storage engine and so that a
bucket holding boolean and float fields never mixes them in one table:

- `range_query`: from |> range |> filter(measurement, device) [|> filter(fields)]
  [|> toFloat() |> aggregateWindow(...)] |> keep(_time, _field, _value) |> limit(n).
  Tables stay one per series (never `group()`ed together: a float and a bool table in one group
  is a Flux schema collision), each in time order as storage returns it, so a per-table
  `limit(n)` keeps each series' first n points; the store sorts by field then time and cuts
  the total to n.
- `latest_query`: the same filter over the device ids, `last()` per series, keeping device_id.
  The store picks the newest point per device and field (a device whose `device_type` tag
  changed has two series per field).
- `oldest_query`: from |> range(1970 .. 2262) |> filter(measurement) |> first()
  |> keep(_time) |> group() |> min(column: "_time"): one row. `first()` right after `filter` is
  pushed down to storage (one point per series and shard, no scan of the data); dropping
  `_value` before `group()` lets float and boolean series meet in one table.

Booleans are converted with `toFloat()` before mean/min/max/sum only; count/first/last accept
them as they are (the store turns the returned booleans into 1.0/0.0).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from iotmeter.storage.timeseries.base import AGGREGATES, SeriesQuery
from iotmeter.storage.timeseries.line_protocol import MEASUREMENT

DEFAULT_LATEST_LOOKBACK_US = 30 * 86_400_000_000
"""How far back `latest` looks (30 days): a device silent for longer has no latest values."""
DEFAULT_LATEST_AHEAD_US = 86_400_000_000
"""How far past now `latest` looks, so readings from a device clock a little fast count."""

_NUMERIC_AGGREGATES = frozenset({"mean", "min", "max", "sum"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Flux times are int64 nanoseconds since the epoch: years 1677 to 2262.
_MIN_US = -(2**63) // 1000 + 1
_MAX_US = (2**63 - 1) // 1000
_FLUX_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPE_RE = re.compile(r'[\\"\n\r\t]|\$(?=\{)')


def flux_string(value: str) -> str:
    """`value` as a Flux string literal: quotes, backslashes, `${` (interpolation) escaped."""
    return '"' + _ESCAPE_RE.sub(lambda match: _FLUX_ESCAPES.get(match[0], "\\$"), value) + '"'


def rfc3339_us(epoch_us: int) -> str:
    """`2024-05-01T12:00:00.000001Z`: UTC, always six fraction digits."""
    if not _MIN_US <= epoch_us <= _MAX_US:
        raise ValueError(f"time {epoch_us} us is outside what InfluxDB can store (1677..2262)")
    moment = _EPOCH + timedelta(microseconds=epoch_us)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{moment.microsecond:06d}Z"


def flux_time(epoch_us: int) -> str:
    return f"time(v: {flux_string(rfc3339_us(epoch_us))})"


def flux_duration_us(duration_us: int) -> str:
    if duration_us <= 0:
        raise ValueError(f"a window must be longer than 0 us (got {duration_us})")
    return f"{duration_us}us"


def _any_of(column: str, values: Sequence[str]) -> str:
    return " or ".join(f"r.{column} == {flux_string(value)}" for value in values)


def _source(bucket: str, start_us: int, stop_us: int) -> list[str]:
    if stop_us <= start_us:
        raise ValueError(f"empty time range: stop ({stop_us}) is not after start ({start_us})")
    return [
        f"from(bucket: {flux_string(bucket)})",
        f"range(start: {flux_time(start_us)}, stop: {flux_time(stop_us)})",
    ]


def range_query(bucket: str, query: SeriesQuery, *, measurement: str = MEASUREMENT) -> str:
    """Points of one device in [start, stop), raw or aggregated per epoch-aligned window."""
    if query.limit < 1:
        raise ValueError(f"limit must be at least 1 (got {query.limit})")
    if query.aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {query.aggregate!r}")
    steps = _source(bucket, query.start_us, query.stop_us)
    steps.append(
        f"filter(fn: (r) => r._measurement == {flux_string(measurement)}"
        f" and r.device_id == {flux_string(query.device_id)})"
    )
    if query.fields is not None:
        if not query.fields:
            raise ValueError("fields must not be empty (use None for every field)")
        steps.append(f"filter(fn: (r) => {_any_of('_field', query.fields)})")
    if query.every_us is not None:
        every = flux_duration_us(query.every_us)
        if query.aggregate in _NUMERIC_AGGREGATES:
            steps.append("toFloat()")
        steps.append(
            f"aggregateWindow(every: {every}, fn: {query.aggregate}, createEmpty: false,"
            ' timeSrc: "_start")'
        )
    steps.append('keep(columns: ["_time", "_field", "_value"])')
    steps.append(f"limit(n: {int(query.limit)})")
    return "\n  |> ".join(steps) + "\n"


def oldest_query(bucket: str, *, measurement: str = MEASUREMENT) -> str:
    """The time of the oldest point of the measurement: one row, or none when it is empty.

    The range starts at the epoch: ingest refuses readings dated before 1970."""
    steps = _source(bucket, 0, _MAX_US)
    steps.append(f"filter(fn: (r) => r._measurement == {flux_string(measurement)})")
    steps.append("first()")
    steps.append('keep(columns: ["_time"])')
    steps.append("group()")
    steps.append('min(column: "_time")')
    return "\n  |> ".join(steps) + "\n"


def latest_query(
    bucket: str,
    device_ids: Sequence[str],
    *,
    now_us: int,
    lookback_us: int = DEFAULT_LATEST_LOOKBACK_US,
    ahead_us: int = DEFAULT_LATEST_AHEAD_US,
    measurement: str = MEASUREMENT,
) -> str:
    """The last point of every series of these devices within [now - lookback, now + ahead)."""
    if not device_ids:
        raise ValueError("device_ids must not be empty")
    if lookback_us <= 0 or ahead_us < 0:
        raise ValueError("lookback_us must be positive and ahead_us not negative")
    steps = _source(bucket, now_us - lookback_us, now_us + ahead_us)
    steps.append(
        f"filter(fn: (r) => r._measurement == {flux_string(measurement)}"
        f" and ({_any_of('device_id', device_ids)}))"
    )
    steps.append("last()")
    steps.append('keep(columns: ["device_id", "_time", "_field", "_value"])')
    return "\n  |> ".join(steps) + "\n"
