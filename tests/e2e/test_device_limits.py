"""Limits on what devices can create, end to end through a real Mosquitto, on PostgreSQL and
SQLite: the number of devices, the readings in one message, and new series per device and hour.
Over a limit the message goes to the dead letters with its own reason, no store takes what the
registry refused, the stats count it, and the API says what to do."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from iotmeter.config import Settings
from tests.e2e.conftest import start_app
from tests.e2e.test_ingest_e2e import publish
from tests.e2e.test_ingest_rules import app_settings
from tests.fixtures.services import Mosquitto
from tests.fixtures.waiting import eventually


def message(device: str, seq: int, **values: Any) -> tuple[str, bytes]:
    return f"iot/{device}/telemetry", orjson.dumps({"seq": seq, "metrics": values})


async def drained(api: httpx.AsyncClient, what: str, **expect: int) -> dict[str, Any]:
    """The stats once the spool is empty and the message counters are as expected (`stored`
    counts reading sets in the time series and the archive both; give it, since the spool is
    empty for an instant after a message is counted received and before it is spooled)."""
    assert "stored" in expect

    async def probe() -> dict[str, Any]:
        stats: dict[str, Any] = (await api.get("/api/v1/stats")).json()
        return stats

    return await eventually(
        probe,
        lambda stats: (
            stats["spool"]["depth"] == 0
            and all(stats["messages"][key] == value for key, value in expect.items())
        ),
        what=what,
    )


async def letters(api: httpx.AsyncClient, reason: str) -> list[dict[str, Any]]:
    response = await api.get("/api/v1/dead-letters", params={"reason": reason, "limit": 100})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def latest_fields(api: httpx.AsyncClient, device: str) -> set[str]:
    response = await api.get(f"/api/v1/devices/{device}/latest")
    assert response.status_code == 200, response.text
    return set(response.json()["fields"])


def archived(settings: Settings, device: str) -> int:
    folder = settings.archive_dir / device
    return len(list(folder.iterdir())) if folder.exists() else 0


async def test_new_devices_past_max_devices_are_refused_by_every_store_until_there_is_room(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = app_settings(database_url, tmp_path, mosquitto, max_devices=3)
    async with start_app(settings) as api:
        created = await api.post("/api/v1/devices", json={"id": "pre-1", "name": "p", "type": "m"})
        assert created.status_code == 201
        publish(mosquitto.port, [message(f"cap-{n}", 0, t=float(n)) for n in range(1, 5)])
        stats = await drained(api, "four devices' messages handled", received=4, stored=2)
        assert stats["limits"]["refused"]["device_limit"] == 2
        assert stats["limits"]["devices_room"] == 0
        assert stats["devices"]["total"] == 3
        refused = await letters(api, "device_limit")
        assert sorted(letter["device_id"] for letter in refused) == ["cap-3", "cap-4"]
        assert "IOTMETER_MAX_DEVICES" in refused[0]["detail"]
        # Registered in spool order; the refused ones are in no store.
        for device in ("cap-1", "cap-2"):
            assert (await api.get(f"/api/v1/devices/{device}")).status_code == 200
            assert archived(settings, device) == 1
        for device in ("cap-3", "cap-4"):
            assert (await api.get(f"/api/v1/devices/{device}")).status_code == 404
            assert archived(settings, device) == 0
        # The API is held to the same limit.
        over = await api.post("/api/v1/devices", json={"id": "api-2", "name": "a", "type": "m"})
        assert over.status_code == 409, over.text
        assert over.json()["error"]["code"] == "limit_reached"
        assert "IOTMETER_MAX_DEVICES" in over.json()["error"]["message"]
        # Room made: the next message of a refused device registers it at once.
        assert (await api.delete("/api/v1/devices/cap-1")).status_code == 204
        publish(mosquitto.port, [message("cap-3", 1, t=3.5)])
        await drained(api, "cap-3 admitted once there is room", received=5, stored=3)
        assert (await api.get("/api/v1/devices/cap-3")).status_code == 200
        assert await latest_fields(api, "cap-3") == {"t"}
        assert archived(settings, "cap-3") == 1


async def test_a_message_with_more_readings_than_allowed_is_refused_whole(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = app_settings(database_url, tmp_path, mosquitto)
    assert settings.max_fields_per_message == 500
    # The message: 18,000 fields (short names, so that it stays under the size limit).
    wide = {f"f{n:x}": 1 for n in range(18_000)}
    now_ms = int(time.time() * 1000)
    batch = [
        {"ts": now_ms, "seq": 1, "metrics": {"a": 1.0, "b": 2.0}},
        {"ts": now_ms + 1, "seq": 2, "metrics": wide},
    ]
    async with start_app(settings) as api:
        publish(
            mosquitto.port,
            [
                ("iot/wide-1/telemetry", orjson.dumps({"seq": 0, "metrics": wide})),
                ("iot/wide-1/telemetry", orjson.dumps(batch)),
            ],
        )
        stats = await drained(api, "both messages handled", received=2, stored=1)
        assert stats["limits"]["refused"]["too_many_fields"] == 2
        refused = await letters(api, "too_many_fields")
        assert len(refused) == 2
        assert "18000 readings" in refused[0]["detail"]
        assert "IOTMETER_MAX_FIELDS_PER_MESSAGE" in refused[0]["detail"]
        # The small element of the batch went through; no series of the wide one exists.
        assert await latest_fields(api, "wide-1") == {"a", "b"}


async def test_new_series_past_the_hourly_budget_are_refused_and_the_budget_survives_a_restart(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = app_settings(database_url, tmp_path, mosquitto, max_new_series_per_device_hour=5)
    async with start_app(settings) as api:
        publish(
            mosquitto.port,
            [
                message("ser-1", 0, a=1.0, b=1.0, c=1.0),  # 3 new series
                message("ser-1", 1, d=1.0, e=1.0, f=1.0),  # 3 more would make 6: refused
                message("ser-1", 2, a=2.0, d=2.0),  # 1 more: 4
                message("ser-1", 3, a=3.0, b=3.0),  # none new
                message("ser-2", 0, x=1.0, y=1.0, z=1.0, w=1.0, v=1.0),  # its own budget
            ],
        )
        stats = await drained(api, "five messages handled", received=5, stored=4)
        assert stats["limits"]["refused"]["series_limit"] == 1
        refused = await letters(api, "series_limit")
        assert [letter["device_id"] for letter in refused] == ["ser-1"]
        assert "'e'" in refused[0]["detail"]
        assert "IOTMETER_MAX_NEW_SERIES_PER_DEVICE_HOUR" in refused[0]["detail"]
        assert await latest_fields(api, "ser-1") == {"a", "b", "c", "d"}
        assert await latest_fields(api, "ser-2") == {"x", "y", "z", "w", "v"}
        # The archive keeps every message as it came; only the time series refused one.
        assert archived(settings, "ser-1") == 4
    async with start_app(settings) as api:
        # After a restart the device still has 4 new series in the hour: 2 more are too many,
        # 1 more fits.
        publish(mosquitto.port, [message("ser-1", 4, g=1.0, h=1.0), message("ser-1", 5, g=2.0)])
        await drained(api, "after the restart", received=2, stored=1)
        refused = await letters(api, "series_limit")
        assert len(refused) == 2
        assert await latest_fields(api, "ser-1") == {"a", "b", "c", "d", "g"}
        # A deleted device's series go with it: created again, it has its whole budget.
        assert (await api.delete("/api/v1/devices/ser-2")).status_code == 204
        publish(mosquitto.port, [message("ser-2", 1, p=1.0, q=1.0, r=1.0, s=1.0, t=1.0)])
        await drained(api, "ser-2 again", received=3, stored=2)
        assert len(await letters(api, "series_limit")) == 2
        assert await latest_fields(api, "ser-2") >= {"p", "q", "r", "s", "t"}
