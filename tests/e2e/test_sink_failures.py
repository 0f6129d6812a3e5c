"""Per-sink failure handling through the whole app: InfluxDB (the fake HTTP server, since no
InfluxDB 2.x runs here) answering 503/429 with Retry-After, refusing a record for good, or
stalling — while the archive keeps progressing."""

from __future__ import annotations

import asyncio
import threading
import time
from itertools import pairwise
from pathlib import Path

import httpx
import orjson
import paho.mqtt.client as mqtt

from iotmeter.config import Settings
from tests.conftest import make_settings
from tests.e2e.conftest import start_app
from tests.e2e.test_ingest_e2e import publish
from tests.fixtures.fake_influx import FakeInflux
from tests.fixtures.mqtt_tap import PUBACK, running_tap
from tests.fixtures.services import Mosquitto
from tests.fixtures.waiting import eventually


def readings(device: str, count: int, field: str = "t") -> list[tuple[str, bytes]]:
    return [
        (f"iot/{device}/telemetry", orjson.dumps({"seq": i, "metrics": {field: float(i)}}))
        for i in range(count)
    ]


def influx_settings(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto, influx: FakeInflux
) -> Settings:
    return make_settings(
        empty_pg_url,
        tmp_path,
        mqtt_url=mosquitto.url,
        mqtt_client_id=f"iotmeter-{tmp_path.name}"[:64],
        collector_enabled=True,
        batch_max_delay_s=0.05,
        influx_url=influx.url,
        influx_token=influx.token,
    )


async def test_retry_after_is_honoured_and_nothing_is_lost(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with FakeInflux() as influx:
        async with start_app(influx_settings(empty_pg_url, tmp_path, mosquitto, influx)) as api:
            influx.fail_next("write", 503, times=2, retry_after="1")
            influx.fail_next("write", 429, times=1, retry_after="2")
            publish(mosquitto.port, readings("rate-1", 20))
            await eventually(
                lambda: api.get("/api/v1/stats"),
                lambda r: r.json()["messages"]["stored"] == 20,
                within=30,
                what="all 20 stored despite 503/429",
            )
        refused = [w for w in influx.writes if w.status in (429, 503)]
        assert [w.status for w in refused] == [503, 503, 429]
        accepted = next(w for w in influx.writes if w.status == 204)
        # The collector waited as told: >= 1 s after each 503, >= 2 s after the 429.
        gaps = [later.at - earlier.at for earlier, later in pairwise([*refused, accepted])]
        assert gaps[0] >= 0.95
        assert gaps[1] >= 0.95
        assert gaps[2] >= 1.95
        assert influx.point_count() == 20


async def test_a_record_refused_for_good_is_dead_lettered_and_the_rest_stored(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    influx = FakeInflux()
    async with influx, start_app(influx_settings(empty_pg_url, tmp_path, mosquitto, influx)) as api:
        publish(mosquitto.port, [("iot/conflict-1/telemetry", b'{"seq": 0, "t": 1.5}')])
        await eventually(
            lambda: api.get("/api/v1/stats"),
            lambda r: r.json()["messages"]["stored"] == 1,
            what="the first reading",
        )
        # `t` was a float; a boolean now is a field type conflict InfluxDB refuses (422).
        publish(
            mosquitto.port,
            [
                ("iot/conflict-1/telemetry", b'{"seq": 1, "t": true}'),
                ("iot/conflict-1/telemetry", b'{"seq": 2, "t": 2.5}'),
            ],
        )
        letters = await eventually(
            lambda: api.get("/api/v1/dead-letters", params={"reason": "refused_by_store"}),
            lambda r: r.json()["total"] == 1,
            what="the refused record in the dead-letter store",
        )
        letter = letters.json()["items"][0]
        assert letter["payload_preview"] == '{"seq": 1, "t": true}'
        assert (await api.get(letter["payload_url"])).content == b'{"seq": 1, "t": true}'
        assert "timeseries store refused it" in letter["detail"]
        latest = await eventually(
            lambda: api.get("/api/v1/devices/conflict-1/latest"),
            lambda r: r.json()["fields"].get("t", {}).get("value") == 2.5,
            what="the good reading after the refused one",
        )
        assert latest.status_code == 200


async def test_a_stalled_time_series_store_does_not_stop_the_archive(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with FakeInflux() as influx:
        influx.fail_next("write", 503, times=1000, retry_after="1")
        async with start_app(influx_settings(empty_pg_url, tmp_path, mosquitto, influx)) as api:
            publish(mosquitto.port, readings("stall-1", 10))
            raw = await eventually(
                lambda: api.get("/api/v1/devices/stall-1/raw"),
                lambda r: r.status_code == 200 and len(r.json()["items"]) == 10,
                what="the archive to progress while InfluxDB refuses",
            )
            assert raw.status_code == 200
            # The archive confirms its spool position just after its objects are listable.
            response = await eventually(
                lambda: api.get("/api/v1/stats"),
                lambda r: r.json()["spool"]["lag_by_sink"]["archive"] == 0,
                what="the archive's spool position confirmed",
            )
            stats = response.json()
            assert stats["messages"]["stored"] == 0  # not in both stores yet
            assert stats["spool"]["lag_by_sink"]["archive"] == 0
            assert stats["spool"]["lag_by_sink"]["timeseries"] == 10
            assert "timeseries" in stats["spool"]["failing_sinks"]
            ready = await api.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["backends"]["spool"]["status"] == "down"
            influx.injected["write"].clear()
            await eventually(
                lambda: api.get("/api/v1/stats"),
                lambda r: r.json()["messages"]["stored"] == 10,
                within=30,
                what="the time series to catch up",
            )


async def test_a_full_spool_stops_acking_then_resumes_and_loses_nothing(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """InfluxDB refuses every write, so the spool (1 MiB here) fills: the collector stops
    acking (no PUBACK leaves it, seen on the wire), `/ready` says why, and once InfluxDB is back
    every message is stored and acknowledged."""
    count = 2500  # ~1 KiB each: twice what the spool may hold
    padding = "x" * 1000
    messages = [
        (f"iot/full-{i % 5}/telemetry", orjson.dumps({"seq": i, "t": float(i), "note": padding}))
        for i in range(count)
    ]
    async with FakeInflux() as influx, running_tap(mosquitto.port) as tap:
        settings = influx_settings(empty_pg_url, tmp_path, mosquitto, influx).model_copy(
            update={
                "spool_max_bytes": 1 << 20,
                "spool_segment_bytes": 1 << 16,
                "mqtt_url": tap.url,
            }
        )
        async with start_app(settings) as api:
            influx.fail_next("write", 503, times=1_000_000, retry_after="0.2")
            publisher = threading.Thread(
                target=publish_patiently, args=(mosquitto.port, messages, 120), daemon=True
            )
            publisher.start()
            ready = await eventually(
                lambda: api.get("/ready"),
                lambda r: r.status_code == 503 and "spool full" in r.text,
                within=60,
                what="/ready saying the spool is full",
            )
            assert "IOTMETER_SPOOL_MAX_BYTES" in ready.text
            stats = (await api.get("/api/v1/stats")).json()
            assert stats["spool"]["full"] is True
            received = stats["messages"]["received"]
            assert received < count  # the rest waits at the broker
            # Acks for what was committed before the spool filled may still be leaving now.
            await asyncio.sleep(0.5)
            quiet_from = time.monotonic()
            await asyncio.sleep(2.0)
            assert tap.count(PUBACK, since=quiet_from) == 0, "PUBACK sent while the spool is full"
            assert (await api.get("/api/v1/stats")).json()["messages"]["received"] == received

            influx.injected["write"].clear()
            await eventually(
                lambda: api.get("/api/v1/stats"),
                lambda r: r.json()["messages"]["stored"] == count,
                within=90,
                what=f"all {count} stored once InfluxDB is back",
            )
            await eventually(
                lambda: api.get("/ready"), lambda r: r.status_code == 200, what="/ready again"
            )
            assert (await api.get("/api/v1/stats")).json()["spool"]["full"] is False
            assert tap.count(PUBACK) >= count
        publisher.join(30)
        assert not publisher.is_alive()
        assert influx.point_count() == count  # `t` of every message


def publish_patiently(broker_port: int, messages: list[tuple[str, bytes]], within: float) -> None:
    """Publish QoS 1 and wait for every PUBACK, however long the app holds them back."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="patient-device")
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", broker_port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        deadline = time.monotonic() + within
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published()
    finally:
        client.loop_stop()
        client.disconnect()


async def sample_lag(api: httpx.AsyncClient, sink: str, until: asyncio.Event) -> list[int]:
    """`lag_by_sink[sink]` (records committed, not yet confirmed by it) every few ms."""
    seen: list[int] = []
    while not until.is_set():
        seen.append((await api.get("/api/v1/stats")).json()["spool"]["lag_by_sink"][sink])
        await asyncio.sleep(0.01)
    return seen


async def test_a_slow_sink_holds_the_intake_within_four_batches(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """InfluxDB answers every write, but slowly: the collector stops reading from the broker
    while the time-series sink is more than four batches behind, so the spool never holds much
    more than that for it (without the hold, all 600 would be in it at once), and nothing is
    lost."""
    count, batch = 600, 5
    async with FakeInflux() as influx:
        settings = influx_settings(empty_pg_url, tmp_path, mosquitto, influx).model_copy(
            update={"batch_max_messages": batch}
        )
        async with start_app(settings) as api:
            influx.delay_next("write", 0.02, times=count)
            done = asyncio.Event()
            sampler = asyncio.create_task(sample_lag(api, "timeseries", done))
            publish(mosquitto.port, readings("slow-1", count))
            await eventually(
                lambda: api.get("/api/v1/stats"),
                lambda r: r.json()["messages"]["stored"] == count,
                within=120,
                what=f"all {count} stored by the slow sink",
            )
            done.set()
            lags = await sampler
            stats = (await api.get("/api/v1/stats")).json()
            assert stats["spool"]["intake_held_s"] > 0
            assert stats["spool"]["failing_sinks"] == {}
        assert influx.point_count() == count
    # Four batches behind starts a hold; one more batch may be in the sink's hands and one
    # more arriving while the hold begins.
    assert max(lags) <= 6 * batch, f"the time-series sink fell {max(lags)} records behind"
    assert len(lags) > 20


async def test_a_failing_sink_does_not_hold_the_intake(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """InfluxDB refuses every write: its sink is failing, so its backlog is the spool's to hold.
    The intake keeps taking messages (60 batches of 5 here, far past the four-batch bound) and
    the archive keeps storing them."""
    count, batch = 300, 5
    async with FakeInflux() as influx:
        influx.fail_next("write", 503, times=1_000_000, retry_after="0.2")
        settings = influx_settings(empty_pg_url, tmp_path, mosquitto, influx).model_copy(
            update={"batch_max_messages": batch}
        )
        async with start_app(settings) as api:
            publish(mosquitto.port, readings("failing-1", count))
            stats = await eventually(
                lambda: api.get("/api/v1/stats"),
                # `received` counts a message before the spool commits it: wait for the
                # time-series sink's lag to cover all of them too.
                lambda r: (
                    r.json()["messages"]["received"] == count
                    and r.json()["spool"]["lag_by_sink"]["archive"] == 0
                    and r.json()["spool"]["lag_by_sink"]["timeseries"] == count
                ),
                within=30,
                what="every message taken and archived while the time series fails",
            )
            spool = stats.json()["spool"]
            assert spool["lag_by_sink"]["timeseries"] == count
            assert "timeseries" in spool["failing_sinks"]
            # At most the moment before the first 503 came back.
            assert spool["intake_held_s"] < 1.5
            influx.injected["write"].clear()
            await eventually(
                lambda: api.get("/api/v1/stats"),
                lambda r: r.json()["messages"]["stored"] == count,
                within=60,
                what="the time series to catch up",
            )
        assert influx.point_count() == count
