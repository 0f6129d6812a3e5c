"""The production shape end to end: Mosquitto -> collector -> PostgreSQL + S3 (SeaweedFS), and
InfluxDB (a fake HTTP server: no InfluxDB 2.x can run here) as the time-series store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from tests.conftest import make_settings
from tests.e2e.conftest import start_app
from tests.e2e.test_ingest_e2e import publish
from tests.fixtures.fake_influx import FakeInflux
from tests.fixtures.s3 import open_test_s3_store, s3_settings
from tests.fixtures.services import Mosquitto, SeaweedFS
from tests.fixtures.waiting import eventually


async def test_postgresql_and_seaweedfs(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto, seaweedfs: SeaweedFS
) -> None:
    s3 = s3_settings(seaweedfs)
    settings = make_settings(
        empty_pg_url,
        tmp_path,
        mqtt_url=mosquitto.url,
        mqtt_client_id="iotmeter-e2e-s3",
        collector_enabled=True,
        batch_max_delay_s=0.05,
        **s3,
    )
    sent_at = datetime.now(UTC).replace(microsecond=123000) - timedelta(seconds=5)
    payload = orjson.dumps(
        {"ts": sent_at.isoformat(), "seq": 7, "type": "power_meter", "metrics": {"voltage": 229.5}}
    )
    async with start_app(settings) as api:
        assert (await api.get("/api/v1/stats")).json()["backends"]["archive"] == "s3"
        publish(mosquitto.port, [("iot/meter-9/telemetry", payload)])
        raw = await eventually(
            lambda: api.get("/api/v1/devices/meter-9/raw", params={"start": "-1m"}),
            lambda r: r.status_code == 200 and len(r.json()["items"]) == 1,
            what="the archived message",
        )
        key = raw.json()["items"][0]["key"]
        assert key == f"meter-9/{sent_at:%Y%m%dT%H%M%S}.123Z_s-7.json"
        telemetry = (await api.get("/api/v1/devices/meter-9/telemetry")).json()
        assert telemetry["series"][0]["points"][0]["value"] == 229.5
    # The object really is in the bucket, holding the bytes the device sent.
    async with open_test_s3_store(seaweedfs, bucket=s3["s3_bucket"]) as store:
        stored = await store.get(key)
    assert payload in stored.body


async def test_influxdb_time_series(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with FakeInflux() as influx:
        settings = make_settings(
            empty_pg_url,
            tmp_path,
            mqtt_url=mosquitto.url,
            mqtt_client_id="iotmeter-e2e-influx",
            collector_enabled=True,
            batch_max_delay_s=0.05,
            influx_url=influx.url,
            influx_token=influx.token,
        )
        async with start_app(settings) as api:
            assert (await api.get("/api/v1/stats")).json()["backends"]["timeseries"] == "influxdb"
            publish(
                mosquitto.port,
                [
                    ("iot/th-1/telemetry", b'{"type": "humidity", "humidity": 40.5, "seq": 1}'),
                    # No type this time: the point still lands in the device's one series.
                    ("iot/th-1/telemetry", b'{"humidity": 41.5, "seq": 2}'),
                ],
            )
            await eventually(
                lambda: api.get("/api/v1/devices/th-1/telemetry", params={"start": "-1m"}),
                lambda r: (
                    r.status_code == 200 and sum(len(s["points"]) for s in r.json()["series"]) == 2
                ),
                what="both humidity points through InfluxDB",
            )
            latest = (await api.get("/api/v1/devices/th-1/latest")).json()
            assert latest["fields"]["humidity"]["value"] == 41.5
        series = {key for key, _ns, _field, _value in influx.points()}
        # One series: measurement iot_telemetry, tags device_id and the registry's type.
        assert series == {("iot_telemetry", (("device_id", "th-1"), ("device_type", "humidity")))}
