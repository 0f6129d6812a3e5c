"""The raw archive is write-once: no path rewrites an archived object with other content.

A redelivery (same key, other `received_at`, even other bytes), a segment rebuilt with the same
content, a replay, and the whole app receiving a message twice over MQTT: on the local folder
and on S3 (a real SeaweedFS), both layouts. Each test snapshots every object (bytes, and the
file's inode and mtime or the object's ETag and Last-Modified) before and after.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from iotmeter.db.engine import Database, build_engine
from iotmeter.ingest.decode import DecodeLimits
from iotmeter.readings import ReadingSet
from iotmeter.services.replay import replay_device
from iotmeter.storage.archive.local import HASH_ATTRIBUTE, LocalArchiveStore
from iotmeter.storage.archive.s3 import S3ArchiveStore
from iotmeter.storage.archive.segments import LayeredArchive, build_segment, segment_line
from iotmeter.storage.timeseries.sql import SqlTimeSeriesStore
from tests.conftest import make_settings
from tests.e2e.conftest import start_app
from tests.fixtures.devices import publish
from tests.fixtures.s3 import open_test_s3_store, s3_settings
from tests.fixtures.services import Mosquitto, SeaweedFS, running_mosquitto, running_seaweedfs
from tests.fixtures.waiting import eventually

T0 = 1_790_000_000_000_000
LOOKBACK_US = 3_600_000_000
Snapshot = dict[str, tuple[bytes, Any]]


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    with running_mosquitto() as broker:
        yield broker


@pytest.fixture(params=["local", "s3"])
async def archive(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LayeredArchive]:
    if request.param == "local":
        yield LayeredArchive(LocalArchiveStore(tmp_path / "archive"), lookback_us=LOOKBACK_US)
        return
    async with open_test_s3_store(request.getfixturevalue("seaweedfs")) as s3:
        yield LayeredArchive(s3, lookback_us=LOOKBACK_US)


def message(n: int, *, received_us: int = 0, raw: bytes | None = None) -> ReadingSet:
    epoch_us = T0 + n * 1000
    return ReadingSet(
        device_id="meter-1",
        epoch_us=epoch_us,
        values={"v": float(n)},
        topic="iot/meter-1/telemetry",
        received_at_us=epoch_us + received_us,
        raw=raw if raw is not None else b'{"v":%d,"msg_id":"m%d"}' % (n, n),
        msg_id=f"m{n}",
    )


async def snapshot(archive: LayeredArchive) -> Snapshot:
    """Every object: its bytes and what the store says about its version."""
    store = archive.store
    if isinstance(store, LocalArchiveStore):
        found: Snapshot = {}
        for path in sorted(store.root.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                stat = path.stat()
                key = str(path.relative_to(store.root))
                found[key] = (path.read_bytes(), (stat.st_ino, stat.st_mtime_ns))
        return found
    assert isinstance(store, S3ArchiveStore)
    client = store.client
    listing = await client.list_objects_v2(Bucket=store.bucket)
    found = {}
    for item in listing.get("Contents", []):
        response = await client.get_object(Bucket=store.bucket, Key=item["Key"])
        async with response["Body"] as stream:
            body = await stream.read()
        found[item["Key"]] = (body, (item["ETag"], item["LastModified"]))
    return found


def assert_unchanged(before: Snapshot, after: Snapshot) -> None:
    """Every object of `before` is still there, with the same bytes and the same version."""
    for key, (body, version) in before.items():
        assert key in after, f"{key} vanished"
        assert after[key][0] == body, f"{key} was rewritten with other content"
        assert after[key][1] == version, f"{key} was written again"


async def test_a_redelivery_keeps_the_first_bytes(archive: LayeredArchive) -> None:
    first = message(1)
    await archive.put([first, message(2)])
    before = await snapshot(archive)
    # The same key later: another receive time, even other payload bytes (a device that
    # reuses a message id): the archive keeps what it had.
    again = message(1, received_us=5_000_000, raw=b'{"v":1, "msg_id":"m1"}')
    assert again.archive_key == first.archive_key
    await archive.put([again, again, message(3)])
    after = await snapshot(archive)
    assert_unchanged(before, after)
    assert len(after) == 3
    assert archive.writes.skipped_existing == 2
    assert (await archive.get(first.archive_key)).body == before[first.archive_key][0]


async def test_a_segment_written_again_is_skipped(archive: LayeredArchive) -> None:
    lines = [(m.epoch_us, segment_line(m)) for m in map(message, range(10))]
    for compress in (False, True):
        await archive.put_objects([build_segment("meter-1", lines, compress=compress)])
    before = await snapshot(archive)
    for compress in (False, True):
        await archive.put_objects([build_segment("meter-1", lines, compress=compress)])
    assert_unchanged(before, await snapshot(archive))
    assert archive.writes.skipped_existing == 2


async def test_each_message_records_the_hash_of_its_bytes(archive: LayeredArchive) -> None:
    reading = message(7)
    await archive.put([reading])
    stored = await archive.store.read_object(reading.archive_key)
    assert stored.sha256 == hashlib.sha256(stored.body).hexdigest()


async def test_replay_reads_and_never_writes_the_archive(
    archive: LayeredArchive, sqlite_url: str
) -> None:
    await archive.put([message(n) for n in range(20)])
    lines = [(m.epoch_us, segment_line(m)) for m in map(message, range(20, 40))]
    await archive.put_objects([build_segment("meter-1", lines, compress=True)])
    before = await snapshot(archive)
    database = Database(build_engine(sqlite_url))
    try:
        for _ in range(2):
            result = await replay_device(
                database,
                archive,
                SqlTimeSeriesStore(database),
                "meter-1",
                T0,
                T0 + 10**9,
                DecodeLimits(),
            )
            assert result.messages == 40
    finally:
        await database.close()
    assert_unchanged(before, await snapshot(archive))
    assert archive.writes.skipped_existing == 0


async def test_a_damaged_local_file_is_written_anew_and_kept_aside(tmp_path: Path) -> None:
    """A file cut by a power loss before it was durable (here: emptied) is the one case a
    write replaces: write-once must not keep a torn file for ever."""
    archive = LayeredArchive(LocalArchiveStore(tmp_path / "archive"), lookback_us=LOOKBACK_US)
    reading = message(1)
    await archive.put([reading])
    path = tmp_path / "archive" / reading.archive_key
    path.write_bytes(b"")
    await archive.put([reading])
    assert orjson.loads(path.read_bytes())["payload"] == {"v": 1, "msg_id": "m1"}
    assert (
        os.getxattr(path, HASH_ATTRIBUTE).decode() == hashlib.sha256(path.read_bytes()).hexdigest()
    )
    assert (archive.writes.skipped_existing, archive.writes.repaired) == (0, 1)
    # The damaged file is kept aside (it could be evidence of tampering), out of listings.
    (aside,) = path.parent.glob(f".{path.name}.*.damaged")
    assert aside.read_bytes() == b""
    page = await archive.list(
        reading.device_id, reading.epoch_us - 1, reading.epoch_us + 1_000_000, limit=10
    )
    assert page.keys == [reading.archive_key]


async def test_conditional_puts_pass_a_store_that_checks_signatures() -> None:
    """The signed `If-None-Match` and `x-amz-meta-sha256` headers are accepted by a SeaweedFS
    that verifies every signature, and the second write of a key is refused there (412)."""
    credentials = ("iotmeter-signed", "iotmeter-signed-secret/+")
    with running_seaweedfs(credentials) as server:
        async with S3ArchiveStore.open(
            endpoint_url=server.endpoint_url,
            bucket="iot-signed-once",
            access_key=credentials[0],
            secret_key=credentials[1],
        ) as store:
            await store.put([message(1)])
            await store.put([replace(message(1), received_at_us=T0 + 9)])
            assert store.writes.skipped_existing == 1
            stored = await store.read_object(message(1).archive_key)
            assert orjson.loads(stored.body)["received_at"].endswith(".001000Z")
            assert stored.sha256 == hashlib.sha256(stored.body).hexdigest()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize(
    ("backend", "layout"), [("local", "per-message"), ("s3", "per-message"), ("s3", "segment")]
)
async def test_a_message_delivered_twice_through_the_app_leaves_the_archive_unchanged(
    empty_pg_url: str,
    tmp_path: Path,
    mosquitto: Mosquitto,
    seaweedfs: SeaweedFS,
    backend: str,
    layout: str,
) -> None:
    overrides: dict[str, Any] = s3_settings(seaweedfs) if backend == "s3" else {}
    settings = make_settings(
        empty_pg_url,
        tmp_path,
        mqtt_url=mosquitto.url,
        mqtt_client_id=f"iotmeter-immutable-{backend}-{layout}",
        collector_enabled=True,
        batch_max_delay_s=0.05,
        archive_layout=layout,
        archive_segment_max_age_s=0.2,
        **overrides,
    )
    payloads = [
        (
            "iot/twice-1/telemetry",
            orjson.dumps({"ts": 1_795_000_000_000 + n, "msg_id": f"t{n}", "v": n}),
        )
        for n in range(5)
    ]

    async def archive_snapshot() -> Snapshot:
        if backend == "local":
            store: Any = LocalArchiveStore(settings.archive_dir)
            return await snapshot(LayeredArchive(store, lookback_us=LOOKBACK_US))
        async with open_test_s3_store(seaweedfs, bucket=overrides["s3_bucket"]) as s3:
            return await snapshot(LayeredArchive(s3, lookback_us=LOOKBACK_US))

    async with start_app(settings) as api:
        publish(mosquitto.port, payloads)
        await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["messages"]["stored"] == 5,
            what="the first delivery archived",
        )
        before = await archive_snapshot()
        assert before
        # The same messages again, as a broker redelivers them: other receive times.
        publish(mosquitto.port, payloads)
        await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["messages"]["stored"] == 10,
            what="the redelivery through both sinks",
        )
        after = await archive_snapshot()
        assert_unchanged(before, after)
        skipped = _metric(
            (await api.get("/metrics")).text, "iotmeter_archive_existing_keys_skipped"
        )
    if layout == "per-message":
        assert after == before  # nothing new either: every key existed
        assert skipped == 5
    else:
        # A segment's key is its content's hash: the redelivered lines (other receive times)
        # form a new segment beside the first, which is never touched.
        assert len(after) > len(before)
