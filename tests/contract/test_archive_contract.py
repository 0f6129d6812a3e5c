"""One behaviour for every `ArchiveStore`: the local folder and S3 (a real SeaweedFS)."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from iotmeter.errors import NotFound
from iotmeter.readings import ReadingSet
from iotmeter.storage.archive.base import ArchiveStore
from iotmeter.storage.archive.document import encode_archive_document
from iotmeter.storage.archive.local import LocalArchiveStore
from tests.fixtures.s3 import open_test_s3_store

BASE_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
MS = 1000
SECRET_NAME = "20260101T000000.000Z_m-secret.json"


@pytest.fixture(params=["local", "s3"])
async def archive(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ArchiveStore]:
    """An empty store of each backend: its own folder, or its own bucket."""
    if request.param == "local":
        async with LocalArchiveStore.open(tmp_path / "archive") as local:
            yield local
    else:
        server = request.getfixturevalue("seaweedfs")
        async with open_test_s3_store(server) as s3:
            yield s3


def reading(
    device_id: str = "dev-1",
    at_us: int = 0,
    *,
    msg_id: str | None = None,
    raw: bytes | None = None,
    batch_index: int | None = None,
) -> ReadingSet:
    """A reading set at BASE_US + at_us, with a distinct msg_id unless one is given."""
    epoch_us = BASE_US + at_us
    msg_id = msg_id if msg_id is not None else uuid.uuid4().hex[:12]
    values: dict[str, float | bool] = {"temperature": 21.5}
    if raw is None:
        raw = orjson.dumps({"ts": epoch_us / 1e6, "msg_id": msg_id, **values})
    return ReadingSet(
        device_id=device_id,
        epoch_us=epoch_us,
        values=values,
        topic=f"devices/{device_id}/telemetry",
        received_at_us=epoch_us + 1234,
        raw=raw,
        device_type="temperature",
        msg_id=msg_id,
        batch_index=batch_index,
    )


def json_files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*.json") if path.is_file()]


def plant_secrets(tmp_path: Path) -> None:
    """Readable, well-named files right outside the local archive's device folders."""
    for folder in (tmp_path, tmp_path / "archive"):
        folder.mkdir(exist_ok=True)
        (folder / SECRET_NAME).write_bytes(b'{"secret":true}')


async def all_keys(
    archive: ArchiveStore, device_id: str, start_us: int, stop_us: int, limit: int
) -> tuple[list[str], int]:
    """Every key over all pages, and how many pages it took."""
    keys: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        page = await archive.list(device_id, start_us, stop_us, limit=limit, after=after)
        pages += 1
        assert len(page.keys) <= limit
        keys.extend(page.keys)
        if page.next_cursor is None:
            return keys, pages
        assert page.next_cursor == page.keys[-1]
        after = page.next_cursor


async def test_get_returns_the_exact_document_put(archive: ArchiveStore) -> None:
    readings = [reading(at_us=i * MS) for i in range(3)]
    readings.append(reading(at_us=5 * MS, batch_index=4))
    await archive.put(readings)
    for item in readings:
        message = await archive.get(item.archive_key)
        assert message.body == encode_archive_document(item)
        assert message.key == item.archive_key
        assert message.device_id == "dev-1"
        assert message.epoch_us == item.epoch_us


async def test_single_message_payload_bytes_are_kept_unchanged(archive: ArchiveStore) -> None:
    # Odd spacing, key order, number spelling and escapes: a re-encoding would change them.
    raw = b'{ "unit":"\\u00b0C",  "temperature" : 21.50, "ts":1767225600.0 }'
    item = reading(at_us=7 * MS, raw=b"  " + raw + b"\n")
    await archive.put([item])
    body = (await archive.get(item.archive_key)).body
    assert body.endswith(b',"payload":' + raw + b"}")
    document = orjson.loads(body)
    assert document["topic"] == "devices/dev-1/telemetry"
    assert document["received_at"] == "2026-01-01T00:00:00.008234Z"
    assert document["batch_index"] is None
    assert document["payload"] == {"unit": "°C", "temperature": 21.5, "ts": 1767225600.0}


async def test_a_redelivered_reading_keeps_the_first_document(archive: ArchiveStore) -> None:
    """Write-once (issue 15, immutable archive): the key's first bytes stay."""
    first = reading(at_us=3 * MS, msg_id="m-42", raw=b'{"temperature":1}')
    again = reading(at_us=3 * MS, msg_id="m-42", raw=b'{"temperature":2}')
    assert first.archive_key == again.archive_key
    await archive.put([first])
    await archive.put([again, again])
    page = await archive.list("dev-1", BASE_US, BASE_US + 60_000 * MS, limit=10)
    assert page.keys == [first.archive_key]
    assert (await archive.get(first.archive_key)).body == encode_archive_document(first)


async def test_list_returns_time_range_start_included_stop_excluded(
    archive: ArchiveStore,
) -> None:
    start_us, stop_us = 10_000 * MS, 20_000 * MS
    offsets = [
        start_us - MS,
        start_us - 1,  # the millisecond before start: out
        start_us,
        start_us,  # a second reading in the same millisecond as start
        start_us + MS,
        15_000 * MS,
        stop_us - MS,
        stop_us - 1,  # same millisecond as stop - 1 ms: in
        stop_us,
        stop_us + MS,
    ]
    readings = [reading(at_us=offset) for offset in offsets]
    shuffled = readings.copy()
    random.Random(7).shuffle(shuffled)
    await archive.put(shuffled)
    expected = [
        item.archive_key for item in readings if start_us <= item.epoch_us - BASE_US < stop_us
    ]
    page = await archive.list("dev-1", BASE_US + start_us, BASE_US + stop_us, limit=100)
    assert page.keys == sorted(expected)
    assert len(page.keys) == 6
    assert page.next_cursor is None
    # Oldest first: the times of the keys never go back.
    times = [(await archive.get(key)).epoch_us for key in page.keys]
    assert times == sorted(times)


async def test_list_keeps_devices_with_shared_prefixes_apart(archive: ArchiveStore) -> None:
    devices = ["a", "ab", "a-b", "a.b", "A", "b"]
    readings = [reading(device, at_us=i * MS) for i in range(3) for device in devices]
    await archive.put(readings)
    for device in devices:
        page = await archive.list(device, BASE_US, BASE_US + 60_000 * MS, limit=100)
        assert page.keys == sorted(
            item.archive_key for item in readings if item.device_id == device
        )


@pytest.mark.parametrize("limit", [1, 4, 7, 50])
async def test_pages_cover_every_key_exactly_once(archive: ArchiveStore, limit: int) -> None:
    # 21 keys, some sharing a millisecond: 7 is an exact divisor (no empty trailing page).
    readings = [reading(at_us=(i // 3) * MS) for i in range(21)]
    readings += [reading("dev-2", at_us=i * MS) for i in range(5)]
    await archive.put(readings)
    keys, pages = await all_keys(archive, "dev-1", BASE_US, BASE_US + 60_000 * MS, limit)
    assert keys == sorted(item.archive_key for item in readings if item.device_id == "dev-1")
    assert pages == -(-21 // limit)


async def test_pages_larger_than_one_s3_listing_call(archive: ArchiveStore) -> None:
    readings = [reading(at_us=i * MS) for i in range(1050)]
    await archive.put(readings)
    expected = sorted(item.archive_key for item in readings)
    whole = await archive.list("dev-1", BASE_US, BASE_US + 3_600_000 * MS, limit=5000)
    assert whole.keys == expected
    assert whole.next_cursor is None
    keys, pages = await all_keys(archive, "dev-1", BASE_US, BASE_US + 3_600_000 * MS, 1020)
    assert keys == expected
    assert pages == 2


async def test_list_of_a_device_without_messages_is_empty(archive: ArchiveStore) -> None:
    await archive.put([reading("dev-1")])
    page = await archive.list("dev-9", BASE_US, BASE_US + 60_000 * MS, limit=10)
    assert page.keys == []
    assert page.next_cursor is None


async def test_get_of_an_unknown_key_is_not_found(archive: ArchiveStore) -> None:
    await archive.put([reading("dev-1", at_us=0)])
    with pytest.raises(NotFound):
        await archive.get(reading("dev-1", at_us=0).archive_key)
    with pytest.raises(NotFound):
        await archive.get(reading("dev-7", at_us=0).archive_key)


@pytest.mark.parametrize(
    "key",
    [
        "../etc/passwd",
        "a/../../x.json",
        f"../{SECRET_NAME}",  # a well-formed name under device "..": the parent folder
        f"./{SECRET_NAME}",
        f"/{SECRET_NAME}",
        "/etc/passwd",
        f"dev-1/../{SECRET_NAME}",
        f"dev-1/{SECRET_NAME}/../../x.json",
        "dev-1/20260101T000000.000Z_m-\x00.json",
        "",
    ],
)
async def test_malicious_keys_never_read_outside(
    archive: ArchiveStore, tmp_path: Path, key: str
) -> None:
    plant_secrets(tmp_path)
    await archive.put([reading("dev-1", at_us=0)])
    with pytest.raises((NotFound, ValueError)):
        await archive.get(key)


@pytest.mark.parametrize("device_id", ["..", ".", "a/b", ""])
async def test_unsafe_device_ids_are_refused(
    archive: ArchiveStore, tmp_path: Path, device_id: str
) -> None:
    with pytest.raises(ValueError, match="not a"):
        await archive.put([reading(device_id, at_us=0)])
    with pytest.raises(ValueError, match="not a device id"):
        await archive.list(device_id, BASE_US, BASE_US + MS, limit=10)
    assert json_files_under(tmp_path) == []


async def test_health_returns_a_detail(archive: ArchiveStore) -> None:
    detail = await archive.health()
    assert detail
    assert archive.backend in ("local", "s3")
