"""Device -> MQTT -> collector -> stores -> API, through a real Mosquitto and real databases."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest

from iotmeter.config import Settings
from tests.conftest import make_settings
from tests.e2e.conftest import start_app
from tests.fixtures.devices import publish
from tests.fixtures.services import Mosquitto
from tests.fixtures.waiting import eventually


@pytest.fixture
def ingest_settings(database_url: str, tmp_path: Path, mosquitto: Mosquitto) -> Settings:
    return make_settings(
        database_url,
        tmp_path,
        mqtt_url=mosquitto.url,
        mqtt_client_id=f"iotmeter-test-{tmp_path.name}"[:64],
        collector_enabled=True,
        batch_max_delay_s=0.05,
    )


@pytest.fixture
async def ingest_api(ingest_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with start_app(ingest_settings) as client:
        yield client


async def test_published_readings_are_queryable(
    ingest_api: httpx.AsyncClient, mosquitto: Mosquitto
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    first = now - timedelta(seconds=30)
    single = orjson.dumps(
        {
            "ts": first.isoformat().replace("+00:00", "Z"),
            "msg_id": "m-1",
            "seq": 1,
            "type": "temperature",
            "metrics": {"temperature": 21.5, "heater_on": True},
        }
    )
    batch = orjson.dumps(
        [
            {"ts": int((first + timedelta(seconds=10)).timestamp() * 1000), "temperature": 22.0},
            {"ts": int((first + timedelta(seconds=20)).timestamp()), "values": {"temperature": 23}},
        ]
    )
    publish(
        mosquitto.port, [("iot/kitchen-1/telemetry", single), ("iot/kitchen-1/telemetry", batch)]
    )

    response = await eventually(
        lambda: ingest_api.get(
            "/api/v1/devices/kitchen-1/telemetry",
            params={"start": "-5m", "fields": "temperature"},
        ),
        lambda r: (
            r.status_code == 200 and len(r.json()["series"][0]["points"]) == 3
            if r.status_code == 200 and r.json()["series"]
            else False
        ),
        what="three temperature points",
    )
    points = response.json()["series"][0]["points"]
    assert [p["value"] for p in points] == [21.5, 22.0, 23.0]
    assert points[0]["ts"] == first.isoformat().replace("+00:00", ".000000Z")
    assert points[2]["ts"] == (first + timedelta(seconds=20)).isoformat().replace(
        "+00:00", ".000000Z"
    )

    device = (await ingest_api.get("/api/v1/devices/kitchen-1")).json()
    assert device["type"] == "temperature"  # registered automatically, type from the message
    assert device["last_seen_at"] is not None
    seen = datetime.fromisoformat(device["last_seen_at"])
    assert abs((seen - datetime.now(UTC)).total_seconds()) < 60

    latest = (await ingest_api.get("/api/v1/devices/kitchen-1/latest")).json()
    assert latest["fields"]["temperature"]["value"] == 23.0
    assert latest["fields"]["heater_on"]["value"] == 1.0

    raw = (await ingest_api.get("/api/v1/devices/kitchen-1/raw", params={"start": "-5m"})).json()
    assert len(raw["items"]) == 3
    first_key = raw["items"][0]["key"]
    assert first_key.startswith("kitchen-1/")
    assert first_key.endswith("_m-m-1.json")
    stored = await ingest_api.get(f"/api/v1/raw/{first_key}")
    assert stored.status_code == 200
    # The archived document holds the received bytes unchanged.
    assert single in stored.content
    assert orjson.loads(stored.content)["topic"] == "iot/kitchen-1/telemetry"

    stats = (await ingest_api.get("/api/v1/stats")).json()
    assert stats["messages"]["received"] == 2
    assert stats["messages"]["stored"] == 3
    assert stats["devices"]["online"] == 1


async def test_bad_messages_are_dead_lettered_and_good_ones_stored(
    ingest_api: httpx.AsyncClient, mosquitto: Mosquitto
) -> None:
    now_ms = int(time.time() * 1000)
    publish(
        mosquitto.port,
        [
            ("iot/dev-a/telemetry", b"\xff\xfe not utf-8"),
            ("iot/dev-a/telemetry", b"{not json"),
            ("iot/dev-a/telemetry", b'{"metrics": {"t": "warm"}}'),
            (
                "iot/dev-a/telemetry",
                b'[{"ts": %d, "t": 1.5}, {"ts": %d, "t": NaN}, {"ts": %d, "device_id": "other", '
                b'"t": 2}]' % (now_ms - 3, now_ms - 2, now_ms - 1),
            ),
            ("iot/dev-a/telemetry", b'{"t": 3.5}'),
        ],
    )
    letters = await eventually(
        lambda: ingest_api.get("/api/v1/dead-letters", params={"device_id": "dev-a"}),
        lambda r: r.json()["total"] >= 5,
        what="dead letters",
    )
    reasons = sorted(item["reason"] for item in letters.json()["items"])
    assert reasons == ["bad_value_type", "device_mismatch", "not_finite", "not_json", "not_utf8"]
    utf8_letter = next(i for i in letters.json()["items"] if i["reason"] == "not_utf8")
    assert utf8_letter["payload_encoding"] == "base64"

    telemetry = await eventually(
        lambda: ingest_api.get("/api/v1/devices/dev-a/telemetry", params={"start": "-5m"}),
        lambda r: r.status_code == 200 and sum(len(s["points"]) for s in r.json()["series"]) >= 2,
        what="good readings of dev-a",
    )
    values = sorted(p["value"] for s in telemetry.json()["series"] for p in s["points"])
    assert values == [1.5, 3.5]

    stats = (await ingest_api.get("/api/v1/stats")).json()
    assert stats["messages"]["rejected"] == 5
    assert stats["messages"]["rejected_by_reason"]["not_json"] == 1


async def test_messages_held_back_for_room_are_all_taken_even_when_no_more_arrive(
    ingest_settings: Settings, mosquitto: Mosquitto
) -> None:
    """With one unacked message allowed and a slow group commit, almost every message waits
    for room; the last ones must not wait for a next message that never comes."""
    settings = ingest_settings.model_copy(
        update={"mqtt_max_inflight": 1, "spool_commit_interval_s": 0.3}
    )
    messages = [
        ("iot/held-1/telemetry", orjson.dumps({"seq": i, "t": float(i)})) for i in range(12)
    ]
    async with start_app(settings) as api:
        publish(mosquitto.port, messages)  # the broker acks at once; the app takes them slowly
        await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["messages"]["stored"] == len(messages),
            within=30,
            what="all 12 stored",
        )
