"""Prometheus metrics of a running app (real Mosquitto, PostgreSQL and SQLite): every metric
the operations issue names exists after a short ingest run and moves as the run says it must."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from iotmeter.config import Settings
from iotmeter.ingest.stats import STORE_SINKS
from tests.conftest import make_settings
from tests.e2e.conftest import start_app
from tests.e2e.test_ingest_e2e import publish
from tests.fixtures.services import Mosquitto, free_port
from tests.fixtures.waiting import eventually

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SINKS = ("registry", "timeseries", "archive", "alerts")


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def collector_settings(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto, client_id: str, **overrides: Any
) -> Settings:
    """An app that collects from the test's Mosquitto, batches written at once."""
    values: dict[str, Any] = {"batch_max_delay_s": 0.05, **overrides}
    return make_settings(
        database_url,
        tmp_path,
        mqtt_url=mosquitto.url,
        mqtt_client_id=client_id,
        collector_enabled=True,
        **values,
    )


async def scrape(api: httpx.AsyncClient) -> Samples:
    response = await api.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


async def test_metrics_move_with_an_ingest_run(
    database_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    settings = collector_settings(database_url, tmp_path, mosquitto, "iotmeter-metrics")
    now_ms = int(time.time() * 1000)
    good = [
        (f"iot/meter-{i % 3}/telemetry", orjson.dumps({"ts": now_ms + i, "t": float(i)}))
        for i in range(30)
    ]
    bad = [("iot/meter-0/telemetry", b"{'nope'"), ("iot/meter-1/telemetry", b"\xff\xfe")]
    async with start_app(settings) as api:
        before = await scrape(api)
        assert value(before, "iotmeter_messages_received_total") == 0
        assert value(before, "iotmeter_mqtt_connected") == 1
        publish(mosquitto.port, good + bad)
        await eventually(
            lambda: scrape(api),
            lambda s: (
                all(value(s, "iotmeter_readings_stored_total", sink=sink) == 30 for sink in SINKS)
                and value(s, "iotmeter_dead_letters_total", source="ingest") == 2
            ),
            what="30 reading sets stored by every sink, 2 dead letters",
        )
        # A route with a device id in its path, and a path no route takes.
        assert (await api.get("/api/v1/devices/meter-1")).status_code == 200
        assert (await api.get("/api/v1/devices/no-such-device")).status_code == 404
        assert (await api.get("/nothing/here/meter-2")).status_code == 404
        # The registry's figures are read from the database at most once a second.
        after = await eventually(
            lambda: scrape(api),
            lambda s: total(s, "iotmeter_devices") == 3,
            what="three devices registered",
        )

    assert value(after, "iotmeter_messages_received_total") == 32
    assert value(after, "iotmeter_messages_rejected_total", reason="not_json") == 1
    assert value(after, "iotmeter_messages_rejected_total", reason="not_utf8") == 1
    assert total(after, "iotmeter_messages_rejected_total") == 2
    for sink in SINKS:
        # Every spool record went through each sink in batches: the batch sizes add up.
        assert value(after, "iotmeter_sink_batch_size_sum", sink=sink) == 32, sink
        batches = value(after, "iotmeter_sink_batch_size_count", sink=sink)
        assert 1 <= batches <= 32, sink
        assert value(after, "iotmeter_sink_write_seconds_count", sink=sink) == batches, sink
        assert value(after, "iotmeter_sink_write_seconds_sum", sink=sink) > 0, sink
        assert value(after, "iotmeter_sink_lag_records", sink=sink) == 0, sink
        assert value(after, "iotmeter_sink_failing", sink=sink) == 0, sink
    assert set(STORE_SINKS) <= set(SINKS)
    assert value(after, "iotmeter_spool_records") == 0
    assert value(after, "iotmeter_spool_bytes") > 0
    assert value(after, "iotmeter_spool_max_bytes") == settings.spool_max_bytes
    assert value(after, "iotmeter_spool_full") == 0
    assert value(after, "iotmeter_spool_oldest_unconfirmed_age_seconds") == 0
    assert value(after, "iotmeter_intake_held_seconds_total") >= 0
    assert value(after, "iotmeter_mqtt_connected") == 1
    assert value(after, "iotmeter_mqtt_reconnects_total") == 0
    assert value(after, "iotmeter_mqtt_inflight_messages") == 0

    # The registry: three devices registered on the way in, all seen just now.
    assert total(after, "iotmeter_devices") == 3
    assert total(after, "iotmeter_devices", status="active") == 3
    assert value(after, "iotmeter_devices_online") == 3
    assert value(after, "iotmeter_devices_connected") == 0
    assert value(after, "iotmeter_alerts_active", severity="critical") == 0
    assert value(after, "iotmeter_notifications", status="pending") == 0
    assert (
        value(after, "iotmeter_notification_deliveries_total", channel="webhook", outcome="failed")
        == 0
    )
    info = [labels for (name, labels) in after if name == "iotmeter_info"]
    assert len(info) == 1
    assert dict(info[0])["database"] == settings.database_url.split("+")[0].split(":")[0]

    # HTTP: by route template and status class, never by raw path.
    device_route = "/api/v1/devices/{device_id}"
    assert (
        value(after, "iotmeter_http_requests_total", method="GET", route=device_route, status="2xx")
        == 1
    )
    assert (
        value(after, "iotmeter_http_requests_total", method="GET", route=device_route, status="4xx")
        == 1
    )
    assert (
        value(after, "iotmeter_http_requests_total", method="GET", route="unmatched", status="4xx")
        == 1
    )
    assert (
        value(
            after,
            "iotmeter_http_request_duration_seconds_count",
            method="GET",
            route=device_route,
        )
        == 2
    )
    # The process collectors.
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert value(after, name) > 0, name
    assert total(after, "python_gc_collections_total") > 0

    # No series is labelled with a device id or a raw path (cardinality).
    label_values = {v for (_name, labels) in after for _k, v in labels}
    assert not label_values & {"meter-0", "meter-1", "meter-2", "no-such-device"}
    assert not any("/nothing" in v for v in label_values)


async def test_the_metrics_port_serves_without_keys_and_metrics_can_be_turned_off(
    pg_url: str, tmp_path: Path
) -> None:
    port = free_port()
    settings = make_settings(
        pg_url, tmp_path, auth="on", metrics_port=port, collector_enabled=False
    )
    async with start_app(settings) as api:
        assert (await api.get("/metrics", headers={"Authorization": ""})).status_code == 401
        assert (await api.get("/metrics")).status_code == 200
        async with httpx.AsyncClient() as outside:
            response = await outside.get(f"http://127.0.0.1:{port}/metrics")
            assert response.status_code == 200
            assert "iotmeter_info{" in response.text
            assert (await outside.get(f"http://127.0.0.1:{port}/api/v1/devices")).status_code == 404

    (tmp_path / "off").mkdir()
    off = make_settings(
        pg_url, tmp_path / "off", metrics_enabled=False, metrics_port=port, collector_enabled=False
    )
    async with start_app(off) as api:
        assert (await api.get("/metrics")).status_code == 404
        async with httpx.AsyncClient() as outside:
            try:
                await outside.get(f"http://127.0.0.1:{port}/metrics")
            except httpx.ConnectError:
                pass
            else:
                raise AssertionError("the metrics port is open with metrics off")


async def test_a_broker_outage_shows_in_the_mqtt_metrics(
    pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Broker stopped: connected 0, the lost connection counted; back: connected 1."""
    settings = collector_settings(
        pg_url, tmp_path, mosquitto, "iotmeter-metrics-outage", config_push_enabled=False
    )
    async with start_app(settings) as api:
        assert value(await scrape(api), "iotmeter_mqtt_reconnects_total") == 0
        mosquitto.stop()
        down = await eventually(
            lambda: scrape(api),
            lambda s: value(s, "iotmeter_mqtt_connected") == 0,
            what="the collector sees the broker gone",
        )
        assert value(down, "iotmeter_mqtt_reconnects_total") == 1
        mosquitto.start()
        back = await eventually(
            lambda: scrape(api),
            lambda s: value(s, "iotmeter_mqtt_connected") == 1,
            within=60,
            what="the collector back on the broker",
        )
        assert value(back, "iotmeter_mqtt_reconnects_total") == 1
        publish(mosquitto.port, [("iot/after/telemetry", b'{"t": 1}')])
        await eventually(
            lambda: scrape(api),
            lambda s: value(s, "iotmeter_readings_stored_total", sink="timeseries") == 1,
            what="a message after the outage stored",
        )


async def test_device_types_chosen_by_devices_cannot_flood_the_scrape(
    empty_pg_url: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Each device names its own type: past 50 types the smaller ones are counted as `other`."""
    settings = collector_settings(empty_pg_url, tmp_path, mosquitto, "iotmeter-metrics-types")
    messages = [
        (f"iot/typed-{i}/telemetry", orjson.dumps({"type": f"kind{i:03d}", "t": 1.0}))
        for i in range(80)
    ]
    # kind000 has four devices more: it keeps its own label whatever the order.
    messages += [
        (f"iot/typed-extra-{i}/telemetry", orjson.dumps({"type": "kind000", "t": 1.0}))
        for i in range(4)
    ]
    async with start_app(settings) as api:
        publish(mosquitto.port, messages)
        samples = await eventually(
            lambda: scrape(api),
            lambda s: total(s, "iotmeter_devices") == 84,
            within=30,
            what="84 devices counted",
        )
    types = {dict(labels)["type"] for (name, labels) in samples if name == "iotmeter_devices"}
    assert len(types) == 51
    assert "other" in types
    assert value(samples, "iotmeter_devices", type="kind000", status="active") == 5
    assert total(samples, "iotmeter_devices", type="other") == 30


async def test_made_up_paths_and_methods_add_no_series(sqlite_url: str, tmp_path: Path) -> None:
    """A client sending 200 random paths and made-up methods adds one `unmatched` series and
    one `other` method, not one series each."""
    settings = make_settings(sqlite_url, tmp_path, collector_enabled=False)
    async with start_app(settings) as api:
        before = await scrape(api)
        for number in range(200):
            await api.get(f"/random/{number}/{'x' * (number % 7)}")
            await api.request("PROPFIND", f"/api/v1/devices/d{number}")
        after = await scrape(api)
    new = {key for key in after if key not in before and key[0].startswith("iotmeter_http")}
    routes = {dict(labels).get("route") for _name, labels in new}
    methods = {dict(labels).get("method") for _name, labels in new}
    assert routes <= {"unmatched", "/api/v1/devices/{device_id}", "/metrics", None}, routes
    assert methods <= {"GET", "other", None}, methods
    assert (
        value(after, "iotmeter_http_requests_total", method="GET", route="unmatched", status="4xx")
        == 200
    )
    assert total(after, "iotmeter_http_requests_total", method="other") == 200
    # Every new series belongs to one of these few (route, method) pairs: the count is bounded.
    assert len(new) < 60, len(new)
