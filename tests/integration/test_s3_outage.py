"""The S3 archive against a SeaweedFS that goes away and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from iotmeter.errors import BackendUnavailable
from iotmeter.readings import ReadingSet
from iotmeter.storage.archive.document import encode_archive_document
from iotmeter.storage.archive.s3 import S3ArchiveStore
from tests.fixtures.s3 import ACCESS_KEY, SECRET_KEY, new_bucket_name, open_test_s3_store
from tests.fixtures.services import SeaweedFS, running_seaweedfs

BASE_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
# Quick failure: refused connections are retried once, a silent server is given up in seconds.
QUICK = {"connect_timeout": 1, "read_timeout": 3, "max_attempts": 2}
OUTAGE_BUDGET_S = 15.0


@pytest.fixture
def private_seaweedfs() -> Iterator[SeaweedFS]:
    """A SeaweedFS of this test alone: it may be stopped and started again."""
    with running_seaweedfs() as server:
        yield server


def reading(index: int) -> ReadingSet:
    epoch_us = BASE_US + index * 1000
    return ReadingSet(
        device_id="dev-1",
        epoch_us=epoch_us,
        values={"temperature": 20.0 + index},
        topic="devices/dev-1/telemetry",
        received_at_us=epoch_us,
        raw=b'{"temperature":%d}' % (20 + index),
        msg_id=f"m-{index}",
    )


async def fails_quickly(call: Awaitable[Any], endpoint_url: str) -> None:
    began = time.monotonic()
    with pytest.raises(BackendUnavailable) as caught:
        await call
    assert time.monotonic() - began < OUTAGE_BUDGET_S
    assert endpoint_url in caught.value.message


async def put_within(store: S3ArchiveStore, readings: list[ReadingSet], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            await store.put(readings)
            return
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def until_healthy(store: S3ArchiveStore, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            await store.health()
            return
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def bucket_exists(server: SeaweedFS, bucket: str) -> bool:
    async with get_session().create_client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=AioConfig(s3={"addressing_style": "path"}),
    ) as client:
        try:
            await client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchBucket"):
                return False
            raise
    return True


async def test_outage_raises_backend_unavailable_then_the_same_store_recovers(
    private_seaweedfs: SeaweedFS,
) -> None:
    server = private_seaweedfs
    async with open_test_s3_store(server, **QUICK) as store:
        before = reading(1)
        await store.put([before])

        await asyncio.to_thread(server.stop)
        await fails_quickly(store.put([reading(2)]), server.endpoint_url)
        await fails_quickly(store.get(before.archive_key), server.endpoint_url)
        await fails_quickly(store.health(), server.endpoint_url)
        await fails_quickly(
            store.list("dev-1", BASE_US, BASE_US + 10**9, limit=10), server.endpoint_url
        )

        await asyncio.to_thread(server.start)
        await until_healthy(store)
        after = reading(3)
        # A restarted SeaweedFS may answer HeadBucket before its volumes take writes; the
        # collector's sink retries the same way, with the same store object.
        await put_within(store, [after], within_s=30.0)
        assert (await store.get(before.archive_key)).body == encode_archive_document(before)
        assert (await store.get(after.archive_key)).body == encode_archive_document(after)
        page = await store.list("dev-1", BASE_US, BASE_US + 10**9, limit=10)
        assert page.keys == [before.archive_key, after.archive_key]


async def test_s3_down_at_open_does_not_fail_and_the_bucket_comes_later(
    private_seaweedfs: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    server = private_seaweedfs
    bucket = new_bucket_name()
    await asyncio.to_thread(server.stop)
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="iotmeter.storage.archive.s3"):
        async with open_test_s3_store(server, bucket, **QUICK) as store:
            assert time.monotonic() - began < OUTAGE_BUDGET_S
            assert "retries on first use" in caplog.text
            await fails_quickly(store.put([reading(1)]), server.endpoint_url)

            await asyncio.to_thread(server.start)
            await until_healthy(store)
            # The first write after a restart may outlast the quick timeouts while SeaweedFS
            # assigns a volume (seen on a loaded machine); the collector retries, so do we.
            await put_within(store, [reading(1)], 30.0)
            assert await bucket_exists(server, bucket)
            assert (await store.get(reading(1).archive_key)).body == encode_archive_document(
                reading(1)
            )
    assert SECRET_KEY not in caplog.text


async def test_open_creates_a_missing_bucket(
    private_seaweedfs: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    server = private_seaweedfs
    bucket = new_bucket_name()
    assert not await bucket_exists(server, bucket)
    async with open_test_s3_store(server, bucket) as store:
        assert await bucket_exists(server, bucket)
        await store.put([reading(1)])
    # Two stores opening the same missing bucket at once: the loser of the CreateBucket race
    # is told BucketAlreadyOwnedByYou, which is success.
    other = new_bucket_name()
    with caplog.at_level(logging.WARNING, logger="iotmeter.storage.archive.s3"):
        async with contextlib.AsyncExitStack() as stack:
            first, second = await asyncio.gather(
                stack.enter_async_context(open_test_s3_store(server, other)),
                stack.enter_async_context(open_test_s3_store(server, other)),
            )
            await first.put([reading(2)])
            got = await second.get(reading(2).archive_key)
            assert got.body == encode_archive_document(reading(2))
    assert [
        record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING
    ] == []
