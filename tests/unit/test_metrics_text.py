"""iotmeter writes the text format itself (for speed): it must be exactly what
prometheus-client's own writer gives, and what Prometheus' parser reads back."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from iotmeter.observability.metrics import Metrics, text_format


class _Families(Collector):
    def __init__(self, values: list[tuple[str, float]]) -> None:
        self.values = values

    def collect(self):  # type: ignore[no-untyped-def]
        counter = CounterMetricFamily("t_counted", "a counter\nwith \\ two lines", labels=["x"])
        gauge = GaugeMetricFamily("t_level", 'a "gauge"', labels=["x", "a"])
        for label, value in self.values:
            counter.add_metric([label], abs(value))
            gauge.add_metric([label, "second"], value)
        yield counter
        yield gauge
        info = InfoMetricFamily("t_build", "info", value={"version": "1.2.3"})
        yield info


label_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=20
)
number = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**15), 10**15).map(float)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(label_text, number), max_size=8, unique_by=lambda pair: pair[0]))
def test_same_bytes_as_prometheus_client(values: list[tuple[str, float]]) -> None:
    registry = CollectorRegistry()
    registry.register(_Families(values))
    histogram = Histogram("t_seconds", "h", ["route"], registry=registry, buckets=(0.1, 1, 10))
    counter = Counter("t_requests", "c", ["route", "status"], registry=registry)
    gauge = Gauge("t_plain", "g", registry=registry)
    for label, value in values:
        if math.isfinite(value):
            histogram.labels(label).observe(value)
        counter.labels(label, "2xx").inc()
    gauge.set(values[0][1] if values else 0)
    assert text_format(registry) == generate_latest(registry)


def test_the_apps_registry_reads_back_whole() -> None:
    """The default collectors and the app's own families, parsed by the reference parser."""
    metrics = Metrics()
    metrics.sink_observer("timeseries").written(10, 0.02)
    text = text_format(metrics.registry).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["iotmeter_sink_batch_size"].type == "histogram"
    assert families["process_cpu_seconds"].type == "counter"
    samples = {s.name: s.value for s in families["iotmeter_sink_batch_size"].samples}
    assert samples["iotmeter_sink_batch_size_count"] == 1
    assert samples["iotmeter_sink_batch_size_sum"] == 10
