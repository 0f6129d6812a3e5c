"""Streaming export speed and the server's memory: `python bench/export_speed.py [--points N]`.

    .venv/bin/python bench/export_speed.py                    # 1,000,000 points, new PostgreSQL db
    .venv/bin/python bench/export_speed.py --points 10000000 --fields 4

Writes N points of one device (`--fields` fields a reading, one reading a second) into a new
PostgreSQL database, starts `iotmeter serve` on it in a subprocess, then streams
`GET /api/v1/devices/{id}/telemetry/export` in each format to this process (which only counts
lines) and prints rows/s and the server's RSS before and at its peak during the export
(`VmHWM`, reset before each export). The database is dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures.delivery import AppProcess, app_environment
from tests.fixtures.readings import SECOND_US, reading
from tests.fixtures.services import create_pg_database, drop_pg_database

from iotmeter.db.engine import Database, build_engine
from iotmeter.db.migrate import upgrade_async
from iotmeter.storage.timeseries.sql import SqlTimeSeriesStore

BASE_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
DEVICE = "bench-meter"


async def write_points(database_url: str, points: int, fields: int) -> float:
    names = [f"field{index}" for index in range(fields)]
    database = Database(build_engine(database_url))
    started = time.perf_counter()
    try:
        store = SqlTimeSeriesStore(database)
        steps = points // fields
        for first in range(0, steps, 20_000):
            await store.write(
                [
                    reading(DEVICE, BASE_US + n * SECOND_US, dict.fromkeys(names, n * 0.25))
                    for n in range(first, min(first + 20_000, steps))
                ]
            )
    finally:
        await database.close()
    return time.perf_counter() - started


def memory_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


async def export_once(app: AppProcess, form: str) -> None:
    assert app.process is not None
    pid = app.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := current RSS
    before = memory_kib(pid)["VmRSS"]
    lines = cursors = size = 0
    started = time.perf_counter()
    async with (
        httpx.AsyncClient(base_url=app.base_url, headers=app.headers, timeout=300) as client,
        client.stream(
            "GET", f"/api/v1/devices/{DEVICE}/telemetry/export", params={"format": form}
        ) as response,
    ):
        response.raise_for_status()
        marker = b"# cursor=" if form == "csv" else b'{"cursor":'
        async for chunk in response.aiter_bytes():
            lines += chunk.count(b"\n")
            cursors += chunk.count(marker)
            size += len(chunk)
    seconds = time.perf_counter() - started
    rows = lines - cursors - 1 - (1 if form == "csv" else 0)  # end line, CSV header
    peak = memory_kib(pid)["VmHWM"]
    print(
        f"{form:6s}: {rows:,} rows in {seconds:.2f} s = {rows / seconds:,.0f} rows/s, "
        f"{size / seconds / 1e6:.0f} MB/s; server RSS {before / 1024:.0f} MiB before, peak "
        f"{peak / 1024:.0f} MiB (+{(peak - before) / 1024:.1f} MiB)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--fields", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=None, help="IOTMETER_EXPORT_CHUNK_POINTS")
    parser.add_argument("--rounds", type=int, default=2, help="exports per format")
    args = parser.parse_args()

    database_url = await create_pg_database("iotmeter_bench")
    try:
        await upgrade_async(database_url)
        seconds = await write_points(database_url, args.points, args.fields)
        print(f"wrote {args.points:,} points in {seconds:.1f} s")
        with tempfile.TemporaryDirectory(prefix="iotmeter-bench-export-") as folder:
            extra = {"IOTMETER_EXPORT_CHUNK_POINTS": str(args.chunk)} if args.chunk else {}
            env = app_environment(
                database_url=database_url,
                mqtt_url="mqtt://127.0.0.1:1",
                workdir=Path(folder),
                client_id="bench-export",
                IOTMETER_COLLECTOR_ENABLED="false",
                IOTMETER_CONFIG_PUSH_ENABLED="false",
                IOTMETER_LOG_LEVEL="WARNING",
                **extra,
            )
            app = AppProcess(env, Path(folder))
            try:
                await app.start(wait="health")
                async with httpx.AsyncClient(base_url=app.base_url, headers=app.headers) as client:
                    device = {"id": DEVICE, "name": DEVICE, "type": "meter"}
                    (await client.post("/api/v1/devices", json=device)).raise_for_status()
                for _ in range(args.rounds):
                    for form in ("csv", "ndjson"):
                        await export_once(app, form)
            finally:
                app.close()
    finally:
        await drop_pg_database(database_url)


if __name__ == "__main__":
    asyncio.run(main())
