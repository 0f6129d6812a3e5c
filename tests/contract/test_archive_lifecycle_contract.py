"""Lifecycle behaviour every archive backend shares (the local folder and S3 on a real
SeaweedFS): write-once keys, the hash recorded with each message, the devices listed, usage."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iotmeter.storage.archive.document import encode_archive_document
from iotmeter.storage.archive.local import LocalArchiveStore
from iotmeter.storage.archive.segments import LayeredArchive, build_segment, segment_line
from tests.contract.test_archive_contract import BASE_US, MS, reading
from tests.fixtures.s3 import open_test_s3_store


@pytest.fixture(params=["local", "s3"])
async def archive(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LayeredArchive]:
    if request.param == "local":
        async with LocalArchiveStore.open(tmp_path / "archive") as local:
            yield LayeredArchive(local, lookback_us=3_600_000_000)
        return
    async with open_test_s3_store(request.getfixturevalue("seaweedfs")) as s3:
        yield LayeredArchive(s3, lookback_us=3_600_000_000)


async def test_a_redelivered_key_keeps_its_first_document(archive: LayeredArchive) -> None:
    first = reading(at_us=3 * MS, msg_id="m-42", raw=b'{"temperature":1}')
    again = reading(at_us=3 * MS, msg_id="m-42", raw=b'{"temperature":2}')
    await archive.put([first])
    await archive.put([again, again])
    page = await archive.list("dev-1", BASE_US, BASE_US + 60_000 * MS, limit=10)
    assert page.keys == [first.archive_key]
    assert (await archive.get(first.archive_key)).body == encode_archive_document(first)
    assert archive.writes.skipped_existing == 2


async def test_read_object_gives_the_bytes_and_their_recorded_hash(
    archive: LayeredArchive,
) -> None:
    message = reading(at_us=5 * MS)
    await archive.put([message])
    stored = await archive.store.read_object(message.archive_key)
    assert stored.body == encode_archive_document(message)
    assert stored.sha256 == hashlib.sha256(stored.body).hexdigest()
    key, body = build_segment("dev-2", [(message.epoch_us, segment_line(message))], compress=True)
    await archive.put_objects([(key, body)])
    assert (await archive.store.read_object(key)).body == body


async def test_devices_and_usage_cover_both_layouts(archive: LayeredArchive) -> None:
    assert await archive.store.devices() == []
    message = reading("dev-b", at_us=60_000 * MS)
    early = reading("dev-a", at_us=1_000 * MS)
    await archive.put([message])
    key, body = build_segment("dev-a", [(early.epoch_us, segment_line(early))], compress=False)
    await archive.put_objects([(key, body)])
    assert await archive.store.devices() == ["dev-a", "dev-b"]
    usage = await archive.usage()
    assert usage.oldest_us == early.epoch_us  # the segment's first reading
    # S3 counts the objects' bytes; the local folder what they take on disk (whole blocks).
    assert usage.bytes_used is not None
    assert usage.bytes_used >= len(body) + len(encode_archive_document(message))
    assert usage.detail
