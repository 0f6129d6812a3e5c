"""Every rejection class through the running app: reason code, dead-letter record, counter —
and the good messages of the same run all stored."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import orjson

from tests.conftest import make_settings
from tests.e2e.conftest import start_app
from tests.e2e.test_ingest_e2e import publish
from tests.fixtures.services import Mosquitto
from tests.fixtures.waiting import eventually

NOW_MS = int(time.time() * 1000)

BAD: dict[str, tuple[str, bytes]] = {
    "not_utf8": ("iot/rej/telemetry", b"\xc3\x28"),
    "not_json": ("iot/rej/telemetry", b"{'single': 'quotes'}"),
    "too_large": ("iot/rej/telemetry", b'{"t": 1, "pad": "' + b"x" * 2048 + b'"}'),
    "too_deep": ("iot/rej/telemetry", b'{"t": 1, "a": [[[[[[[[[[1]]]]]]]]]]}'),
    "not_object": ("iot/rej/telemetry", b'"just a string"'),
    "no_readings": ("iot/rej/telemetry", b'{"note": "nothing to measure"}'),
    "not_finite": ("iot/rej/telemetry", b'{"t": Infinity}'),
    "bad_value_type": ("iot/rej/telemetry", b'{"metrics": {"t": [1, 2]}}'),
    "bad_field_name": ("iot/rej/telemetry", b'{"metrics": {"temp erature": 1}}'),
    "bad_timestamp": ("iot/rej/telemetry", b'{"ts": "yesterday", "t": 1}'),
    "future_timestamp": (
        "iot/rej/telemetry",
        orjson.dumps({"ts": NOW_MS + 3_600_000, "t": 1}),
    ),
    "device_mismatch": ("iot/rej/telemetry", b'{"device_id": "someone-else", "t": 1}'),
    "bad_topic": ("iot/not a valid id/telemetry", b'{"t": 1}'),
    "bad_attribute": ("iot/rej/telemetry", b'{"seq": -1, "t": 1}'),
}


async def test_each_rejection_is_dead_lettered_counted_and_good_messages_stored(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = make_settings(
        empty_pg_url,
        tmp_path,
        mqtt_url=mosquitto.url,
        mqtt_client_id="iotmeter-rejections",
        collector_enabled=True,
        batch_max_delay_s=0.05,
        max_payload_bytes=1024,
    )
    good = [("iot/good/telemetry", orjson.dumps({"seq": i, "t": float(i)})) for i in range(20)]
    interleaved: list[tuple[str, bytes]] = []
    for index, bad in enumerate(BAD.values()):
        interleaved.extend([good[index], bad])
    interleaved.extend(good[len(BAD) :])
    async with start_app(settings) as api:
        publish(mosquitto.port, interleaved)
        letters = await eventually(
            lambda: api.get("/api/v1/dead-letters", params={"limit": 100}),
            lambda r: r.json()["total"] == len(BAD),
            what="one dead letter per rejection class",
        )
        by_reason = {item["reason"]: item for item in letters.json()["items"]}
        assert set(by_reason) == set(BAD)
        for reason, (topic, payload) in BAD.items():
            letter = by_reason[reason]
            assert letter["topic"] == topic, reason
            stored = (await api.get(letter["payload_url"])).content
            assert stored == payload, reason
            preview = (
                letter["payload_preview"].encode()
                if letter["payload_encoding"] == "utf-8"
                else base64.b64decode(letter["payload_preview"])
            )
            assert payload.startswith(preview), reason
            assert len(preview) == min(len(payload), 256), reason
            assert letter["detail"], reason
        stats = await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["messages"]["stored"] == len(good),
            what="every good message stored",
        )
        assert stats.json()["messages"]["rejected_by_reason"] == dict.fromkeys(BAD, 1)
        telemetry = await api.get("/api/v1/devices/good/telemetry", params={"start": "-10m"})
        assert [p["value"] for p in telemetry.json()["series"][0]["points"]] == [
            float(i) for i in range(20)
        ]


async def test_unknown_devices_are_refused_when_auto_registration_is_off(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = make_settings(
        empty_pg_url,
        tmp_path,
        mqtt_url=mosquitto.url,
        mqtt_client_id="iotmeter-no-auto",
        collector_enabled=True,
        batch_max_delay_s=0.05,
        auto_register=False,
    )
    async with start_app(settings) as api:
        created = await api.post(
            "/api/v1/devices", json={"id": "known-1", "name": "Known", "type": "temperature"}
        )
        assert created.status_code == 201
        publish(
            mosquitto.port,
            [
                ("iot/stranger/telemetry", b'{"t": 1}'),
                ("iot/known-1/telemetry", b'{"t": 2}'),
            ],
        )
        letters = await eventually(
            lambda: api.get("/api/v1/dead-letters", params={"reason": "unknown_device"}),
            lambda r: r.json()["total"] == 1,
            what="the stranger refused",
        )
        assert letters.json()["items"][0]["device_id"] == "stranger"
        await eventually(
            lambda: api.get("/api/v1/devices/known-1/latest"),
            lambda r: r.json()["fields"].get("t", {}).get("value") == 2.0,
            what="the known device stored",
        )
        assert (await api.get("/api/v1/devices/stranger")).status_code == 404
        raw = await api.get("/api/v1/devices/known-1/raw")
        assert len(raw.json()["items"]) == 1
