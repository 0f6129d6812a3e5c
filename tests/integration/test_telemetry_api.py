"""The telemetry query route over the SQL store, on PostgreSQL and SQLite: the exact body."""

from __future__ import annotations

import httpx

from iotmeter.api.routes.telemetry import TelemetryResponse
from iotmeter.db.engine import Database, build_engine
from iotmeter.storage.timeseries.sql import SqlTimeSeriesStore
from tests.fixtures.readings import MINUTE_US, SECOND_US, reading

DEVICES = "/api/v1/devices"
BASE_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
RANGE = {"start": "2026-01-01T00:00:00Z", "stop": "2026-01-01T00:03:00Z"}


async def write_readings(database_url: str) -> None:
    database = Database(build_engine(database_url))
    try:
        await SqlTimeSeriesStore(database).write(
            [
                reading("d-1", BASE_US + 10 * SECOND_US, {"temp": 20.0, "hum": 40.0}),
                reading("d-1", BASE_US + 50 * SECOND_US, {"temp": 21.0}),
                reading("d-1", BASE_US + MINUTE_US + 123_456, {"temp": 0.1, "hum": 1e16}),
                reading("d-1", BASE_US + 3 * MINUTE_US, {"temp": 99.0}),  # at stop: left out
                reading("other", BASE_US, {"temp": -5.0}),
            ]
        )
    finally:
        await database.close()


async def test_windows_of_one_minute(api: httpx.AsyncClient, database_url: str) -> None:
    created = await api.post(DEVICES, json={"id": "d-1", "name": "One", "type": "humidity"})
    assert created.status_code == 201, created.text
    await write_readings(database_url)

    response = await api.get(f"{DEVICES}/d-1/telemetry", params={**RANGE, "every": "1m"})

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body == {
        "device_id": "d-1",
        "start": "2026-01-01T00:00:00.000000Z",
        "stop": "2026-01-01T00:03:00.000000Z",
        "every": "1m",
        "aggregate": "mean",
        "series": [
            {
                "field": "hum",
                "points": [
                    {"ts": "2026-01-01T00:00:00.000000Z", "value": 40.0},
                    {"ts": "2026-01-01T00:01:00.000000Z", "value": 1e16},
                ],
            },
            {
                "field": "temp",
                "points": [
                    {"ts": "2026-01-01T00:00:00.000000Z", "value": 20.5},
                    {"ts": "2026-01-01T00:01:00.000000Z", "value": 0.1},
                ],
            },
        ],
    }
    assert TelemetryResponse.model_validate(body).model_dump() == body


async def test_raw_points_and_one_field(api: httpx.AsyncClient, database_url: str) -> None:
    await api.post(DEVICES, json={"id": "d-1", "name": "One", "type": "humidity"})
    await write_readings(database_url)

    response = await api.get(f"{DEVICES}/d-1/telemetry", params={**RANGE, "fields": "temp"})

    assert response.status_code == 200, response.text
    assert response.json() == {
        "device_id": "d-1",
        "start": "2026-01-01T00:00:00.000000Z",
        "stop": "2026-01-01T00:03:00.000000Z",
        "every": None,
        "aggregate": None,
        "series": [
            {
                "field": "temp",
                "points": [
                    {"ts": "2026-01-01T00:00:10.000000Z", "value": 20.0},
                    {"ts": "2026-01-01T00:00:50.000000Z", "value": 21.0},
                    {"ts": "2026-01-01T00:01:00.123456Z", "value": 0.1},
                ],
            }
        ],
    }


async def test_no_points_is_an_empty_series_list(api: httpx.AsyncClient) -> None:
    await api.post(DEVICES, json={"id": "d-1", "name": "One", "type": "humidity"})

    response = await api.get(f"{DEVICES}/d-1/telemetry", params={**RANGE, "every": "1m"})

    assert response.status_code == 200, response.text
    assert response.json()["series"] == []


async def test_a_deleted_device_is_404_though_its_telemetry_is_kept(
    api: httpx.AsyncClient, database_url: str
) -> None:
    await api.post(DEVICES, json={"id": "d-1", "name": "One", "type": "humidity"})
    await write_readings(database_url)
    assert (await api.delete(f"{DEVICES}/d-1")).status_code == 204

    response = await api.get(f"{DEVICES}/d-1/telemetry", params={**RANGE, "every": "1m"})

    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "not_found"
    assert "'d-1'" in error["message"]
    unknown = await api.get(f"{DEVICES}/other/telemetry", params=RANGE)
    assert unknown.status_code == 404
