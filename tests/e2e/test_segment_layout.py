"""The segment archive layout end to end: NDJSON segments per device, read back through the
raw-data API and replay like per-message objects, and rebuilt from the spool after a stop."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path
from typing import Any

import orjson
import pytest

from iotmeter.config import Settings
from tests.conftest import make_settings
from tests.e2e.conftest import start_app
from tests.e2e.test_ingest_e2e import publish
from tests.fixtures.delivery import AppProcess, app_environment
from tests.fixtures.s3 import open_test_s3_store, s3_settings
from tests.fixtures.services import Mosquitto, SeaweedFS
from tests.fixtures.waiting import eventually

BASE_MS = 1_795_000_000_000


def messages(device: str, count: int) -> list[tuple[str, bytes]]:
    return [
        (
            f"iot/{device}/telemetry",
            orjson.dumps({"ts": BASE_MS + i * 10, "msg_id": f"{device}-{i}", "v": i}),
        )
        for i in range(count)
    ]


def segment_settings(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "mqtt_url": mosquitto.url,
        "mqtt_client_id": "iotmeter-segments",
        "collector_enabled": True,
        "batch_max_delay_s": 0.05,
        "archive_layout": "segment",
        "archive_segment_max_age_s": 0.3,
    }
    values.update(overrides)
    return make_settings(database_url, tmp_path, **values)


async def all_raw(api: Any, device: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after = None
    while True:
        params = {"start": "2026-11-01T00:00:00Z", "stop": "2026-12-01T00:00:00Z", "limit": 40}
        if after:
            params["after"] = after
        page = (await api.get(f"/api/v1/devices/{device}/raw", params=params)).json()
        items.extend(page["items"])
        after = page["next_cursor"]
        if after is None:
            return items


@pytest.mark.parametrize("compress", [False, True])
async def test_segments_hold_every_message_once_and_read_back_like_messages(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto, seaweedfs: SeaweedFS, compress: bool
) -> None:
    s3 = s3_settings(seaweedfs)
    settings = segment_settings(
        empty_pg_url, tmp_path, mosquitto, archive_segment_gzip=compress, **s3
    )
    sent = messages("seg-1", 150) + messages("seg-2", 30)
    async with start_app(settings) as api:
        publish(mosquitto.port, sent)
        await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["messages"]["stored"] == 180,
            what="all messages in both stores",
        )
        items = await all_raw(api, "seg-1")
        assert [item["document"]["payload"]["v"] for item in items] == list(range(150))
        assert len({item["key"] for item in items}) == 150
        one = await api.get(f"/api/v1/raw/{items[42]['key']}")
        assert one.status_code == 200
        # The document inside a segment holds the received bytes unchanged, as per message.
        assert sent[42][1] in one.content
        assert orjson.loads(one.content)["topic"] == "iot/seg-1/telemetry"
    async with open_test_s3_store(seaweedfs, bucket=s3["s3_bucket"]) as store:
        keys = await store.list_objects("seg-1", "seg-1/", 1000)
        assert keys
        suffix = ".ndjson.gz" if compress else ".ndjson"
        assert all(key.endswith(suffix) for key in keys)
        lines = 0
        for key in keys:
            body = await store.get_object(key)
            lines += len((gzip.decompress(body) if compress else body).splitlines())
        assert lines == 150  # far fewer objects than messages, every message once
        assert len(keys) < 150


async def test_unwritten_segments_are_rebuilt_from_the_spool_after_a_stop(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    slow = segment_settings(
        empty_pg_url,
        tmp_path,
        mosquitto,
        archive_segment_max_age_s=3600,
        archive_segment_quiet_s=0,
    )
    async with start_app(slow) as api:
        publish(mosquitto.port, messages("seg-3", 60))
        stats = await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: (
                r.json()["spool"]["lag_by_sink"]["timeseries"] == 0
                and r.json()["spool"]["depth"] == 60
            ),
            what="the time series to have everything",
        )
        # The archive holds its segments open (an hour): nothing archived, all in the spool.
        assert stats.json()["spool"]["lag_by_sink"]["archive"] == 60
        assert await all_raw(api, "seg-3") == []
    # Stopped with open segments (as a crash would); the spool still has them.
    fast = segment_settings(empty_pg_url, tmp_path, mosquitto, archive_segment_max_age_s=0.2)
    async with start_app(fast) as api:
        items = await eventually(
            lambda: all_raw(api, "seg-3"),
            lambda found: len(found) == 60,
            what="the segments rebuilt from the spool",
        )
        assert [item["document"]["payload"]["v"] for item in items] == list(range(60))
        archive = tmp_path / "archive" / "seg-3"
        assert all(path.suffix == ".ndjson" for path in archive.iterdir())


async def test_replay_reads_segments(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with start_app(segment_settings(empty_pg_url, tmp_path, mosquitto)) as api:
        publish(mosquitto.port, messages("seg-4", 25))
        await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["messages"]["stored"] == 25,
            what="all stored",
        )
        response = await api.post(
            "/api/v1/devices/seg-4/replay",
            json={"start": "2026-11-01T00:00:00Z", "stop": "2026-12-01T00:00:00Z"},
        )
        assert response.json() == {"messages": 25, "readings": 25, "refused": 0}


async def test_an_epoch_cut_short_by_a_crash_is_rebuilt_into_the_same_segments(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The crash-recovery path: the epoch's intent is on disk, one device's segment is written,
    the next one's write fails, and the process is SIGKILLed before the archive confirmed
    anything. After the restart the same records make the same segments: the written one is
    rewritten under its own key (same bytes), nothing is doubled, nothing is missing."""
    workdir = tmp_path / "app"
    env = app_environment(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/iotmeter.db",
        mqtt_url=mosquitto.url,
        workdir=workdir,
        client_id="iotmeter-segment-crash",
        IOTMETER_ARCHIVE_LAYOUT="segment",
        IOTMETER_ARCHIVE_SEGMENT_MAX_AGE_S="2",
        IOTMETER_ARCHIVE_SEGMENT_QUIET_S="0",
        IOTMETER_BATCH_MAX_DELAY_S="0.05",
    )
    archive = workdir / "archive"
    app = AppProcess(env, workdir)
    try:
        await app.start("ready")
        archive.mkdir(parents=True, exist_ok=True)
        (archive / "crash-b").write_text("a file where the device's folder must go")
        publish(mosquitto.port, messages("crash-a", 60) + messages("crash-b", 40))
        await eventually(
            lambda: asyncio.to_thread(lambda: list((archive / "crash-a").glob("*.ndjson"))),
            lambda found: len(found) == 1,
            what="crash-a's segment written before crash-b's write fails",
        )
        stats = await eventually(
            app.stats,
            lambda body: body is not None and "archive" in body["spool"]["failing_sinks"],
            what="the archive sink failing on crash-b",
        )
        assert stats is not None
        assert stats["spool"]["lag_by_sink"]["archive"] == 100  # nothing confirmed
        assert (workdir / "spool" / "archive-epoch").exists()
        before = sorted(path.name for path in (archive / "crash-a").iterdir())
        app.kill()
        (archive / "crash-b").unlink()
        await app.start("ready")
        await eventually(
            app.stats,
            lambda body: body is not None and body["spool"]["depth"] == 0,
            what="the epoch rebuilt and confirmed",
        )
    finally:
        app.close()
    assert sorted(path.name for path in (archive / "crash-a").iterdir()) == before
    for device, count in (("crash-a", 60), ("crash-b", 40)):
        (segment,) = list((archive / device).glob("*.ndjson"))
        values = [orjson.loads(line)["payload"]["v"] for line in segment.read_bytes().splitlines()]
        assert values == list(range(count))
