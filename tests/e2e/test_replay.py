"""Replay restores a deleted time range of the time-series store exactly, from the archive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from iotmeter.__main__ import main
from tests.conftest import make_settings
from tests.e2e.conftest import start_app
from tests.e2e.test_ingest_e2e import publish
from tests.fixtures.s3 import s3_settings
from tests.fixtures.services import Mosquitto, SeaweedFS
from tests.fixtures.waiting import eventually

BASE_MS = 1_795_000_000_000  # 2026-11-18T...Z, a fixed past time
DEVICE = "replay-1"


def messages() -> list[tuple[str, bytes]]:
    """60 messages, one a second, plus a batch of two: 62 reading sets of 2 fields."""
    single = [
        (
            f"iot/{DEVICE}/telemetry",
            orjson.dumps({"ts": BASE_MS + i * 1000, "seq": i, "metrics": {"a": i * 1.5, "b": i}}),
        )
        for i in range(60)
    ]
    batch = orjson.dumps(
        [{"ts": BASE_MS + 70_000 + i, "metrics": {"a": -1.0, "b": True}} for i in range(2)]
    )
    return [*single, (f"iot/{DEVICE}/telemetry", batch)]


async def series(api: httpx.AsyncClient) -> Any:
    response = await api.get(
        f"/api/v1/devices/{DEVICE}/telemetry",
        params={"start": "2026-11-18T00:00:00Z", "stop": "2026-11-20T00:00:00Z"},
    )
    assert response.status_code == 200, response.text
    return response.json()["series"]


async def delete_range(empty_pg_url: str, start_ms: int, stop_ms: int) -> int:
    connection = await asyncpg.connect(empty_pg_url)
    try:
        status = await connection.execute(
            "DELETE FROM telemetry WHERE device_id = $1 AND epoch_us >= $2 AND epoch_us < $3",
            DEVICE,
            start_ms * 1000,
            stop_ms * 1000,
        )
    finally:
        await connection.close()
    return int(status.split()[-1])


async def test_replay_restores_a_deleted_range_exactly(
    empty_pg_url: str,
    tmp_path: Path,
    mosquitto: Mosquitto,
    seaweedfs: SeaweedFS,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s3 = s3_settings(seaweedfs)
    settings = make_settings(
        empty_pg_url,
        tmp_path,
        mqtt_url=mosquitto.url,
        mqtt_client_id="iotmeter-replay",
        collector_enabled=True,
        batch_max_delay_s=0.05,
        **s3,
    )
    async with start_app(settings) as api:
        publish(mosquitto.port, messages())
        await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["messages"]["stored"] == 62,
            what="all 62 reading sets stored",
        )
        before = await series(api)
        assert sum(len(s["points"]) for s in before) == 124

        # Lose 20 s in the middle plus the batch, then replay a range around it.
        deleted = await delete_range(empty_pg_url, BASE_MS + 20_000, BASE_MS + 40_000)
        deleted += await delete_range(empty_pg_url, BASE_MS + 70_000, BASE_MS + 71_000)
        assert deleted == 2 * 20 + 2 * 2
        assert await series(api) != before

        response = await api.post(
            f"/api/v1/devices/{DEVICE}/replay",
            json={"start": "2026-11-18T00:00:00Z", "stop": "2026-11-20T00:00:00Z"},
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"messages": 62, "readings": 62, "refused": 0}
        assert await series(api) == before

        # Replaying again changes nothing (idempotent).
        await api.post(
            f"/api/v1/devices/{DEVICE}/replay",
            json={"start": "2026-11-18T00:00:00Z", "stop": "2026-11-20T00:00:00Z"},
        )
        assert await series(api) == before

        # The CLI does the same.
        await delete_range(empty_pg_url, BASE_MS, BASE_MS + 10_000)
        for name, value in {
            "IOTMETER_DATABASE_URL": empty_pg_url,
            "IOTMETER_S3_ENDPOINT_URL": s3["s3_endpoint_url"],
            "IOTMETER_S3_ACCESS_KEY": s3["s3_access_key"],
            "IOTMETER_S3_SECRET_KEY": s3["s3_secret_key"],
            "IOTMETER_S3_BUCKET": s3["s3_bucket"],
        }.items():
            monkeypatch.setenv(name, value)
        import asyncio

        assert (
            await asyncio.to_thread(main, ["replay", DEVICE, "--start", "2026-11-18T00:00:00Z"])
            == 0
        )
        assert "62 archived messages, 62 reading sets written" in capsys.readouterr().out
        assert await series(api) == before


async def test_replay_of_an_unknown_device_is_404(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/v1/devices/nope/replay", json={"start": "-1d"})
    assert response.status_code == 404
    assert "nope" in response.json()["error"]["message"]
