"""iotmeter's metrics as a real Prometheus sees them, and the dashboards against the real app.

`iotmeter serve` runs as a process (as operators run it) on a fresh PostgreSQL database with a
private Mosquitto and `IOTMETER_METRICS_PORT` set; a private Prometheus (Debian's package)
scrapes it every second with the repository's alert rules loaded. The dashboards' metric names
are checked against the live /metrics page, and their SQL against the data the app wrote.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from tests.fixtures.delivery import AppProcess, app_environment
from tests.fixtures.devices import publish
from tests.fixtures.observability import (
    ALERT_RULES,
    DEVICE_DASHBOARD,
    by_label,
    dashboard_metric_names,
    dashboard_panels,
    expand_grafana_sql,
    is_exported,
    load_dashboards,
    metric_families,
    query,
    running_prometheus,
)
from tests.fixtures.services import Mosquitto, free_port, running_mosquitto
from tests.fixtures.waiting import eventually

MESSAGES = 24
DEVICES = ("meter-0", "meter-1")


@dataclass
class Running:
    app: AppProcess
    broker: Mosquitto
    metrics_port: int
    viewer_key: str

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


@pytest.fixture
async def running(empty_pg_url: str, tmp_path: Path) -> AsyncIterator[Running]:
    """The app with auth on (the default), its metrics port, and a viewer key."""
    with running_mosquitto() as broker:
        metrics_port = free_port()
        environment = app_environment(
            database_url=empty_pg_url,
            mqtt_url=broker.url,
            workdir=tmp_path,
            client_id=f"iotmeter-prometheus-{tmp_path.name}"[:64],
            METRICS_PORT=str(metrics_port),
            BATCH_MAX_DELAY_S="0.05",
        )
        app = AppProcess(environment, tmp_path / "app")
        try:
            await app.start(wait="ready")
            async with httpx.AsyncClient(base_url=app.base_url, headers=app.headers) as client:
                response = await client.post(
                    "/api/v1/keys", json={"name": "prometheus", "role": "viewer"}
                )
            assert response.status_code == 201, response.text
            yield Running(app, broker, metrics_port, response.json()["key"])
        finally:
            await app.terminate()


def telemetry(start_s: int) -> list[tuple[str, bytes]]:
    """MESSAGES messages one second apart, alternating between the two devices."""
    return [
        (
            f"iot/{DEVICES[i % 2]}/telemetry",
            orjson.dumps(
                {
                    "ts": (start_s + i) * 1000,
                    "msg_id": f"m-{i}",
                    "type": "meter",
                    "metrics": {"power": float(i), "relay": i % 4 == 0},
                }
            ),
        )
        for i in range(MESSAGES)
    ]


async def publish_and_wait_until_received(running: Running, start_s: int) -> None:
    await asyncio.to_thread(publish, running.broker.port, telemetry(start_s))

    def stored(stats: dict[str, Any] | None) -> bool:
        return stats is not None and stats["messages"]["received"] == MESSAGES

    await eventually(running.app.stats, stored, within=30, what="messages received")


def scrape_configs(running: Running, key_file: Path) -> list[dict[str, Any]]:
    """The metrics port (as compose's prometheus.yml), and the API port with and without a
    viewer key (the alternative prometheus.yml describes)."""
    api = f"127.0.0.1:{running.app.port}"
    return [
        {
            "job_name": "iotmeter",
            "static_configs": [{"targets": [f"127.0.0.1:{running.metrics_port}"]}],
        },
        {
            "job_name": "iotmeter-api",
            "authorization": {"credentials_file": str(key_file)},
            "static_configs": [{"targets": [api]}],
        },
        {"job_name": "iotmeter-api-anonymous", "static_configs": [{"targets": [api]}]},
    ]


def by_job(results: list[tuple[dict[str, str], float]], jobs: tuple[str, ...]) -> dict[str, float]:
    return {job: value for job, value in by_label(results, "job").items() if job in jobs}


async def test_prometheus_counts_every_message_published(running: Running, tmp_path: Path) -> None:
    key_file = tmp_path / "viewer.key"
    key_file.write_text(running.viewer_key)
    async with (
        running_prometheus(scrape_configs(running, key_file)) as prometheus,
        httpx.AsyncClient(base_url=prometheus.url, timeout=5) as client,
    ):
        # Scraped before anything is published: the counter starts at 0 in Prometheus too.
        jobs = ("iotmeter", "iotmeter-api")
        before = await eventually(
            lambda: query(client, "iotmeter_messages_received_total"),
            lambda results: by_job(results, jobs) == dict.fromkeys(jobs, 0.0),
            within=30,
            what="a first scrape of both ports",
        )
        assert len(before) == 2, before

        start_s = int(datetime.now(UTC).timestamp()) - 120
        await publish_and_wait_until_received(running, start_s)

        await eventually(
            lambda: query(client, "iotmeter_messages_received_total"),
            lambda results: by_job(results, jobs) == dict.fromkeys(jobs, float(MESSAGES)),
            within=30,
            what=f"iotmeter_messages_received_total == {MESSAGES} on both ports",
        )
        await eventually(
            lambda: query(client, 'iotmeter_readings_stored_total{job="iotmeter"}'),
            lambda results: by_label(results, "sink").get("timeseries") == MESSAGES,
            within=30,
            what="every reading set stored by the timeseries sink",
        )

        # The repository's alert rules evaluate on the real series without an error, and a
        # healthy app fires none of them.
        response = await eventually(
            lambda: client.get("/api/v1/rules"),
            lambda r: all(
                rule.get("health") == "ok"
                for group in r.json()["data"]["groups"]
                for rule in group["rules"]
            ),
            within=30,
            what="every alert rule evaluated",
        )
        rules = [rule for group in response.json()["data"]["groups"] for rule in group["rules"]]
        assert len(rules) == ALERT_RULES.read_text().count("- alert: ")
        assert [rule["name"] for rule in rules if rule["state"] != "inactive"] == []


async def test_prometheus_needs_a_key_on_the_api_port(running: Running, tmp_path: Path) -> None:
    key_file = tmp_path / "viewer.key"
    key_file.write_text(running.viewer_key)
    async with (
        running_prometheus(scrape_configs(running, key_file)) as prometheus,
        httpx.AsyncClient(base_url=prometheus.url, timeout=5) as client,
    ):
        jobs = ("iotmeter", "iotmeter-api", "iotmeter-api-anonymous")
        await eventually(
            lambda: query(client, "up"),
            lambda results: (
                by_job(results, jobs)
                == {"iotmeter": 1.0, "iotmeter-api": 1.0, "iotmeter-api-anonymous": 0.0}
            ),
            within=30,
            what="the metrics port and the keyed API scrape up, the anonymous one down",
        )
        targets = (await client.get("/api/v1/targets")).json()["data"]["activeTargets"]
        errors = {target["labels"]["job"]: target["lastError"] for target in targets}
        assert "401" in errors["iotmeter-api-anonymous"]
        assert errors["iotmeter"] == ""
        assert errors["iotmeter-api"] == ""


async def test_metrics_need_a_key_on_the_api_port_and_none_on_the_metrics_port(
    running: Running,
) -> None:
    async with httpx.AsyncClient(base_url=running.app.base_url, timeout=5) as api:
        anonymous = await api.get("/metrics")
        wrong = await api.get("/metrics", headers={"Authorization": "Bearer not-a-key"})
        viewer = await api.get(
            "/metrics", headers={"Authorization": f"Bearer {running.viewer_key}"}
        )
    assert anonymous.status_code == 401
    assert wrong.status_code == 401
    assert viewer.status_code == 200
    assert viewer.headers["content-type"].startswith("text/plain")
    assert "# TYPE iotmeter_messages_received_total counter" in viewer.text

    async with httpx.AsyncClient(timeout=5) as client:
        metrics = await client.get(running.metrics_url)
        # The port without authentication serves the metrics and nothing else.
        devices = await client.get(running.metrics_url.replace("/metrics", "/api/v1/devices"))
    assert metrics.status_code == 200
    assert "# TYPE iotmeter_info gauge" in metrics.text
    assert devices.status_code == 404


async def test_every_metric_of_the_dashboards_and_rules_is_exported(running: Running) -> None:
    await publish_and_wait_until_received(running, int(datetime.now(UTC).timestamp()) - 120)
    async with httpx.AsyncClient(timeout=5) as client:
        exposition = (await client.get(running.metrics_url)).text
    families = metric_families(exposition)
    # `up` is Prometheus' own, per target (see the tests above).
    used = dashboard_metric_names() - {"up"}
    assert sorted(name for name in used if not is_exported(name, families)) == []
    # And the other way round: the health dashboard or a rule shows every iotmeter metric.
    ours = {
        name for name in families if name.startswith("iotmeter_") and not name.endswith("_created")
    }
    shown = {
        name
        for name in ours
        if any(is_exported(used_name, {name: families[name]}) for used_name in used)
    }
    assert sorted(ours - shown) == []


# --- The device dashboard's SQL --------------------------------------------------------------


def device_dashboard_sql() -> dict[str, str]:
    """Panel title (or `$device`) -> the dashboard's SQL."""
    dashboard = load_dashboards()[DEVICE_DASHBOARD]
    queries = {
        f"${variable['name']}": variable["query"]
        for variable in dashboard["templating"]["list"]
        if variable["datasource"]["type"] == "grafana-postgresql-datasource"
    }
    for panel in dashboard_panels(dashboard):
        for target in panel["targets"]:
            if "rawSql" in target:
                queries[panel["title"]] = target["rawSql"]
    return queries


async def test_the_device_dashboard_sql_reads_what_the_app_stored(
    running: Running, empty_pg_url: str
) -> None:
    start_s = int(datetime.now(UTC).timestamp()) - 120
    await publish_and_wait_until_received(running, start_s)
    queries = device_dashboard_sql()
    assert set(queries) == {
        "$device",
        "Registry",
        "Fields (PostgreSQL)",
        "Latest values (PostgreSQL)",
    }

    def expanded(sql: str) -> str:
        return expand_grafana_sql(
            sql,
            {"device": "meter-0"},
            start=datetime.fromtimestamp(start_s - 10, UTC),
            end=datetime.fromtimestamp(start_s + MESSAGES + 10, UTC),
            interval_s=1,
        )

    expected = {
        (float(start_s + i), field, float(value))
        for i in range(0, MESSAGES, 2)
        for field, value in (("power", i), ("relay", i % 4 == 0))
    }
    connection = await asyncpg.connect(empty_pg_url)
    try:

        async def stored() -> set[tuple[float, str, float]]:
            rows = await connection.fetch(expanded(queries["Fields (PostgreSQL)"]))
            return {(float(row["time"]), row["metric"], row["value"]) for row in rows}

        # The stats count a message once it is spooled; the store may write it a moment later.
        await eventually(stored, lambda rows: rows == expected, what="meter-0's readings")
        devices = await connection.fetch(expanded(queries["$device"]))
        registry = await connection.fetch(expanded(queries["Registry"]))
        latest = await connection.fetch(expanded(queries["Latest values (PostgreSQL)"]))
    finally:
        await connection.close()

    assert [row[0] for row in devices] == list(DEVICES)
    assert [(row["id"], row["type"], row["status"]) for row in registry] == [
        ("meter-0", "meter", "active")
    ]
    last = MESSAGES - 2  # meter-0's last message
    assert [(row["field"], row["value"]) for row in latest] == [
        ("power", float(last)),
        ("relay", float(last % 4 == 0)),
    ]
    assert {row["time"] for row in latest} == {datetime.fromtimestamp(start_s + last, UTC)}
