"""CPU one Prometheus scrape of `/metrics` costs the app.

    .venv/bin/python bench/metrics_scrape.py                 # a new PostgreSQL database
    .venv/bin/python bench/metrics_scrape.py --devices 100000

Starts `iotmeter serve` in a subprocess (collector on the broker at --mqtt-url, auth on),
registers N devices of a few types, sends requests to many API routes (so the HTTP families hold
the series a busy API has), then scrapes `GET /metrics` over HTTP with a viewer key and reads the
server process's CPU time (psutil) before and after: the CPU per scrape is everything the app
does for it (HTTP, key check, registry query, collectors, text). The database server's own work
is not the app's and is not counted. A scrape runs no query: the registry's figures are read by
a task every 5 s, whose CPU per read is measured apart (the same statement, in this process).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures.delivery import AppProcess, app_environment
from tests.fixtures.services import create_pg_database, drop_pg_database

from iotmeter.db.base import utcnow
from iotmeter.db.engine import Database, build_engine
from iotmeter.db.migrate import upgrade_async
from iotmeter.repositories.devices import DeviceRepository
from iotmeter.repositories.operations import read_registry_figures
from iotmeter.services.keys import create_key

TYPES = ("temperature", "humidity", "power_meter", "gateway", "valve")
ROUTES = (
    "/api/v1/devices",
    "/api/v1/devices/bench-000001",
    "/api/v1/devices/missing",
    "/api/v1/devices/bench-000001/configs",
    "/api/v1/devices/bench-000001/telemetry",
    "/api/v1/devices/bench-000001/raw",
    "/api/v1/devices/bench-000001/credentials",
    "/api/v1/alerts",
    "/api/v1/alert-rules",
    "/api/v1/channels",
    "/api/v1/dead-letters",
    "/api/v1/stats",
    "/api/v1/stats/devices",
    "/api/v1/certificates",
    "/health",
    "/ready",
    "/nothing",
)


async def prepare(database_url: str, devices: int) -> str:
    """Migrate, register the devices, make a viewer key; returns the key."""
    await upgrade_async(database_url)
    database = Database(build_engine(database_url))
    try:
        async with database.transaction() as session:
            repository = DeviceRepository(session)
            for start in range(0, devices, 5000):
                await repository.register_missing(
                    {
                        f"bench-{n:06d}": TYPES[n % len(TYPES)]
                        for n in range(start, min(devices, start + 5000))
                    }
                )
            _row, key = await create_key(session, name="prometheus", role="viewer", expires_at=None)
    finally:
        await database.close()
    return key


async def scrapes_cpu(
    client: httpx.AsyncClient, process: psutil.Process, count: int, spacing_s: float
) -> tuple[float, int]:
    """Server CPU seconds per scrape, and the size of the last answer."""
    before = process.cpu_times()
    size = 0
    for _ in range(count):
        response = await client.get("/metrics")
        assert response.status_code == 200, response.text
        size = len(response.content)
        if spacing_s:
            await asyncio.sleep(spacing_s)
    after = process.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return used / count, size


async def idle_cpu(process: psutil.Process, seconds: float) -> float:
    """Server CPU per second with nothing asked of it (the collector, housekeeping...)."""
    before = process.cpu_times()
    await asyncio.sleep(seconds)
    after = process.cpu_times()
    return ((after.user - before.user) + (after.system - before.system)) / seconds


async def registry_read_cpu(database_url: str, reads: int) -> float:
    """Process CPU seconds of one read of the registry's figures (the metrics task's query)."""
    database = Database(build_engine(database_url))
    try:
        since = utcnow() - timedelta(minutes=5)
        async with database.reader() as connection:
            await read_registry_figures(connection, since)
        started = time.process_time()
        for _ in range(reads):
            async with database.reader() as connection:
                await read_registry_figures(connection, since)
        return (time.process_time() - started) / reads
    finally:
        await database.close()


async def run(args: argparse.Namespace, database_url: str) -> None:
    key = await prepare(database_url, args.devices)
    with tempfile.TemporaryDirectory(prefix="iotmeter-bench-metrics-") as folder:
        workdir = Path(folder)
        env = app_environment(
            database_url=database_url,
            mqtt_url=args.mqtt_url,
            workdir=workdir,
            client_id=f"iotmeter-bench-metrics-{time.time_ns()}",
            IOTMETER_LOG_LEVEL="WARNING",
            IOTMETER_RATE_LIMIT_PER_KEY="1000000/second",
            IOTMETER_RATE_LIMIT_PER_ADDRESS="1000000/second",
        )
        app = AppProcess(env, workdir)
        await app.start(wait="ready")
        try:
            assert app.process is not None
            server = psutil.Process(app.process.pid)
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=app.base_url, headers=headers) as client:
                for path in ROUTES:
                    for _ in range(3):
                        await client.get(path)
                await client.post("/api/v1/devices", json={"device_id": "bad id"})
                await scrapes_cpu(client, server, 10, 0)  # warm-up
                idle = await idle_cpu(server, 5)
                cached, size = await scrapes_cpu(client, server, args.scrapes, 0)
                text = (await client.get("/metrics")).text
        finally:
            await app.terminate()
            app.close()
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    read_ms = await registry_read_cpu(database_url, 200) * 1000
    print(
        f"/metrics of `iotmeter serve`, {args.devices:,} devices registered: "
        f"{size:,} bytes, {series} series"
    )
    print(f"  app CPU per scrape ({args.scrapes} back to back): {cached * 1000:.2f} ms")
    print(f"  app CPU idle (collector, tasks): {idle * 1000:.1f} ms per second")
    print(
        f"  registry figures, one read (every 5 s, not per scrape): {read_ms:.2f} ms CPU, "
        f"{read_ms / 5 / 10:.3f}% of a core"
    )


async def main_async(args: argparse.Namespace) -> None:
    if args.database_url:
        await run(args, args.database_url)
        return
    url = await create_pg_database("iotmeter_bench_metrics")
    try:
        await run(args, url)
    finally:
        await drop_pg_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=300)
    parser.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--database-url", help="default: a new database on 127.0.0.1:5432")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
