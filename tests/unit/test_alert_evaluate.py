"""The rule state machines at their edges (pure: the live sink and the backtest run this)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmeter.alerting.evaluate import (
    Event,
    Rule,
    State,
    breached,
    heard,
    quiet_band,
    render,
    step,
    tick,
)

S = 1_000_000


def make(**fields: Any) -> Rule:
    base = Rule(
        id=1,
        name="r",
        kind="threshold",
        device_id=None,
        device_type=None,
        field="t",
        operator=">",
        threshold=30.0,
        low=None,
        high=None,
        hysteresis=0.0,
        duration_s=0.0,
        timeout_s=None,
        k=None,
        half_life=None,
        warmup=None,
        flap_window_s=0.0,
        severity="warning",
        message="{device} {field}={value} {threshold}",
        enabled=True,
        created_at_us=0,
    )
    return replace(base, **fields)


def run(rule: Rule, points: list[tuple[float, float]], state: State | None = None) -> list[str]:
    state = state or State()
    kinds = []
    for seconds, value in points:
        kinds += [event.kind for event in step(rule, state, "d", round(seconds * S), value)]
    return kinds


def test_the_duration_is_held_to_the_microsecond() -> None:
    rule = make(duration_s=60)
    assert run(rule, [(0, 31), (59.999999, 31)]) == []
    assert run(rule, [(0, 31), (60, 31)]) == ["fired"]
    # A dip below resets the pending time.
    assert run(rule, [(0, 31), (30, 29), (40, 31), (99, 31)]) == []


@pytest.mark.parametrize(
    ("operator", "breach", "still_open", "clears"),
    [
        (">", 31.0, 28.01, 28.0),
        (">=", 30.0, 28.0, 27.99),
        ("<", 29.0, 31.99, 32.0),
        ("<=", 30.0, 32.0, 32.01),
    ],
)
def test_hysteresis_is_the_clear_threshold(
    operator: str, breach: float, still_open: float, clears: float
) -> None:
    rule = make(operator=operator, hysteresis=2.0)
    state = State()
    assert run(rule, [(0, breach)], state) == ["fired"]
    assert run(rule, [(1, still_open)], state) == []
    assert run(rule, [(2, clears)], state) == ["resolved"]


def test_outside_a_band_fires_on_either_side_and_clears_inside_by_the_hysteresis() -> None:
    rule = make(operator="outside", threshold=None, low=10.0, high=20.0, hysteresis=1.0)
    state = State()
    assert run(rule, [(0, 9.9)], state) == ["fired"]
    assert run(rule, [(1, 10.5)], state) == []
    assert run(rule, [(2, 21.0)], state) == ["breach"]
    assert run(rule, [(3, 11.0)], state) == ["resolved"]
    assert state.extreme == 21.0 or state.extreme == 9.9


def test_late_and_repeated_readings_change_nothing() -> None:
    rule = make()
    state = State()
    assert run(rule, [(10, 31)], state) == ["fired"]
    assert run(rule, [(10, 25), (5, 25)], state) == []  # same time, older
    assert state.firing
    assert run(rule, [(11, 25)], state) == ["resolved"]


def test_rate_of_change_is_per_minute_of_device_time() -> None:
    rule = make(kind="rate_of_change", operator=">", threshold=10.0)
    state = State()
    assert run(rule, [(0, 0.0), (30, 4.0)], state) == []  # 8/min
    assert run(rule, [(60, 10.0)], state) == ["fired"]  # 12/min
    assert state.fired_value == pytest.approx(12.0)
    assert run(rule, [(120, 11.0)], state) == ["resolved"]


def test_anomaly_waits_for_its_warm_up_then_fires_outside_k_sigma() -> None:
    rule = make(kind="anomaly", operator=None, threshold=None, k=3.0, half_life=10, warmup=20)
    state = State()
    values = [100.0 + (i % 2) for i in range(19)] + [500.0]  # an outlier inside the warm-up
    assert run(rule, [(i, v) for i, v in enumerate(values)], state) == []
    # The outlier widened the variance; with a half-life of 10 readings it has faded after 150.
    steady = [100.0 + (i % 2) for i in range(150)]
    assert run(rule, [(100 + i, v) for i, v in enumerate(steady)], state) == []
    assert run(rule, [(300, 130.0)], state) == ["fired"]
    assert run(rule, [(301, 100.5)], state) == ["resolved"]


def test_a_rule_that_flaps_within_its_window_is_suppressed() -> None:
    rule = make(flap_window_s=300)
    state = State()
    assert run(rule, [(0, 31), (10, 25)], state) == ["fired", "resolved"]
    assert run(rule, [(20, 31)], state) == ["suppressed"]
    assert state.suppressed == 1
    assert run(rule, [(311, 31)], state) == ["fired"]


def test_no_data_fires_after_the_timeout_and_resolves_when_heard() -> None:
    rule = make(kind="no_data", field=None, operator=None, threshold=None, timeout_s=10)
    state = State()
    assert tick(rule, state, "d", 9 * S, 0) == []
    fired = tick(rule, state, "d", 10 * S, 0)
    assert [event.kind for event in fired] == ["fired"]
    assert tick(rule, state, "d", 20 * S, 0) == []  # open: no second alert
    assert [event.kind for event in heard(rule, state, "d", 21 * S)] == ["resolved"]
    assert tick(rule, state, "d", 30 * S, 0) == []
    assert [event.kind for event in tick(rule, state, "d", 31 * S, 0)] == ["fired"]


def test_state_survives_its_json_form() -> None:
    rule = make(kind="anomaly", operator=None, threshold=None, k=2.0, half_life=5, warmup=3)
    state = State()
    run(rule, [(i, float(i % 3)) for i in range(10)], state)
    assert State.from_json(state.to_json()) == state


def test_the_message_template_fills_what_it_knows_and_keeps_the_rest() -> None:
    broken = make(message="{device} {")  # not a template: kept as written
    assert render(broken.message, Event("fired", broken, "dev-1", 0, 1.0, State())) == "{device} {"
    rule = make(message="{device}: {field} {value} ({threshold}) {unknown}")
    event = Event("fired", rule, "dev-1", 0, 31.5, State())
    assert render(rule.message, event) == "dev-1: t 31.5 (> 30) {unknown}"


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200))
def test_threshold_state_is_always_consistent_with_the_last_value(values: list[float]) -> None:
    """Without duration or hysteresis an open alert means the last value breaches, and each
    fired is followed by a resolved before the next fired."""
    rule = make()
    state = State()
    kinds = run(rule, [(i, v) for i, v in enumerate(values)], state)
    assert state.firing == (values[-1] > 30.0)
    opened = [k for k in kinds if k in ("fired", "resolved")]
    assert all(a != b for a, b in itertools.pairwise(opened))
    assert not opened or opened[0] == "fired"


@pytest.mark.parametrize("operator", [">", ">=", "<", "<=", "outside"])
@given(value=st.floats(-100, 100, allow_nan=False), threshold=st.floats(-50, 50))
def test_the_quiet_band_is_exactly_the_values_that_do_not_breach(
    operator: str, value: float, threshold: float
) -> None:
    """The sink's inline fast path agrees with the rule's condition, to the last bit."""
    rule = make(operator=operator, threshold=threshold, low=threshold - 10, high=threshold + 10)
    band = quiet_band(rule)
    assert band is not None
    for probe in (value, threshold, math.nextafter(threshold, 0), math.nextafter(threshold, 99)):
        assert (band[0] <= probe <= band[1]) == (not breached(rule, probe))
