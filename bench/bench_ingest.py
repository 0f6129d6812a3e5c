"""Collector throughput: a paho publisher process -> Mosquitto -> iotmeter -> stores.

Starts its own Mosquitto (and SeaweedFS for the S3 archive) on free loopback ports, uses a fresh
database on the local PostgreSQL, runs the app in this process and publishes from a separate
process. Prints messages/s stored end to end (both stores written) and the publish rate.

    .venv/bin/python bench/bench_ingest.py --messages 20000 --devices 1000 --archive s3
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path

import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.s3 import s3_settings
from tests.fixtures.services import (
    create_pg_database,
    drop_pg_database,
    running_mosquitto,
    running_seaweedfs,
)

from iotmeter.app import open_state
from iotmeter.config import Settings
from iotmeter.db.migrate import upgrade_async


def publisher(port: int, messages: int, devices: int, started: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-publisher")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    started.wait()
    infos = []
    base_ms = int(time.time() * 1000) - messages
    for index in range(messages):
        device = f"bench-{index % devices:05d}"
        payload = orjson.dumps(
            {
                "ts": base_ms + index,
                "seq": index // devices,
                "msg_id": f"{device}-{index // devices}",
                "metrics": {"t": 20.0 + index % 7, "h": 40.5, "v": 230.1, "on": True},
            }
        )
        infos.append(client.publish(f"iot/{device}/telemetry", payload, qos=1))
    for info in infos:
        info.wait_for_publish(120)
    client.loop_stop()
    client.disconnect()


async def run(args: argparse.Namespace) -> None:
    with ExitStack() as services, tempfile.TemporaryDirectory() as workdir:
        broker = services.enter_context(running_mosquitto())
        overrides: dict[str, object] = {}
        if args.archive == "s3":
            overrides.update(s3_settings(services.enter_context(running_seaweedfs())))
        database_url = await create_pg_database("iotmeter_bench")
        try:
            await upgrade_async(database_url)
            settings = Settings(
                database_url=database_url,
                mqtt_url=broker.url,
                archive_dir=Path(workdir) / "archive",
                spool_dir=Path(workdir) / "spool",
                log_level="WARNING",
                **overrides,  # type: ignore[arg-type]
            )
            async with AsyncExitStack() as stack:
                state = await stack.enter_async_context(open_state(settings))
                while state.collector is None or not state.collector.connected:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                started = multiprocessing.Event()
                process = multiprocessing.Process(
                    target=publisher, args=(broker.port, args.messages, args.devices, started)
                )
                process.start()
                await asyncio.sleep(1.0)  # let the publisher connect
                me = psutil.Process()
                me.cpu_percent()
                begin = time.perf_counter()
                started.set()
                while state.stats.readings_stored < args.messages:
                    await asyncio.sleep(0.05)
                    if time.perf_counter() - begin > args.timeout:
                        break
                elapsed = time.perf_counter() - begin
                cpu = me.cpu_percent()
                process.join(30)
                stored = state.stats.readings_stored
                print(
                    f"archive={args.archive} messages={args.messages} devices={args.devices} "
                    f"stored={stored} seconds={elapsed:.2f} stored_per_s={stored / elapsed:.0f} "
                    f"app_cpu={cpu:.0f}% rss_mb={me.memory_info().rss / 2**20:.0f}"
                )
        finally:
            await drop_pg_database(database_url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=1_000)
    parser.add_argument("--archive", choices=["local", "s3"], default="s3")
    parser.add_argument("--timeout", type=float, default=300)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
