"""Prometheus metrics: `GET /metrics` on the API port (behind its keys) and, when
`IOTMETER_METRICS_PORT` is set, on a port of their own without authentication.

What is counted anyway (the ingest counters of `IngestStats`, the spool, the sink runners, the
intake) is read when Prometheus scrapes, by a custom collector: the ingest path does no more work
per message for metrics than it did for `/api/v1/stats`. Only what nothing counted before is
observed as it happens: one histogram sample per sink batch and per HTTP request. The registry's
figures (devices, alerts, notifications) are read from the database by a task every
`REGISTRY_REFRESH_S`, never by a scrape: a scrape costs no query, and a scraper that asks
often cannot load the database.

No label names a device (10,000 devices would be 10,000 series per metric): per-device counts
stay in `/api/v1/stats/devices`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp, Receive, Scope, Send

from iotmeter import __version__
from iotmeter.api.asgi import KNOWN_METHODS, ResponseStatus, route_template
from iotmeter.config import env_name
from iotmeter.db.base import utcnow
from iotmeter.ingest.stats import STORE_SINKS
from iotmeter.readings import RejectReason
from iotmeter.repositories.operations import RegistryFigures, read_registry_figures

if TYPE_CHECKING:
    from iotmeter.state import AppState

logger = logging.getLogger(__name__)

REGISTRY_REFRESH_S = 5.0
"""How often the registry's figures are read from the database (one statement, about 1.5 ms of
the app's CPU with 10,000 devices)."""
REGISTRY_READ_TIMEOUT_S = 10.0
BATCH_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
WRITE_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
HTTP_SECONDS_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
"""Ten buckets: each (route, method) costs 13 lines a scrape, and a scrape's CPU is about 7 µs
a line (prometheus-client's text writer): 50 routes with the 13 buckets of the sinks' histogram
took 3 ms more per scrape."""
MAX_TYPE_LABELS = 50
"""Device types are the devices' to choose (`"type"` in a message): past this many, the
smaller types are counted together as `other`, so no fleet can flood the scrape with series."""
UNMATCHED_ROUTE = "unmatched"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The classic text format, which every Prometheus since 2.0 reads (metric names here never
need the escaping that the 1.0.0 format announces)."""
"""The route label of requests no route took (404s): never the raw path."""


@dataclass(frozen=True, slots=True)
class SinkObserver:
    """The runner's `BatchObserver` for one sink: the histograms' children, bound once."""

    batch_size: Histogram
    write_seconds: Histogram

    def written(self, records: int, seconds: float) -> None:
        self.batch_size.observe(records)
        self.write_seconds.observe(seconds)


class Metrics:
    """One app's metrics registry (its own, not the process-global one: several apps in one
    process, as in the tests, do not see each other's)."""

    def __init__(self) -> None:
        # `_created` samples double the series of every counter and histogram, and no
        # dashboard or rule here reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            # The default collectors read process-wide figures: the same objects serve any
            # registry (registering them again elsewhere would only duplicate the work).
            self.registry.register(default)
        self.sink_batch_size = Histogram(
            "iotmeter_sink_batch_size",
            "Spool records in one batch written by a sink.",
            ["sink"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.sink_write_seconds = Histogram(
            "iotmeter_sink_write_seconds",
            "Seconds one batch write of a sink took (written, not failed).",
            ["sink"],
            buckets=WRITE_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "iotmeter_http_requests",
            "HTTP requests by method, route template and status class (2xx, 4xx, 5xx...).",
            ["method", "route", "status"],
            registry=self.registry,
        )
        # By method and route only: the status class is the counter's (a histogram per status
        # class would triple the lines of the largest family for a split nobody charts).
        self.http_seconds = Histogram(
            "iotmeter_http_request_duration_seconds",
            "How long HTTP requests took, by method and route template.",
            ["method", "route"],
            buckets=HTTP_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.figures = RegistryFigures()
        self._collector: _StateCollector | None = None
        self.state: AppState | None = None

    def attach(self, state: AppState) -> None:
        """Read the app's counters at each scrape from now on."""
        self.state = state
        self._collector = _StateCollector(self, state)
        self.registry.register(self._collector)

    def detach(self) -> None:
        """Stop reading the app's state (the lifespan ended; a next one attaches again)."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
            self._collector = None
        self.state = None

    def sink_observer(self, sink: str) -> SinkObserver:
        return SinkObserver(self.sink_batch_size.labels(sink), self.sink_write_seconds.labels(sink))

    async def run(self) -> None:
        """Read the registry's figures every `REGISTRY_REFRESH_S` until cancelled."""
        state = self.state
        if state is None:
            raise RuntimeError("metrics: attach() the app's state first")
        failing = False
        while True:
            try:
                # A database that takes the connection and never answers must not freeze the
                # figures unnoticed: the read gives up and says so.
                async with asyncio.timeout(REGISTRY_READ_TIMEOUT_S):
                    self.figures = await _read_registry(state)
            except Exception as exc:
                # Scrapes go on with the last figures; said once per outage.
                if not failing:
                    logger.warning("metrics: could not read the registry's figures: %s", exc)
                failing = True
            else:
                failing = False
            await asyncio.sleep(REGISTRY_REFRESH_S)

    def exposition(self) -> bytes:
        """The text format of everything in the registry (see `text_format`)."""
        return text_format(self.registry)


async def _read_registry(state: AppState) -> RegistryFigures:
    online_since = utcnow() - timedelta(seconds=state.settings.online_window_s)
    async with state.database.reader() as connection:
        return await read_registry_figures(connection, online_since)


class _StateCollector(Collector):
    """The app's own counters and gauges, read at scrape time."""

    def __init__(self, metrics: Metrics, state: AppState) -> None:
        self.metrics = metrics
        self.state = state

    def collect(self) -> Iterable[Metric]:
        yield from _info(self.state)
        yield from _ingest(self.state)
        yield from _collector(self.state)
        yield from _registry(self.metrics.figures)
        yield from _alerting(self.state)
        yield from _archive(self.state)


def _info(state: AppState) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "iotmeter_info",
        "The running iotmeter: version and the backends in use (always 1).",
        labels=["version", "database", "timeseries", "archive", "mqtt"],
    )
    mqtt = state.broker.origin if state.broker is not None else "off"
    info.add_metric(
        [
            __version__,
            state.database.dialect,
            state.timeseries.backend,
            state.archive.backend,
            mqtt,
        ],
        1,
    )
    yield info


def _ingest(state: AppState) -> Iterator[Metric]:
    stats = state.stats
    yield CounterMetricFamily(
        "iotmeter_messages_received",
        "MQTT messages taken from iot/+/telemetry into the spool.",
        value=stats.messages_received,
    )
    rejected = CounterMetricFamily(
        "iotmeter_messages_rejected",
        "Messages (or batch elements) refused, by reason; each one is in the dead letters.",
        labels=["reason"],
    )
    for reason in RejectReason:
        rejected.add_metric([reason.value], stats.rejected[reason.value])
    yield rejected
    dead = CounterMetricFamily(
        "iotmeter_dead_letters",
        "Dead letters written, by source: `ingest` (refused on the way in), a sink's name (set "
        "aside by that sink), `channel` (device status and reported configuration).",
        labels=["source"],
    )
    dead.add_metric(["ingest"], stats.dead_letters_ingest)
    for runner in state.collector.runners if state.collector is not None else ():
        dead.add_metric([runner.name], runner.parked)
    channel = state.device_channel.stats.refused if state.device_channel is not None else 0
    dead.add_metric(["channel"], channel)
    yield dead


def _collector(state: AppState) -> Iterator[Metric]:
    collector = state.collector
    stored = CounterMetricFamily(
        "iotmeter_readings_stored",
        "Reading sets each sink stored (time series and archive: once durable).",
        labels=["sink"],
    )
    if collector is None:
        for sink in STORE_SINKS:
            stored.add_metric([sink], state.stats.stored_total[sink])
        yield stored
        return
    spool, intake = collector.spool, collector.intake
    lag = spool.lag()
    lag_family = GaugeMetricFamily(
        "iotmeter_sink_lag_records",
        "Spool records a sink has not confirmed yet.",
        labels=["sink"],
    )
    failing = GaugeMetricFamily(
        "iotmeter_sink_failing",
        "1 while a sink fails and retries (see GET /ready and the log).",
        labels=["sink"],
    )
    for runner in collector.runners:
        name = runner.name
        if name in STORE_SINKS:
            stored.add_metric([name], state.stats.stored_total[name])
        else:
            stored.add_metric([name], runner.readings_written)
        lag_family.add_metric([name], lag.get(name, 0))
        failing.add_metric([name], 1 if runner.error else 0)
    yield stored
    yield lag_family
    yield failing
    yield GaugeMetricFamily(
        "iotmeter_spool_records",
        "Records in the spool not yet confirmed by every sink.",
        value=spool.depth(),
    )
    yield GaugeMetricFamily(
        "iotmeter_spool_bytes", "Bytes of spool files on disk.", value=spool.disk_bytes
    )
    yield GaugeMetricFamily(
        "iotmeter_spool_max_bytes",
        "IOTMETER_SPOOL_MAX_BYTES: past it the collector stops acking.",
        value=spool.max_bytes,
    )
    yield GaugeMetricFamily(
        "iotmeter_spool_full",
        "1 while the spool is full and the collector does not ack (the broker keeps the rest).",
        value=1 if intake.spool_full_since is not None else 0,
    )
    yield GaugeMetricFamily(
        "iotmeter_spool_oldest_unconfirmed_age_seconds",
        "Age of the oldest spool record some sink has not confirmed (0: none waits).",
        value=spool.oldest_unconfirmed_age_s() or 0.0,
    )
    yield CounterMetricFamily(
        "iotmeter_intake_held_seconds",
        "Seconds the collector stopped reading from the broker because a sink lagged.",
        value=intake.held_s,
    )
    yield GaugeMetricFamily(
        "iotmeter_mqtt_connected",
        "1 while the collector is connected and subscribed.",
        value=1 if intake.connected else 0,
    )
    yield CounterMetricFamily(
        "iotmeter_mqtt_reconnects",
        "Established broker connections the collector lost.",
        value=intake.reconnects,
    )
    yield GaugeMetricFamily(
        "iotmeter_mqtt_inflight_messages",
        "Messages taken from the broker and not yet acknowledged to it.",
        value=intake.inflight,
    )


def _archive(state: AppState) -> Iterator[Metric]:
    writes = state.archive.writes
    yield CounterMetricFamily(
        "iotmeter_archive_existing_keys_skipped",
        "Archive writes skipped because the key existed (a redelivery or a rebuild): archived "
        "objects are write-once, the first copy stays.",
        value=writes.skipped_existing,
    )
    yield CounterMetricFamily(
        "iotmeter_archive_damaged_files_replaced",
        "Local archive files found damaged (cut by a crash before they were durable) when "
        "written again, and replaced by the new copy.",
        value=writes.repaired,
    )


def _registry(figures: RegistryFigures) -> Iterator[Metric]:
    devices = GaugeMetricFamily(
        "iotmeter_devices", "Registered devices by type and status.", labels=["type", "status"]
    )
    by_type: dict[str, int] = {}
    for (kind, _status), count in figures.devices.items():
        by_type[kind] = by_type.get(kind, 0) + count
    named = set(sorted(by_type, key=lambda kind: (-by_type[kind], kind))[:MAX_TYPE_LABELS])
    grouped: dict[tuple[str, str], int] = {}
    for (kind, status), count in figures.devices.items():
        key = (kind if kind in named else "other", status)
        grouped[key] = grouped.get(key, 0) + count
    for (kind, status), count in sorted(grouped.items()):
        devices.add_metric([kind, status], count)
    yield devices
    yield GaugeMetricFamily(
        "iotmeter_devices_online",
        "Devices seen within IOTMETER_ONLINE_WINDOW_S.",
        value=figures.online,
    )
    yield GaugeMetricFamily(
        "iotmeter_devices_connected",
        "Devices whose last status message on the device channel was `online`.",
        value=figures.connected,
    )
    alerts = GaugeMetricFamily(
        "iotmeter_alerts_active",
        "Alerts not resolved (active or acknowledged), by severity.",
        labels=["severity"],
    )
    for severity in ("info", "warning", "critical"):
        alerts.add_metric([severity], figures.alerts_active.get(severity, 0))
    for severity, count in figures.alerts_active.items():
        if severity not in ("info", "warning", "critical"):
            alerts.add_metric([severity], count)
    yield alerts
    notifications = GaugeMetricFamily(
        "iotmeter_notifications",
        "Alert notifications in the outbox by status: pending, delivered, failed (gave up).",
        labels=["status"],
    )
    for status in ("pending", "delivered", "failed"):
        notifications.add_metric([status], figures.notifications.get(status, 0))
    yield notifications


def _alerting(state: AppState) -> Iterator[Metric]:
    deliveries = CounterMetricFamily(
        "iotmeter_notification_deliveries",
        "Delivery attempts of alert notifications by channel kind and outcome.",
        labels=["channel", "outcome"],
    )
    notifier = state.notifier
    attempts = notifier.attempts if notifier is not None else {}
    for kind in ("webhook", "mqtt", "email"):
        for outcome in ("delivered", "failed"):
            deliveries.add_metric([kind, outcome], attempts.get((kind, outcome), 0))
    yield deliveries
    sink = state.alert_sink
    yield CounterMetricFamily(
        "iotmeter_alert_events",
        "Rule events (fired, resolved...) since start.",
        value=sink.events if sink is not None else 0,
    )


_TYPES = {
    "counter": "counter",
    "gauge": "gauge",
    "histogram": "histogram",
    "summary": "summary",
    "unknown": "untyped",
    "info": "gauge",
    "stateset": "gauge",
    "gaugehistogram": "histogram",
}


_number: Callable[[float], str] = floatToGoString
"""The library's own float formatting (`+Inf`, `1e+06`...), typed."""


def _label_value(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def text_format(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format 0.0.4: byte for byte what prometheus-client's
    `generate_latest` writes for these metrics (a test holds them equal), at 60% of its CPU.

    Why not `generate_latest` itself: it checks and escapes every label name of every sample
    for the UTF-8 names of format 1.0, about 7 µs a line; a scrape of 10,000 devices and a busy
    API is 450 to 900 lines, 3 to 6 ms. Every name here is a classic Prometheus name (the
    families are ours or the library's default collectors), so only label values need escaping.
    No `_created` samples (disabled) and no exemplars or timestamps (none are set)."""
    out: list[str] = []
    append = out.append
    for metric in registry.collect():
        name, kind = metric.name, metric.type
        if kind == "counter":
            name += "_total"
        elif kind == "info":
            name += "_info"
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        append(f"# HELP {name} {doc}\n# TYPE {name} {_TYPES[kind]}\n")
        for sample in metric.samples:
            labels = sample.labels
            if labels:
                pairs = ",".join(
                    [f'{key}="{_label_value(value)}"' for key, value in sorted(labels.items())]
                )
                append(f"{sample.name}{{{pairs}}} {_number(sample.value)}\n")
            else:
                append(f"{sample.name} {_number(sample.value)}\n")
    return "".join(out).encode()


class HttpMetrics:
    """Pure ASGI middleware: one histogram sample per HTTP request, labelled with the route's
    template (never the raw path, which would be one series per device id)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.histogram = metrics.http_seconds
        self.counter = metrics.http_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = ResponseStatus(send)
        try:
            await self.app(scope, receive, status)
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            route = route_template(scope) or UNMATCHED_ROUTE
            self.counter.labels(method, route, f"{(status.code or 500) // 100}xx").inc()
            self.histogram.labels(method, route).observe(time.perf_counter() - started)


class MetricsPort:
    """`/metrics` (and nothing else) on a port of its own, without authentication."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno,
                f"cannot serve metrics on {self.host}:{self.port} "
                f"({env_name('metrics_port')}, {env_name('metrics_host')}): {exc.strerror}",
            ) from exc
        self._runner = runner
        logger.info("metrics served on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve(self, _request: web.Request) -> web.Response:
        body = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
