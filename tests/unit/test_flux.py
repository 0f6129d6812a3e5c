"""Flux queries: literals escaped, bounds exact, the shapes the InfluxDB store relies on.

String literals are read back with the Flux lexer of the fake server (written from the Flux
spec's string literal rules), so "escaped" means "reads back as exactly one literal".
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmeter.storage.timeseries.base import AGGREGATES, Aggregate, SeriesQuery
from iotmeter.storage.timeseries.flux import (
    flux_string,
    flux_time,
    latest_query,
    range_query,
    rfc3339_us,
)
from tests.fixtures.fake_influx import Token, parse_rfc3339_ns, tokenize

START_US = 1_714_521_600_000_000  # 2024-05-01T00:00:00Z
HOUR_US = 3_600_000_000


def query(**overrides: object) -> SeriesQuery:
    values: dict[str, object] = {
        "device_id": "dev-1",
        "start_us": START_US,
        "stop_us": START_US + HOUR_US,
    }
    values.update(overrides)
    return SeriesQuery(**values)  # type: ignore[arg-type]


def strings(flux: str) -> list[str]:
    return [token.value for token in tokenize(flux) if token.kind == "string"]


def pipeline(flux: str) -> list[str]:
    return [step.strip() for step in flux.split("|>")]


def called(flux: str) -> list[str]:
    """The functions of the pipeline, read from tokens (so `|>` inside a literal is no step)."""
    tokens = tokenize(flux)
    return [tokens[0].text] + [
        following.text
        for token, following in itertools.pairwise(tokens)
        if token.kind == "punct" and token.text == "|>"
    ]


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("plain", '"plain"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("line\nbreak\r\ttab", '"line\\nbreak\\r\\ttab"'),
        ("${secret}", '"\\${secret}"'),
        ("$5 and {x}", '"$5 and {x}"'),
        ("ünïcode 🌡", '"ünïcode 🌡"'),
        ("", '""'),
    ],
)
def test_flux_string_escapes_quotes_backslashes_and_interpolation(value: str, literal: str) -> None:
    assert flux_string(value) == literal
    assert tokenize(literal) == [Token("string", value, value)]


@given(st.text())
def test_any_string_is_exactly_one_flux_literal(value: str) -> None:
    assert tokenize(flux_string(value)) == [Token("string", value, value)]


def test_an_injection_through_the_device_id_stays_inside_its_literal() -> None:
    flux = range_query("iot-metrics", query(device_id='a" or true or "'))
    assert 'r.device_id == "a\\" or true or \\""' in flux
    assert 'a" or true or "' in strings(flux)
    assert not any(token.text == "true" and token.kind == "ident" for token in tokenize(flux))


def test_an_injection_through_a_field_name_or_the_bucket_stays_inside_its_literal() -> None:
    flux = range_query('b") |> drop(', query(fields=['x" or r._field != "']))
    assert strings(flux)[0] == 'b") |> drop('
    assert 'x" or r._field != "' in strings(flux)
    assert called(flux) == [
        "from",
        "range",
        "filter",
        "filter",
        "keep",
        "limit",
    ]


@pytest.mark.parametrize(
    ("epoch_us", "text"),
    [
        (0, "1970-01-01T00:00:00.000000Z"),
        (START_US + 123_456, "2024-05-01T00:00:00.123456Z"),
        (-1, "1969-12-31T23:59:59.999999Z"),
        (9_000_000_000_000_000, "2255-03-14T16:00:00.000000Z"),
    ],
)
def test_times_are_rfc3339_utc_with_microseconds(epoch_us: int, text: str) -> None:
    assert rfc3339_us(epoch_us) == text
    assert flux_time(epoch_us) == f'time(v: "{text}")'
    assert parse_rfc3339_ns(text) == epoch_us * 1000


def test_times_influxdb_cannot_store_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        rfc3339_us(10**19)
    with pytest.raises(ValueError, match="outside"):
        rfc3339_us(-(10**19))


def test_the_range_is_start_inclusive_stop_exclusive_in_exact_time() -> None:
    flux = range_query("iot-metrics", query(start_us=START_US + 1, stop_us=START_US + 2))
    assert pipeline(flux)[1] == (
        'range(start: time(v: "2024-05-01T00:00:00.000001Z"), '
        'stop: time(v: "2024-05-01T00:00:00.000002Z"))'
    )


def test_an_empty_range_is_refused() -> None:
    with pytest.raises(ValueError, match="empty time range"):
        range_query("b", query(stop_us=START_US))


def test_a_raw_query_filters_the_device_keeps_three_columns_and_limits() -> None:
    assert pipeline(range_query("iot-metrics", query(limit=500))) == [
        'from(bucket: "iot-metrics")',
        'range(start: time(v: "2024-05-01T00:00:00.000000Z"), '
        'stop: time(v: "2024-05-01T01:00:00.000000Z"))',
        'filter(fn: (r) => r._measurement == "iot_telemetry" and r.device_id == "dev-1")',
        'keep(columns: ["_time", "_field", "_value"])',
        "limit(n: 500)",
    ]


def test_the_fields_filter_matches_any_of_the_fields() -> None:
    flux = range_query("b", query(fields=["temp", 'we"ird']))
    assert 'filter(fn: (r) => r._field == "temp" or r._field == "we\\"ird")' in pipeline(flux)


def test_no_fields_filter_without_fields_and_an_empty_list_is_refused() -> None:
    assert "r._field" not in range_query("b", query(fields=None))
    with pytest.raises(ValueError, match="fields"):
        range_query("b", query(fields=[]))


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_the_window_clause_for_each_aggregate(aggregate: Aggregate) -> None:
    steps = pipeline(range_query("b", query(every_us=60_000_000, aggregate=aggregate)))
    window = (
        f"aggregateWindow(every: 60000000us, fn: {aggregate}, createEmpty: false, "
        'timeSrc: "_start")'
    )
    assert window in steps
    # Booleans are converted only where Flux cannot aggregate them.
    converts = aggregate in ("mean", "min", "max", "sum")
    assert ("toFloat()" in steps) is converts
    if converts:
        assert steps.index("toFloat()") == steps.index(window) - 1
    assert steps[-2:] == ['keep(columns: ["_time", "_field", "_value"])', "limit(n: 100000)"]


def test_a_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window"):
        range_query("b", query(every_us=0))


def test_latest_filters_every_device_and_keeps_the_device_id() -> None:
    flux = latest_query(
        "iot-metrics",
        ["d1", 'd"2'],
        now_us=START_US,
        lookback_us=HOUR_US,
        ahead_us=60_000_000,
    )
    assert pipeline(flux) == [
        'from(bucket: "iot-metrics")',
        'range(start: time(v: "2024-04-30T23:00:00.000000Z"), '
        'stop: time(v: "2024-05-01T00:01:00.000000Z"))',
        'filter(fn: (r) => r._measurement == "iot_telemetry" and '
        '(r.device_id == "d1" or r.device_id == "d\\"2"))',
        "last()",
        'keep(columns: ["device_id", "_time", "_field", "_value"])',
    ]


def test_latest_looks_back_thirty_days_by_default() -> None:
    flux = latest_query("b", ["d1"], now_us=START_US)
    assert 'start: time(v: "2024-04-01T00:00:00.000000Z")' in flux
    assert 'stop: time(v: "2024-05-02T00:00:00.000000Z")' in flux


def test_latest_needs_devices() -> None:
    with pytest.raises(ValueError, match="device_ids"):
        latest_query("b", [], now_us=START_US)
