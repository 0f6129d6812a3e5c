"""Times in API answers: RFC 3339 UTC with microseconds and `Z`, from microseconds since 1970."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotmeter.api.timerange import MAX_EPOCH_US, format_time, parse_instant_us
from iotmeter.errors import ValidationFailed

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FIRST_US = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
LAST_US = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - EPOCH) // timedelta(
    microseconds=1
)


@pytest.mark.parametrize(
    ("epoch_us", "text"),
    [
        (0, "1970-01-01T00:00:00.000000Z"),
        (-1, "1969-12-31T23:59:59.999999Z"),
        (1_767_225_600_000_000, "2026-01-01T00:00:00.000000Z"),
        (1_709_164_799_123_456, "2024-02-28T23:59:59.123456Z"),
        (1_709_164_800_000_001, "2024-02-29T00:00:00.000001Z"),
        (FIRST_US, "0001-01-01T00:00:00.000000Z"),
        (LAST_US, "9999-12-31T23:59:59.999999Z"),
    ],
)
def test_format_time(epoch_us: int, text: str) -> None:
    assert format_time(epoch_us) == text


@given(st.integers(min_value=FIRST_US, max_value=LAST_US))
def test_format_time_is_the_isoformat_of_the_instant(epoch_us: int) -> None:
    moment = EPOCH + timedelta(microseconds=epoch_us)
    expected = moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
    assert format_time(epoch_us) == expected


@given(st.integers(min_value=0, max_value=MAX_EPOCH_US))
def test_every_time_the_api_takes_reads_back_as_itself(epoch_us: int) -> None:
    assert parse_instant_us(format_time(epoch_us), "start", 0) == epoch_us


@pytest.mark.parametrize(
    "text",
    [
        "1969-12-31T23:59:59.999999Z",
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "2262-04-11T23:47:16.854776Z",
        "-99999999999d",
    ],
)
def test_a_time_outside_what_stores_hold_is_refused_naming_the_range(text: str) -> None:
    with pytest.raises(ValidationFailed, match="between 1970-01-01T00:00:00Z and 2262-04-11"):
        parse_instant_us(text, "start", 1_800_000_000_000_000)


@pytest.mark.parametrize("epoch_us", [FIRST_US - 1, LAST_US + 1])
def test_format_time_outside_years_1_to_9999_is_an_overflow(epoch_us: int) -> None:
    with pytest.raises(OverflowError):
        format_time(epoch_us)


def test_a_time_ahead_of_now_reads_like_one_behind_it() -> None:
    now_us = 1_800_000_000_000_000
    assert parse_instant_us("+90d", "expires", now_us) == now_us + 90 * 86_400_000_000
    assert parse_instant_us("-1h", "start", now_us) == now_us - 3_600_000_000
