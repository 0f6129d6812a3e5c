"""Rules of the ingest core a user meets, end to end through a real Mosquitto: the registry
cache follows API changes, dead letters are kept once with their arrival time, retained
deliveries are not stored again, oversized payloads never cost the messages behind them, and
a stalled sink is reported by /ready."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt

from iotmeter.config import Settings
from tests.conftest import make_settings
from tests.e2e.conftest import start_app
from tests.e2e.test_ingest_e2e import publish
from tests.fixtures.fake_influx import FakeInflux
from tests.fixtures.services import Mosquitto
from tests.fixtures.waiting import eventually


def app_settings(database_url: str, tmp_path: Path, mosquitto: Mosquitto, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "mqtt_url": mosquitto.url,
        "mqtt_client_id": f"iotmeter-rules-{tmp_path.name}"[:64],
        "collector_enabled": True,
        "batch_max_delay_s": 0.05,
    }
    values.update(extra)
    return make_settings(database_url, tmp_path, **values)


def reading(device: str, seq: int, value: float) -> tuple[str, bytes]:
    return f"iot/{device}/telemetry", orjson.dumps({"seq": seq, "metrics": {"t": value}})


def influx_types(influx: FakeInflux, device: str) -> list[str]:
    """The device_type tag of each point InfluxDB holds for `device`, in time order."""
    points = []
    for (_measurement, tags), ns, _field, _value in influx.points():
        tag = dict(tags)
        if tag.get("device_id") == device:
            points.append((ns, tag.get("device_type", "")))
    return [kind for _ns, kind in sorted(points)]


async def test_a_device_type_changed_by_the_api_tags_the_next_points_at_once(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with FakeInflux() as influx:
        settings = app_settings(
            empty_pg_url, tmp_path, mosquitto, influx_url=influx.url, influx_token=influx.token
        )
        async with start_app(settings) as api:
            created = await api.post(
                "/api/v1/devices", json={"id": "retype-1", "name": "m", "type": "temperature"}
            )
            assert created.status_code == 201
            publish(mosquitto.port, [reading("retype-1", 0, 1.0)])
            await eventually(
                lambda: api.get("/api/v1/stats"),
                lambda r: r.json()["messages"]["stored"] == 1,
                what="the first point",
            )
            changed = await api.patch("/api/v1/devices/retype-1", json={"type": "humidity"})
            assert changed.status_code == 200
            publish(mosquitto.port, [reading("retype-1", 1, 2.0)])
            await eventually(
                lambda: api.get("/api/v1/stats"),
                lambda r: r.json()["messages"]["stored"] == 2,
                what="the second point",
            )
        # Not after the cache's minute: the very next point carries the new type.
        assert influx_types(influx, "retype-1") == ["temperature", "humidity"]


async def test_a_deleted_device_is_refused_by_every_store_when_auto_registration_is_off(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = app_settings(empty_pg_url, tmp_path, mosquitto, auto_register=False)
    async with start_app(settings) as api:
        await api.post("/api/v1/devices", json={"id": "gone-1", "name": "m", "type": "meter"})
        publish(mosquitto.port, [reading("gone-1", 0, 1.0)])
        await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["messages"]["stored"] == 1,
            what="the reading of the registered device",
        )
        assert (await api.delete("/api/v1/devices/gone-1")).status_code == 204
        publish(mosquitto.port, [reading("gone-1", 1, 2.0)])
        letters = await eventually(
            lambda: api.get("/api/v1/dead-letters", params={"reason": "unknown_device"}),
            lambda r: r.json()["total"] == 1,
            what="the message of the deleted device refused",
        )
        assert "gone-1" in letters.json()["items"][0]["detail"]
        stats = await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["spool"]["depth"] == 0,
            what="every sink done with it",
        )
        # Neither the time series nor the archive took it.
        assert stats.json()["messages"]["stored"] == 1
        archive = tmp_path / "archive" / "gone-1"
        assert len(list(archive.iterdir())) == 1


async def test_a_bad_message_sent_again_is_one_dead_letter_with_its_arrival_time(
    sqlite_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = app_settings(sqlite_url, tmp_path, mosquitto)
    async with start_app(settings) as api:
        sent_at = datetime.now(UTC)
        publish(mosquitto.port, [("iot/bad-1/telemetry", b"{broken")] * 2)
        stats = await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["messages"]["rejected"] == 2 and r.json()["spool"]["depth"] == 0,
            what="both copies refused",
        )
        assert stats.json()["messages"]["rejected_by_reason"] == {"not_json": 2}
        letters = (await api.get("/api/v1/dead-letters", params={"device_id": "bad-1"})).json()
        assert letters["total"] == 1
        received_at = datetime.fromisoformat(letters["items"][0]["received_at"])
        assert abs((received_at - sent_at).total_seconds()) < 5


async def test_an_oversized_payload_keeps_its_head_and_costs_nothing_behind_it(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """The issue's scenario: with the app down, 200 valid messages, two of 10 MB, 200 valid;
    then the app starts and stores all 400 (before: the 200 after the big ones were lost)."""
    settings = app_settings(empty_pg_url, tmp_path, mosquitto)
    async with start_app(settings):
        pass  # the collector's persistent session now exists at the broker
    now_ms = int(time.time() * 1000)
    big = b'{"t": 1, "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    messages = [
        ("iot/big-1/telemetry", orjson.dumps({"ts": now_ms - 1000 + i, "metrics": {"t": i}}))
        for i in range(200)
    ]
    messages += [("iot/big-1/telemetry", big)] * 2
    messages += [
        ("iot/big-1/telemetry", orjson.dumps({"ts": now_ms - 500 + i, "metrics": {"t": i}}))
        for i in range(200)
    ]
    publish(mosquitto.port, messages)
    async with start_app(settings) as api:
        await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["messages"]["stored"] == 400 and r.json()["spool"]["depth"] == 0,
            within=60,
            what="all 400 valid messages stored",
        )
        letters = (await api.get("/api/v1/dead-letters", params={"reason": "too_large"})).json()
        # The two copies are the same message: one dead letter.
        assert letters["total"] == 1
        letter = letters["items"][0]
        assert letter["payload_size"] == len(big)
        assert letter["payload_truncated"] is True
        assert letter["payload_stored"] == 64 * 1024
        stored = (await api.get(letter["payload_url"])).content
        assert stored == big[: 64 * 1024]
        assert str(len(big)) in letter["detail"]
        stats = (await api.get("/api/v1/stats")).json()
        assert stats["messages"]["rejected_by_reason"] == {"too_large": 2}


async def test_a_retained_message_is_stored_once_not_again_on_every_resubscribe(
    sqlite_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = app_settings(sqlite_url, tmp_path, mosquitto)
    async with start_app(settings) as api:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="retaining-device")
        client.connect("127.0.0.1", mosquitto.port)
        client.loop_start()
        # No ts: a copy stored again would be a new point at its new arrival time.
        client.publish("iot/ret-1/telemetry", b'{"t": 5}', qos=1, retain=True).wait_for_publish(5)
        client.loop_stop()
        client.disconnect()
        await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["messages"]["stored"] == 1,
            what="the live delivery stored",
        )
    for _restart in range(2):  # each start subscribes again: the broker resends the retained
        async with start_app(settings) as api:
            stats = await eventually(
                lambda: api.get("/api/v1/stats"),
                lambda r: r.json()["spool"]["retained_ignored"] == 1,
                what="the retained copy delivered and ignored",
            )
            assert stats.json()["messages"]["received"] == 0
            points = await api.get(
                "/api/v1/devices/ret-1/telemetry", params={"start": "-1h", "fields": "t"}
            )
            assert sum(len(series["points"]) for series in points.json()["series"]) == 1


async def test_a_sink_without_progress_makes_ready_answer_503(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with FakeInflux() as influx:
        settings = app_settings(
            empty_pg_url,
            tmp_path,
            mosquitto,
            influx_url=influx.url,
            influx_token=influx.token,
            sink_stall_s=1.0,
        )
        async with start_app(settings) as api:
            influx.delay_next("write", 8.0)  # answers, but not for a long while
            publish(mosquitto.port, [reading("stall-2", 0, 1.0)])
            ready = await eventually(
                lambda: api.get("/ready"),
                lambda r: r.status_code == 503 and "no progress" in r.text,
                what="/ready reporting the stalled sink",
            )
            assert "IOTMETER_SINK_STALL_S" in ready.text
            assert "timeseries" in ready.json()["backends"]["spool"]["detail"]
            stats = (await api.get("/api/v1/stats")).json()
            assert stats["spool"]["stalled_sinks"].keys() <= {"timeseries"}
            await eventually(
                lambda: api.get("/ready"),
                lambda r: r.status_code == 200,
                within=20,
                what="/ready once the write went through",
            )
