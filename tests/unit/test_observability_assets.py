"""deploy/prometheus and deploy/grafana: Prometheus accepts the configuration and the rules, the
rules pass their promtool unit tests, and the dashboards are well-formed Grafana JSON that only
uses provisioned data sources, names the tables and tags iotmeter writes, and shows what an
operator needs.

Grafana cannot be installed here, so the dashboards are checked as JSON; their SQL runs against
a real database in tests/integration/test_prometheus.py, and their metric names against the live
/metrics there too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from iotmeter.db.base import Base
from iotmeter.storage.timeseries.line_protocol import MEASUREMENT
from tests.fixtures.observability import (
    ALERT_RULES,
    ALERT_TESTS,
    DATASOURCES,
    DEVICE_DASHBOARD,
    HEALTH_DASHBOARD,
    PROMETHEUS_CONFIG,
    dashboard_metric_names,
    dashboard_panels,
    datasource_type,
    is_exported,
    load_dashboards,
    metric_families,
    metric_names,
    prometheus_queries,
)

HEALTH = HEALTH_DASHBOARD
DEVICE = DEVICE_DASHBOARD
PANEL_TYPES = {"row", "timeseries", "stat", "table", "gauge", "bargauge", "text", "state-timeline"}
EXPECTED_ALERTS = {
    "IotmeterDown",
    "IotmeterNoMessages",
    "IotmeterSinkFailing",
    "IotmeterSpoolFilling",
    "IotmeterSpoolFull",
    "IotmeterSpoolBehind",
    "IotmeterApiErrors",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        # A failure, never a skip: in CI a missing tool must fail the run.
        pytest.fail("promtool is not installed (apt-get install prometheus)")
    return found


def run_promtool(promtool: str, *arguments: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *map(str, arguments)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    return load_dashboards()


@pytest.fixture(scope="module")
def datasources() -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return result


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    return [
        rule
        for group in yaml.safe_load(ALERT_RULES.read_text())["groups"]
        for rule in group["rules"]
    ]


# --- promtool ------------------------------------------------------------------------------


def test_prometheus_accepts_the_configuration(promtool: str) -> None:
    result = run_promtool(promtool, "check", "config", PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr  # alerts.yml is loaded


def test_prometheus_accepts_the_alert_rules(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", ALERT_RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_their_unit_tests(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_notices_a_rule_that_no_longer_fires(promtool: str, tmp_path: Path) -> None:
    """The unit tests can fail: with IotmeterDown's threshold made impossible, they do."""
    broken = ALERT_RULES.read_text().replace('up{job="iotmeter"} == 0', 'up{job="iotmeter"} < 0')
    assert broken != ALERT_RULES.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts.test.yml").write_text(ALERT_TESTS.read_text())
    result = run_promtool(promtool, "test", "rules", tmp_path / "alerts.test.yml")
    assert result.returncode != 0
    assert "IotmeterDown" in result.stdout + result.stderr


# --- The alert rules -----------------------------------------------------------------------


def test_the_rules_are_the_documented_ones(rules: list[dict[str, Any]]) -> None:
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS


def test_every_rule_tells_the_operator_what_to_look_at(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        # Each description points at something to check: an endpoint, the log, a metric.
        assert re.search(r"GET /\w+|the log|iotmeter_\w+", annotations["description"]), rule[
            "alert"
        ]


def test_every_rule_is_tested_firing_and_quiet() -> None:
    cases = [
        case
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert fired == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


# --- Metric names in PromQL ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (sink) (rate(iotmeter_readings_stored_total{instance=~"$instance"}'
            "[$__rate_interval]))",
            {"iotmeter_readings_stored_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (route, le) "
            "(rate(iotmeter_http_request_duration_seconds_bucket[5m])))",
            {"iotmeter_http_request_duration_seconds_bucket"},
        ),
        ('up{job="iotmeter"} == 0', {"up"}),
        # Label values, grouping labels, functions and other exporters' metrics are not names.
        (
            'iotmeter_devices{status="up"} and on (process_id) node_load1 > 1e3',
            {"iotmeter_devices"},
        ),
        (
            "sum(increase(iotmeter_messages_received_total[5m])) == 0 and on () "
            "sum(iotmeter_devices) > 0 unless python_info offset 1m",
            {"iotmeter_messages_received_total", "iotmeter_devices", "python_info"},
        ),
        (
            "rate(process_cpu_seconds_total[1m]) / process_max_fds",
            {"process_cpu_seconds_total", "process_max_fds"},
        ),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_metric_names_cover_dashboards_and_rules() -> None:
    names = dashboard_metric_names()
    assert {"up", "iotmeter_spool_max_bytes", "iotmeter_http_requests_total"} <= names
    assert {"iotmeter_sink_write_seconds_bucket", "process_resident_memory_bytes"} <= names
    assert all(
        name == "up" or name.startswith(("iotmeter_", "process_", "python_")) for name in names
    )


def test_exported_names_follow_the_exposition_suffixes() -> None:
    families = metric_families(
        "# HELP a_total Things.\n# TYPE a_total counter\na_total 3.0\n"
        "# TYPE b counter\n"  # OpenMetrics names a counter family without _total
        "# TYPE c_seconds histogram\n# TYPE d gauge\n# TYPE e summary\n"
    )
    exported = ["a_total", "b_total", "c_seconds_bucket", "c_seconds_sum", "c_seconds_count", "d"]
    assert all(is_exported(name, families) for name in exported)
    assert not any(
        is_exported(name, families) for name in ["a", "c_seconds", "d_total", "e_bucket", "f"]
    )


# --- Dashboards ----------------------------------------------------------------------------


def test_both_dashboards_are_there(dashboards: dict[str, dict[str, Any]]) -> None:
    assert set(dashboards) == {HEALTH, DEVICE}
    assert dashboards[HEALTH]["uid"] == "iotmeter-health"
    assert dashboards[DEVICE]["uid"] == "iotmeter-device-telemetry"


@pytest.mark.parametrize("name", [HEALTH, DEVICE])
def test_dashboard_is_well_formed(dashboards: dict[str, dict[str, Any]], name: str) -> None:
    dashboard = dashboards[name]
    assert dashboard["title"]
    assert dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert "id" not in dashboard or dashboard["id"] is None, "provisioned dashboards have no id"
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        grid = panel["gridPos"]
        assert grid["w"] > 0, panel["title"]
        assert 0 <= grid["x"] <= grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] != "row":
            assert panel.get("title"), panel
            assert panel.get("description"), panel["title"]
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert ref_ids, panel["title"]
            assert len(ref_ids) == len(set(ref_ids)), panel["title"]


@pytest.mark.parametrize("name", [HEALTH, DEVICE])
def test_every_data_source_of_a_dashboard_is_provisioned(
    dashboards: dict[str, dict[str, Any]], datasources: list[dict[str, Any]], name: str
) -> None:
    provisioned = {source["uid"]: source["type"] for source in datasources}
    dashboard = dashboards[name]
    references = [
        reference
        for panel in dashboard_panels(dashboard)
        for reference in [panel["datasource"]] + [t.get("datasource") for t in panel["targets"]]
        if reference is not None
    ] + [variable["datasource"] for variable in dashboard["templating"]["list"]]
    assert references
    for reference in references:
        assert reference["uid"] in provisioned, reference
        assert provisioned[reference["uid"]] == reference["type"], reference


def test_provisioned_data_sources(datasources: list[dict[str, Any]]) -> None:
    by_type = {source["type"]: source for source in datasources}
    assert set(by_type) == {"prometheus", "influxdb", "grafana-postgresql-datasource"}
    assert len({source["uid"] for source in datasources}) == len(datasources)
    influx = by_type["influxdb"]
    assert influx["jsonData"]["version"] == "Flux"
    assert (influx["jsonData"]["organization"], influx["jsonData"]["defaultBucket"]) == (
        "iot-org",
        "iot-metrics",
    )
    assert influx["secureJsonData"]["token"] == "${INFLUXDB_ADMIN_TOKEN}"
    assert by_type["prometheus"]["isDefault"] is True


HEALTH_COVERAGE = {
    # What the health dashboard must show: a PromQL fragment for each.
    "ingest rate per sink": r"sum by \(sink\) \(rate\(iotmeter_readings_stored_total",
    "messages received rate": r"rate\(iotmeter_messages_received_total",
    "rejected by reason": r"sum by \(reason\) \(rate\(iotmeter_messages_rejected_total",
    "dead letters": r"iotmeter_dead_letters_total",
    "spool records": r"iotmeter_spool_records",
    "spool bytes": r"iotmeter_spool_bytes",
    "spool maximum": r"iotmeter_spool_max_bytes",
    "oldest unconfirmed": r"iotmeter_spool_oldest_unconfirmed_age_seconds",
    "sink lag": r"by \(sink\) \(iotmeter_sink_lag_records",
    "sink failing": r"by \(sink\) \(iotmeter_sink_failing",
    "write p50": r"histogram_quantile\(0\.5, sum by \(sink, le\) \(rate\("
    r"iotmeter_sink_write_seconds_bucket",
    "write p99": r"histogram_quantile\(0\.99, sum by \(sink, le\) \(rate\("
    r"iotmeter_sink_write_seconds_bucket",
    "API rate by status": r"sum by \(status\) \(rate\(iotmeter_http_requests_total",
    "API p99 by route": r"histogram_quantile\(0\.99, sum by \(route, le\) \(rate\("
    r"iotmeter_http_request_duration_seconds_bucket",
    "MQTT connected": r"iotmeter_mqtt_connected",
    "MQTT reconnects": r"iotmeter_mqtt_reconnects_total",
    "MQTT inflight": r"iotmeter_mqtt_inflight_messages",
    "CPU": r"rate\(process_cpu_seconds_total",
    "RSS": r"process_resident_memory_bytes",
    "open fds": r"process_open_fds",
    "GC": r"python_gc_collections_total",
}


@pytest.mark.parametrize("what", sorted(HEALTH_COVERAGE))
def test_health_dashboard_shows(what: str) -> None:
    expressions = [expr for where, expr in prometheus_queries() if where.startswith(HEALTH)]
    assert any(re.search(HEALTH_COVERAGE[what], expr) for expr in expressions), what


def test_health_dashboard_filters_by_instance(dashboards: dict[str, dict[str, Any]]) -> None:
    variables = {v["name"]: v for v in dashboards[HEALTH]["templating"]["list"]}
    assert variables["instance"]["definition"] == "label_values(iotmeter_info, instance)"
    for where, expr in prometheus_queries():
        if where.startswith(f"{HEALTH}: ") and not where.endswith("$instance"):
            # Every selector of the panel, not just one of them.
            selectors = re.findall(r"\b(?:iotmeter|process|python)_\w+(\{[^}]*\})?", expr)
            assert all('instance=~"$instance"' in s for s in selectors), where


def device_queries(dashboard: dict[str, Any], kind: str) -> list[str]:
    key = {"influxdb": "query", "grafana-postgresql-datasource": "rawSql"}[kind]
    return [
        target[key]
        for panel in dashboard_panels(dashboard)
        for target in panel["targets"]
        if datasource_type(target.get("datasource") or panel["datasource"]) == kind
    ]


def test_device_dashboard_picks_a_registered_device(dashboards: dict[str, dict[str, Any]]) -> None:
    variables = {v["name"]: v for v in dashboards[DEVICE]["templating"]["list"]}
    device = variables["device"]
    assert device["datasource"]["type"] == "grafana-postgresql-datasource"
    assert device["query"] == "SELECT id FROM devices ORDER BY id"
    assert device["multi"] is False
    assert device["includeAll"] is False


def test_device_dashboard_reads_what_influx_holds(dashboards: dict[str, dict[str, Any]]) -> None:
    queries = device_queries(dashboards[DEVICE], "influxdb")
    assert len(queries) == 2
    for query in queries:
        assert 'from(bucket: "iot-metrics")' in query
        assert "range(start: v.timeRangeStart, stop: v.timeRangeStop)" in query
        assert f'r._measurement == "{MEASUREMENT}" and r.device_id == "${{device}}"' in query
        # Booleans and floats never meet in one aggregate or table.
        assert "toFloat()" in query
    assert any("aggregateWindow(every: v.windowPeriod, fn: mean" in query for query in queries)


def test_device_dashboard_reads_the_sql_store_tables(dashboards: dict[str, dict[str, Any]]) -> None:
    queries = device_queries(dashboards[DEVICE], "grafana-postgresql-datasource")
    assert len(queries) == 3
    tables = {table for query in queries for table in re.findall(r"\bFROM (\w+)", query)}
    assert tables == {"devices", "telemetry", "telemetry_latest"}
    assert tables <= set(Base.metadata.tables)
    for query in queries:
        assert "'${device}'" in query
    series = next(query for query in queries if "FROM telemetry\n" in query)
    assert "$__timeGroupAlias(" in series
    assert "$__unixEpochFrom()" in series
    assert "$__unixEpochTo()" in series
