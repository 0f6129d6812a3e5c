"""Bytes per reading of the PostgreSQL time series: `python bench/storage_size.py [--hours N]`.

    .venv/bin/python bench/storage_size.py              # 100 devices x 4 fields / 10 s, 24 h
    .venv/bin/python bench/storage_size.py --hours 1 --rollups backfill

Writes a fleet (each field a random walk with two decimals, each device at its own phase of the
interval) through `SqlTimeSeriesStore` into a new PostgreSQL database, for the `--hours` that
end at the last full hour (the past, where a deployment's older data lies, in the app's hourly
and daily partitions unless `--history`), and lets the store's lifecycle compute the rollups:

- `--rollups live` (default): the store's clock follows the data, as if it arrived in real
  time, and `maintain()` runs between batches as the lifecycle task would; the rollups are
  computed a minute (and an hour) at a time as the windows close.
- `--rollups backfill`: written with the rollups off, then a store with them on is started
  and `maintain()` backfills the older data an hour at a time (a deployment upgraded with
  data already in it).

The writes run with compaction off. Then `VACUUM ANALYZE`, and the sizes of every partition
(pg_inherits) of `telemetry` (heap, primary key, BRIN index), `telemetry_compact`, the
rollup tables and `telemetry_latest`, divided by the readings written, next to the per-row
theory of PostgreSQL's page layout; then the same after the lifecycle compacted the closed
hours (when the store has compaction). The rollups are checked against the aggregates of the
values written. Prints the tables and, last, one JSON line with every figure. The database
is dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures.readings import reading
from tests.fixtures.services import create_pg_database, drop_pg_database

from iotmeter.db.engine import Database, build_engine
from iotmeter.db.migrate import upgrade_async
from iotmeter.readings import ReadingSet
from iotmeter.storage.timeseries import partitions
from iotmeter.storage.timeseries.rollups import HOUR_US, MINUTE_US, floor_to, system_clock_us
from iotmeter.storage.timeseries.sql import Lifecycle, SqlTimeSeriesStore

SECOND_US = 1_000_000
DAY_US = 86_400_000_000

# PostgreSQL's page layout (8 kB pages, 8-byte MAXALIGN, 64-bit build).
PAGE = 8192
PAGE_HEADER = 24
LINE_POINTER = 4
HEAP_TUPLE_HEADER = 24
"""23 bytes of HeapTupleHeaderData, padded to 8 (no null bitmap: every column is NOT NULL)."""
INDEX_TUPLE_HEADER = 8
BTREE_SPECIAL = 16
BTREE_LEAF_FILL = 0.90
"""Default btree fillfactor: a sorted build leaves leaves this full, and so does a split where
the keys of one series arrive in increasing order (PostgreSQL 12+ splits after the new key)."""
ROLLUP_VALUES = 6
"""min, max, sum, first, last (float8) and count (bigint) in a rollup row."""


@dataclass(frozen=True, slots=True)
class Profile:
    """How one field behaves: a random walk of `step` (standard deviation) per reading."""

    name: str
    low: float
    high: float
    step: float


PROFILES = (
    Profile("temperature", -10.0, 45.0, 0.05),
    Profile("humidity", 5.0, 100.0, 0.3),
    Profile("voltage", 207.0, 253.0, 0.4),
    Profile("power", 0.0, 4000.0, 25.0),
    Profile("current", 0.0, 16.0, 0.1),
    Profile("pressure", 950.0, 1050.0, 0.1),
    Profile("co2", 400.0, 3000.0, 5.0),
    Profile("battery", 3.0, 4.2, 0.002),
)


class Fleet:
    """Devices whose readings are random walks: what a fleet of meters sends. Keeps, per
    series and hour, the aggregates the rollups must hold (to check them)."""

    def __init__(self, devices: int, fields: int, start_us: int, interval_us: int) -> None:
        self.random = random.Random(15)
        self.profiles = [
            PROFILES[index] if index < len(PROFILES) else Profile(f"field{index}", 0, 100, 0.5)
            for index in range(fields)
        ]
        # Each device at its own phase of the interval, so the batches are in time order.
        phases = [(self.random.randrange(interval_us), f"meter-{n:04d}") for n in range(devices)]
        self.devices = sorted(phases)
        self.values = {
            device: [
                p.low + (p.high - p.low) * self.random.uniform(0.3, 0.7) for p in self.profiles
            ]
            for _, device in self.devices
        }
        self.start_us = start_us
        self.interval_us = interval_us
        self.readings = 0
        self.minute_windows = 0
        self.last_minute: dict[str, int] = {}
        self.hours: dict[tuple[str, str, int], list[float]] = {}
        """(device, field, hour) -> [min, max, sum, count, first, last]."""

    def tick(self, tick: int) -> list[ReadingSet]:
        """Every device's reading of one interval, in time order."""
        gauss = self.random.gauss
        sets = []
        base = self.start_us + tick * self.interval_us
        for phase, device in self.devices:
            epoch_us = base + phase
            state = self.values[device]
            values: dict[str, float | bool] = {}
            for index, profile in enumerate(self.profiles):
                value = state[index] + gauss(0.0, profile.step)
                if not profile.low <= value <= profile.high:  # reflect at the bounds
                    value = state[index] - (value - state[index])
                state[index] = value
                values[profile.name] = round(value, 2)
            sets.append(reading(device, epoch_us, values, "meter"))
            self._count(device, epoch_us, values)
        return sets

    def _count(self, device: str, epoch_us: int, values: dict[str, float | bool]) -> None:
        self.readings += len(values)
        minute = floor_to(epoch_us, MINUTE_US)
        if self.last_minute.get(device) != minute:
            self.last_minute[device] = minute
            self.minute_windows += len(values)
        hour = floor_to(epoch_us, HOUR_US)
        for name, raw in values.items():
            value = float(raw)
            known = self.hours.get((device, name, hour))
            if known is None:
                self.hours[(device, name, hour)] = [value, value, value, 1, value, value]
            else:
                known[0] = min(known[0], value)
                known[1] = max(known[1], value)
                known[2] += value
                known[3] += 1
                known[5] = value


class SimulatedClock:
    """The store's clock: the time the data being written arrives, or the real time."""

    def __init__(self) -> None:
        self.now_us: int | None = None

    def __call__(self) -> int:
        return system_clock_us() if self.now_us is None else self.now_us


async def catch_up(store: SqlTimeSeriesStore) -> float:
    """Run the lifecycle until the rollups have nothing left to do; seconds taken."""
    started = time.perf_counter()
    while await store.rollups_pending():
        await store.maintain(budget_s=30)
    return time.perf_counter() - started


async def write_fleet(
    store: SqlTimeSeriesStore,
    fleet: Fleet,
    clock: SimulatedClock,
    ticks: int,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Write `ticks` intervals of the fleet, `args.batch` intervals a write; with a live
    clock, run the lifecycle after each write (the clock is the arrival time of the batch)."""
    seconds = {"generate_s": 0.0, "write_s": 0.0, "rollups_s": 0.0}
    batch = args.batch
    for first in range(0, ticks, batch):
        started = time.perf_counter()
        sets = [
            item for tick in range(first, min(first + batch, ticks)) for item in fleet.tick(tick)
        ]
        if args.order == "series":
            sets.sort(key=lambda item: (item.device_id, item.epoch_us))
        written = time.perf_counter()
        if clock.now_us is not None:
            clock.now_us = fleet.start_us + first * fleet.interval_us
        await store.write(sets)
        seconds["generate_s"] += written - started
        seconds["write_s"] += time.perf_counter() - written
        if clock.now_us is not None:
            seconds["rollups_s"] += await catch_up(store)
    return seconds


LIFECYCLE_OPTIONS = {option.name for option in dataclasses.fields(Lifecycle)}


def lifecycle(**options: Any) -> Lifecycle:
    """The store's lifecycle with `options`, leaving out those this version does not have."""
    return Lifecycle(
        **{name: value for name, value in options.items() if name in LIFECYCLE_OPTIONS}
    )


async def compact(database: Database) -> float:
    """Run the lifecycle (compaction on) until it compacts no more hours, then once more (an
    emptied partition is dropped a round later); seconds taken."""
    store = SqlTimeSeriesStore(database, lifecycle=Lifecycle())
    started = time.perf_counter()
    while True:
        before = store.compacted_hours
        await store.maintain(budget_s=30)
        if store.compacted_hours == before:
            break
    await store.maintain(budget_s=30)
    return time.perf_counter() - started


async def move_history_bound(driver: Any, before_us: int) -> None:
    """End each `_history` partition (still empty) before the data, as on a database
    migrated before the fleet started: the data lands in the app's own hourly and daily
    partitions, where a deployment's older data lies."""
    for table, spec in partitions.TABLES.items():
        span = spec[1] if isinstance(spec, tuple) else DAY_US
        history = f"{table}_history"
        if await driver.fetchval("SELECT to_regclass($1)", history) is None:
            continue
        await driver.execute(f"ALTER TABLE {table} DETACH PARTITION {history}")
        await driver.execute(
            f"ALTER TABLE {table} ATTACH PARTITION {history} "
            f"FOR VALUES FROM (MINVALUE) TO ({floor_to(before_us, span)})"
        )


async def fill(
    database: Database, fleet: Fleet, args: argparse.Namespace, ticks: int
) -> dict[str, float]:
    """The fleet written and the rollups computed, by the mode `args.rollups` names."""
    clock = SimulatedClock()
    if args.rollups == "live":
        clock.now_us = fleet.start_us
        store = SqlTimeSeriesStore(database, lifecycle=lifecycle(compaction=False), clock=clock)
        await store.prepare()
        seconds = await write_fleet(store, fleet, clock, ticks, args)
        clock.now_us = None  # the rest of the windows, up to now
        seconds["rollups_s"] += await catch_up(store)
        return seconds
    writer = SqlTimeSeriesStore(
        database, lifecycle=lifecycle(rollups=False, compaction=False), clock=clock
    )
    await writer.prepare()
    seconds = await write_fleet(writer, fleet, clock, ticks, args)
    store = SqlTimeSeriesStore(database, lifecycle=lifecycle(compaction=False), clock=clock)
    started = time.perf_counter()
    await store.prepare()
    seconds["rollups_s"] = await catch_up(store) + time.perf_counter() - started
    return seconds


# -- measuring ---------------------------------------------------------------------------------

_PARTS = (
    "WITH parts AS (SELECT $1::regclass::oid AS oid UNION ALL "
    "SELECT inhrelid FROM pg_inherits WHERE inhparent = $1::regclass) "
)
_SIZES = _PARTS + (
    "SELECT sum(pg_relation_size(p.oid)) AS heap_main, sum(pg_table_size(p.oid)) AS heap, "
    "sum(pg_indexes_size(p.oid)) AS indexes, sum(pg_total_relation_size(p.oid)) AS total, "
    "sum(pg_total_relation_size(p.oid)) FILTER (WHERE pg_relation_size(p.oid) = 0 AND "
    "p.oid <> $1::regclass) AS empty_partitions_total, "
    "count(*) FILTER (WHERE pg_relation_size(p.oid) > 0) AS filled, "
    "count(*) - 1 AS partitions FROM parts p"
)
_INDEXES = _PARTS + (
    "SELECT CASE WHEN i.indisprimary THEN 'pkey' ELSE am.amname END AS kind, "
    "sum(pg_total_relation_size(i.indexrelid)) AS bytes, sum(pg_total_relation_size(i.indexrelid)) "
    "FILTER (WHERE pg_relation_size(p.oid) > 0) AS filled_bytes FROM parts p "
    "JOIN pg_index i ON i.indrelid = p.oid JOIN pg_class c ON c.oid = i.indexrelid "
    "JOIN pg_am am ON am.oid = c.relam GROUP BY 1"
)
RAW, MINUTE, HOUR, LATEST = (
    "telemetry",
    "telemetry_rollup_1m",
    "telemetry_rollup_1h",
    "telemetry_latest",
)
COMPACT = "telemetry_compact"
"""Compacted hours (one row per series and hour), measured when the schema has it."""


async def measure(driver: Any) -> dict[str, dict[str, int]]:
    """Per table: rows, bytes of heap (all forks; `heap_main` the data pages), indexes by
    kind, total, partitions, those with data, and the bytes of the empty ones."""
    found = {}
    for table in (RAW, COMPACT, MINUTE, HOUR, LATEST):
        if await driver.fetchval("SELECT to_regclass($1)", table) is None:
            continue
        sizes = await driver.fetchrow(_SIZES, table)
        figures = {name: int(value or 0) for name, value in sizes.items()}
        figures["rows"] = int(await driver.fetchval(f"SELECT count(*) FROM {table}"))
        for kind, size, filled_size in await driver.fetch(_INDEXES, table):
            figures[f"index_{kind}"] = int(size)
            figures[f"index_{kind}_filled"] = int(filled_size or 0)
        found[table] = figures
    return found


_HOURS_OF = {
    HOUR: f"SELECT device_id, field, bucket_us, min_value, max_value, sum_value, count, "
    f"first_value, last_value FROM {HOUR}",
    # The minute rows, combined per hour: checked against the same truth.
    MINUTE: f"SELECT device_id, field, bucket_us - bucket_us % {HOUR_US}, min(min_value), "
    "max(max_value), sum(sum_value), sum(count), (array_agg(first_value ORDER BY bucket_us))[1], "
    f"(array_agg(last_value ORDER BY bucket_us DESC))[1] FROM {MINUTE} GROUP BY 1, 2, 3",
}


async def wrong_rollups(driver: Any, fleet: Fleet) -> dict[str, int]:
    """Per rollup, the hours whose windows are missing, extra, or differ from what was
    written (min, max, count, first, last exact; sum to 1e-9)."""
    wrong = {}
    for table, sql in _HOURS_OF.items():
        found = {(d, f, int(h)): values for d, f, h, *values in await driver.fetch(sql)}
        bad = len(found.keys() ^ fleet.hours.keys())
        for key, truth in fleet.hours.items():
            row = found.get(key)
            if row is None:
                continue
            low, high, total, count, first, last = row
            if (low, high, int(count), first, last) != (
                truth[0],
                truth[1],
                truth[3],
                truth[4],
                truth[5],
            ) or abs(total - truth[2]) > 1e-9 * max(1.0, abs(truth[2])):
                bad += 1
        wrong[table] = bad
    minute_rows = await driver.fetchval(f"SELECT count(*) FROM {MINUTE}")
    wrong["minute_rows_missing_or_extra"] = abs(int(minute_rows) - fleet.minute_windows)
    return wrong


# -- theory ------------------------------------------------------------------------------------


def _align(size: float) -> float:
    return -(-size // 8) * 8


def key_bytes(device: str, field: str) -> float:
    """(device_id, field, time): two short varlenas (1-byte header, unaligned), padded to 8
    for the bigint."""
    return _align(1 + len(device.encode()) + 1 + len(field.encode())) + 8


@dataclass(frozen=True, slots=True)
class RowTheory:
    header: float
    columns: float
    per_row: float
    """Bytes a row costs on full pages (heap) or leaves at the btree fill factor (index)."""

    def describe(self, fill: str) -> str:
        item = self.header + self.columns + LINE_POINTER
        return (
            f"{self.header:.0f} header + {self.columns:.1f} columns + {LINE_POINTER} line "
            f"pointer = {item:.1f} B; {self.per_row:.1f} B with {fill}"
        )


def heap_theory(keys: Sequence[float], values: int) -> RowTheory:
    columns = sum(key + 8 * values for key in keys) / len(keys)
    item = HEAP_TUPLE_HEADER + columns + LINE_POINTER
    return RowTheory(HEAP_TUPLE_HEADER, columns, item * PAGE / (PAGE - PAGE_HEADER))


def btree_theory(keys: Sequence[float]) -> RowTheory:
    columns = sum(keys) / len(keys)
    item = INDEX_TUPLE_HEADER + columns + LINE_POINTER
    usable = (PAGE - PAGE_HEADER - BTREE_SPECIAL) * BTREE_LEAF_FILL
    return RowTheory(INDEX_TUPLE_HEADER, columns, item * PAGE / usable)


# -- report ------------------------------------------------------------------------------------


def figures_of(
    sizes: dict[str, dict[str, int]], readings: int, keys: Sequence[float]
) -> dict[str, Any]:
    """Bytes, bytes per reading, and the theory of each part."""
    raw, minute, hour = sizes[RAW], sizes[MINUTE], sizes[HOUR]
    heap, pkey = heap_theory(keys, 1), btree_theory(keys)
    rollup_heap = heap_theory(keys, ROLLUP_VALUES)
    rollup_row = rollup_heap.per_row + pkey.per_row
    compact = sizes.get(COMPACT, {}).get("total", 0)
    parts: dict[str, tuple[int, float | None]] = {
        "raw heap": (raw["heap"], heap.per_row),
        "raw primary key": (raw.get("index_pkey", 0), pkey.per_row),
        "raw BRIN index": (raw.get("index_brin", 0), None),
        "raw indexes": (raw["indexes"], pkey.per_row),
        "raw total": (raw["total"], heap.per_row + pkey.per_row),
    }
    if COMPACT in sizes:
        parts["compact total"] = (compact, None)
    parts["rollups 1m"] = (minute["total"], rollup_row * minute["rows"] / readings)
    parts["rollups 1h"] = (hour["total"], rollup_row * hour["rows"] / readings)
    parts["rollups"] = (
        minute["total"] + hour["total"],
        rollup_row * (minute["rows"] + hour["rows"]) / readings,
    )
    parts["latest"] = (sizes[LATEST]["total"], None)
    parts["everything"] = (
        sum(table["total"] for table in sizes.values()),
        heap.per_row + pkey.per_row + rollup_row * (minute["rows"] + hour["rows"]) / readings,
    )
    return {
        "parts": {
            name: {"bytes": size, "per_reading": size / readings, "theory_per_reading": theory}
            for name, (size, theory) in parts.items()
        },
        "empty_partitions_bytes": sum(t["empty_partitions_total"] for t in sizes.values()),
        "theory": {
            "raw heap row": heap.describe("full 8 kB pages"),
            "raw key entry": pkey.describe(f"leaves {BTREE_LEAF_FILL:.0%} full"),
            "rollup heap row": rollup_heap.describe("full 8 kB pages"),
        },
    }


def print_sizes(title: str, stage: dict[str, Any], *, theory: bool) -> None:
    sizes, parts = stage["sizes"], stage["figures"]["parts"]
    print(f"\n  {title}")
    for table, found in sizes.items():
        print(
            f"    {table:20s} {found['rows']:>10,} rows  heap {found['heap'] / 2**20:7.1f} MiB  "
            f"indexes {found['indexes'] / 2**20:6.1f} MiB  "
            + (
                f"{found['filled']} of {found['partitions']} partitions hold rows"
                if found["partitions"]
                else "not partitioned"
            )
        )
    print(f"\n    {'':18s} {'MiB':>9s} {'B/reading':>10s} {'theory' if theory else '':>8s}")
    for name, part in parts.items():
        expected = part["theory_per_reading"] if theory else None
        print(
            f"    {name:18s} {part['bytes'] / 2**20:9.2f} {part['per_reading']:10.2f} "
            + (f"{expected:8.2f}" if expected is not None else "")
        )
    empty = stage["figures"]["empty_partitions_bytes"]
    print(f"    (of which empty partitions, made ahead: {empty / 2**20:.2f} MiB)")


def print_theory(report: dict[str, Any]) -> None:
    stage = report["written"]
    print("\n  theory per row (8-byte alignment, 24 B page header per 8 kB page):")
    for name, text in stage["figures"]["theory"].items():
        print(f"    {name:16s} {text}")
    for table in (RAW, MINUTE):
        found = stage["sizes"][table]
        if found["rows"]:
            print(
                f"    {table:20s} measured: heap {found['heap_main'] / found['rows']:.1f} B/row, "
                f"primary key {found.get('index_pkey_filled', 0) / found['rows']:.1f} B/row"
            )
    rebuilt = report["raw_pkey_after_reindex_bytes"]
    print(
        f"    {RAW:20s} after REINDEX: primary key {rebuilt / report['readings']:.1f} B/row "
        "(the rest was free space left by the inserts' page splits)"
    )


def print_report(report: dict[str, Any]) -> None:
    print(
        f"\n{report['readings']:,} readings ({report['devices']} devices x {report['fields']} "
        f"fields every {report['interval_s']} s for {report['hours']} h; rollups "
        f"{report['rollups_mode']}, written in {report['order']} order into the "
        f"{report['partitions']} partitions)"
    )
    print_sizes("as written (compaction off), after VACUUM:", report["written"], theory=True)
    print_theory(report)
    if report["compacted"] is not None:
        print_sizes(
            "after compaction of the closed hours, VACUUM:", report["compacted"], theory=False
        )
    seconds = report["seconds"]
    print(
        f"\n  write {seconds['write_s']:.1f} s ({report['readings'] / seconds['write_s']:,.0f} "
        f"readings/s), rollups {seconds['rollups_s']:.1f} s, compaction "
        f"{seconds.get('compaction_s', 0):.1f} s, VACUUM ANALYZE {seconds['vacuum_s']:.1f} s; "
        f"rollup check (0 = right): {report['wrong_rollups']}"
    )


async def vacuumed_sizes(
    database_url: str, seconds: dict[str, float], fleet: Fleet
) -> dict[str, Any]:
    """VACUUM ANALYZE, then the sizes and their figures."""
    driver = await asyncpg.connect(database_url)
    try:
        started = time.perf_counter()
        await driver.execute("VACUUM ANALYZE")
        seconds["vacuum_s"] = seconds.get("vacuum_s", 0.0) + time.perf_counter() - started
        sizes = await measure(driver)
    finally:
        await driver.close()
    keys = [key_bytes(device, p.name) for _, device in fleet.devices for p in fleet.profiles]
    return {"sizes": sizes, "figures": figures_of(sizes, fleet.readings, keys)}


async def measure_stages(
    database_url: str, fleet: Fleet, args: argparse.Namespace
) -> dict[str, Any]:
    interval_us = args.interval * SECOND_US
    database = Database(build_engine(database_url))
    try:
        seconds = await fill(database, fleet, args, args.hours * HOUR_US // interval_us)
        written = await vacuumed_sizes(database_url, seconds, fleet)
        driver = await asyncpg.connect(database_url)
        try:
            # The same keys in a freshly built primary key: what the inserts' page splits cost.
            await driver.execute(f"REINDEX TABLE {RAW}")
            rebuilt = {kind: size for kind, _, size in await driver.fetch(_INDEXES, RAW)}
        finally:
            await driver.close()
        compacted = None
        if "compaction" in LIFECYCLE_OPTIONS:
            seconds["compaction_s"] = await compact(database)
            compacted = await vacuumed_sizes(database_url, seconds, fleet)
    finally:
        await database.close()
    driver = await asyncpg.connect(database_url)
    try:
        wrong = await wrong_rollups(driver, fleet)
    finally:
        await driver.close()
    return {
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "written": written,
        "raw_pkey_after_reindex_bytes": int(rebuilt.get("pkey") or 0),
        "compacted": compacted,
        "wrong_rollups": wrong,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    # Up to the last hour that closed at least two minutes ago: every rollup window settles.
    stop_us = floor_to(system_clock_us() - 2 * MINUTE_US, HOUR_US)
    interval_us = args.interval * SECOND_US
    fleet = Fleet(args.devices, args.fields, stop_us - args.hours * HOUR_US, interval_us)
    database_url = await create_pg_database("iotmeter_bench")
    try:
        await upgrade_async(database_url)
        if not args.history:
            driver = await asyncpg.connect(database_url)
            try:
                await move_history_bound(driver, fleet.start_us)
            finally:
                await driver.close()
        stages = await measure_stages(database_url, fleet, args)
    finally:
        await drop_pg_database(database_url)
    return {
        "rollups_mode": args.rollups,
        "order": args.order,
        "partitions": "history" if args.history else "hourly and daily",
        "devices": args.devices,
        "fields": args.fields,
        "interval_s": args.interval,
        "hours": args.hours,
        "readings": fleet.readings,
        **stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--fields", type=int, default=4, help="values a reading (first 8 named)")
    parser.add_argument("--interval", type=int, default=10, help="seconds between readings")
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--batch", type=int, default=50, help="intervals a write")
    parser.add_argument("--rollups", choices=("live", "backfill"), default="live")
    parser.add_argument(
        "--order",
        choices=("time", "series"),
        default="time",
        help="a batch's readings as they arrive, or sorted by device and time",
    )
    parser.add_argument(
        "--history",
        action="store_true",
        help="leave the data in the `_history` partitions (a database migrated today)",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    if not args.json:
        print_report(report)
    print(orjson.dumps(report).decode())


if __name__ == "__main__":
    main()
