"""Parsing of time-range query parameters: RFC 3339 instants, relative times and durations."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from iotmeter.errors import ValidationFailed

_DURATION = re.compile(r"^(\d+)(us|ms|s|m|h|d|w)$")
_UNIT_US = {
    "us": 1,
    "ms": 1_000,
    "s": 1_000_000,
    "m": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,
    "w": 604_800_000_000,
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_EPOCH_US = 9_223_372_036_854_775  # 2262-04-11T23:47:16Z: InfluxDB's last nanosecond
"""Times the API takes lie in [1970-01-01, 2262-04-11]: what every store can hold."""
_RANGE_TEXT = "between 1970-01-01T00:00:00Z and 2262-04-11T23:47:16Z"


def parse_duration_us(text: str, name: str) -> int:
    """`90s`, `1m`, `15m`, `1h`, `7d`... in microseconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValidationFailed(
            f"{name}={text!r} is not a duration; use a positive number and a unit "
            "(us, ms, s, m, h, d, w), e.g. 1m or 15m"
        )
    duration_us = int(match.group(1)) * _UNIT_US[match.group(2)]
    if duration_us > MAX_EPOCH_US:
        raise ValidationFailed(
            f"{name}={text!r} is longer than any range the API holds (times lie {_RANGE_TEXT})"
        )
    return duration_us


def to_epoch_us(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def from_epoch_us(epoch_us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=epoch_us)


def parse_instant_us(text: str, name: str, now_us: int) -> int:
    """An RFC 3339 time with zone, `now`, or a time relative to now like `-1h` (or `+30d`)."""
    text = text.strip()
    if text == "now":
        epoch_us = now_us
    elif text.startswith("-"):
        epoch_us = now_us - parse_duration_us(text[1:], name)
    elif text.startswith("+"):
        epoch_us = now_us + parse_duration_us(text[1:], name)
    else:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "+"))
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None:
            raise ValidationFailed(
                f"{name}={text!r} is not a time; use RFC 3339 with a zone "
                "(2026-01-01T00:00:00Z), `now`, or a relative time like -1h"
            )
        epoch_us = to_epoch_us(moment)
    if not 0 <= epoch_us <= MAX_EPOCH_US:
        raise ValidationFailed(f"{name}={text!r} is out of range; give a time {_RANGE_TEXT}")
    return epoch_us


@lru_cache(maxsize=64)
def _date_text(day: int) -> str:
    return (_EPOCH + timedelta(days=day)).date().isoformat()


def format_time(epoch_us: int) -> str:
    """RFC 3339 UTC with microseconds and `Z`."""
    # Integer arithmetic and a cached date: a datetime per point dominated large answers.
    day, us = divmod(epoch_us, 86_400_000_000)
    seconds, us = divmod(us, 1_000_000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return f"{_date_text(day)}T{hours:02d}:{minutes:02d}:{seconds:02d}.{us:06d}Z"
