"""Time to give N registered devices their MQTT credentials through the API.

    .venv/bin/python bench/api_credentials.py                 # a new PostgreSQL database
    .venv/bin/python bench/api_credentials.py --database-url postgresql+asyncpg://...

Runs the app in this process (its real lifespan, no broker), registers N devices, then times
N `POST /api/v1/devices/{id}/credentials` at the given concurrency, and prints requests per
second. This is the whole cost of credentials with the embedded broker, which reads them from the
registry at each connect; Mosquitto adds its own (bench/device_credentials.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fixtures.services import create_pg_database, drop_pg_database

from iotmeter.app import create_app
from iotmeter.config import Settings
from iotmeter.db.migrate import upgrade_async


async def run(database_url: str, devices: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory(prefix="iotmeter-bench-credentials-") as folder:
        settings = Settings(
            database_url=database_url,
            collector_enabled=False,
            simulator_enabled=False,
            auth_bootstrap_file=Path(folder) / "admin.key",
            device_credential_secret_file=Path(folder) / "secret",
            archive_dir=Path(folder) / "archive",
            spool_dir=Path(folder) / "spool",
            rate_limit_per_key="1000000/second",
            rate_limit_per_address="1000000/second",
            log_level="WARNING",
        )
        key_file = settings.auth_bootstrap_file
        app = create_app(settings)
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(
                transport=transport,
                base_url="http://iotmeter",
                # A fresh registry: the app made the admin key at start-up and wrote it here.
                headers={"Authorization": f"Bearer {key_file.read_text().strip()}"},
            ) as api:
                ids = [f"bench-{n:05d}" for n in range(devices)]
                queue: asyncio.Queue[str] = asyncio.Queue()

                async def worker(path: str, body: bool) -> None:
                    while not queue.empty():
                        device_id = queue.get_nowait()
                        if body:
                            response = await api.post(
                                path,
                                json={"id": device_id, "name": device_id, "type": "power"},
                            )
                        else:
                            response = await api.post(path.format(device_id=device_id))
                        if response.status_code != 201:
                            raise RuntimeError(response.text)

                async def timed(path: str, body: bool) -> float:
                    for device_id in ids:
                        queue.put_nowait(device_id)
                    started = time.perf_counter()
                    await asyncio.gather(*(worker(path, body) for _ in range(concurrency)))
                    return time.perf_counter() - started

                registering = await timed("/api/v1/devices", True)
                print(f"registered {devices} devices in {registering:.1f} s")
                seconds = await timed("/api/v1/devices/{device_id}/credentials", False)
                print(
                    f"credentials for {devices} devices: {seconds:.1f} s, "
                    f"{devices / seconds:,.0f}/s (concurrency {concurrency}, "
                    f"{database_url.split(':', 1)[0]})"
                )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--database-url", help="default: a new PostgreSQL database, dropped after")
    args = parser.parse_args()
    url = args.database_url
    made = None
    if url is None:
        made = await create_pg_database("iotmeter_bench")
        url = made.replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        await upgrade_async(url)
        await run(url, args.devices, args.concurrency)
    finally:
        if made is not None:
            await drop_pg_database(made)


if __name__ == "__main__":
    asyncio.run(main())
