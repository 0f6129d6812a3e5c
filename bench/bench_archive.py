"""Archive write throughput: `python bench/bench_archive.py [documents] [batch]`.

Puts small (~200 B) documents through each backend's batch `put`: the local folder (in a temporary
folder), and S3 on a private SeaweedFS this script starts (fresh bucket, warmed by one PUT so its
first-write cost is not counted). For comparison it also measures plain aiobotocore PutObject
calls at concurrency 64, without the store. Prints documents/s and this process's CPU per
document for each.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.services import running_seaweedfs

from iotmeter.readings import ReadingSet
from iotmeter.storage.archive.base import ArchiveStore
from iotmeter.storage.archive.document import encode_archive_document
from iotmeter.storage.archive.local import LocalArchiveStore
from iotmeter.storage.archive.s3 import S3ArchiveStore

DEVICES = 100
RAW_CONCURRENCY = 64


def readings(count: int, start_us: int) -> list[ReadingSet]:
    result = []
    for n in range(count):
        device_id = f"sensor-{n % DEVICES:04d}"
        epoch_us = start_us + n * 1000
        values: dict[str, float | bool] = {"temperature": 21.5 + (n % 7) / 10, "humidity": 40.1}
        raw = orjson.dumps({"ts": epoch_us // 1000, "msg_id": f"m-{n:08d}", **values})
        result.append(
            ReadingSet(
                device_id=device_id,
                epoch_us=epoch_us,
                values=values,
                topic=f"iot/{device_id}/telemetry",
                received_at_us=epoch_us,
                raw=raw,
                msg_id=f"m-{n:08d}",
            )
        )
    return result


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def through_store(
    store: ArchiveStore, items: Sequence[ReadingSet], batch: int
) -> tuple[float, float]:
    """Documents/s, and this process's CPU milliseconds per document."""
    started, cpu = time.perf_counter(), cpu_seconds()
    for first in range(0, len(items), batch):
        await store.put(items[first : first + batch])
    seconds = time.perf_counter() - started
    return len(items) / seconds, 1000 * (cpu_seconds() - cpu) / len(items)


async def raw_put_objects(
    client: Any, bucket: str, items: Sequence[ReadingSet]
) -> tuple[float, float]:
    documents = [(item.archive_key, encode_archive_document(item)) for item in items]
    gate = asyncio.Semaphore(RAW_CONCURRENCY)

    async def one(key: str, body: bytes) -> None:
        async with gate:
            await client.put_object(
                Bucket=bucket, Key=key, Body=body, ContentType="application/json"
            )

    started, cpu = time.perf_counter(), cpu_seconds()
    await asyncio.gather(*(one(key, body) for key, body in documents))
    seconds = time.perf_counter() - started
    return len(documents) / seconds, 1000 * (cpu_seconds() - cpu) / len(documents)


async def main(count: int, batch: int) -> None:
    start_us = 1_767_225_600_000_000
    items = readings(count, start_us)
    sizes = [len(encode_archive_document(item)) for item in items]
    print(f"{count} documents of {min(sizes)}-{max(sizes)} B, store batches of {batch}")

    # The disk's own file-creation rate bounds the local store; tmpfs shows the store's overhead.
    places = [("disk", None)]
    if os.path.isdir("/dev/shm"):
        places.append(("tmpfs", "/dev/shm"))
    for place, parent in places:
        with tempfile.TemporaryDirectory(prefix="iotmeter-bench-", dir=parent) as folder:
            for fsync in (False, True):
                root = Path(folder) / f"archive-{fsync}"
                async with LocalArchiveStore.open(root, fsync=fsync) as store:
                    rate, cpu_ms = await through_store(store, items, batch)
                print(
                    f"local folder on {place} (fsync={fsync}):{rate:>10,.0f} documents/s, "
                    f"{cpu_ms:.3f} ms CPU each"
                )

    with running_seaweedfs() as server:
        for concurrency in (32, 64):
            async with S3ArchiveStore.open(
                endpoint_url=server.endpoint_url,
                bucket=f"bench-store-{concurrency}",
                access_key="bench",
                secret_key="bench-secret",
                concurrency=concurrency,
            ) as s3:
                await s3.put(readings(1, start_us - 10**9))  # the bucket's first-write cost
                rate, cpu_ms = await through_store(s3, items, batch)
            print(
                f"S3 store, SignedPut (concurrency {concurrency}):{rate:>11,.0f} documents/s, "
                f"{cpu_ms:.3f} ms CPU each"
            )

        config = AioConfig(
            s3={"addressing_style": "path"},
            max_pool_connections=RAW_CONCURRENCY,
            request_checksum_calculation="when_required",
        )
        async with get_session().create_client(
            "s3",
            endpoint_url=server.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench-secret",
            config=config,
        ) as client:
            await client.create_bucket(Bucket="bench-raw")
            await client.put_object(Bucket="bench-raw", Key="warm-up", Body=b"{}")
            rate, cpu_ms = await raw_put_objects(client, "bench-raw", items)
        print(
            f"aiobotocore PutObject (concurrency {RAW_CONCURRENCY}):{rate:>7,.0f} documents/s, "
            f"{cpu_ms:.3f} ms CPU each"
        )


if __name__ == "__main__":
    asyncio.run(
        main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 5000,
            int(sys.argv[2]) if len(sys.argv) > 2 else 1000,
        )
    )
