"""Telemetry query rules: ranges and point limits, shared by the API and anything else that
queries the time-series store."""

from __future__ import annotations

from collections.abc import Sequence

from iotmeter.config import Settings, env_name
from iotmeter.errors import ValidationFailed
from iotmeter.storage.timeseries.base import Aggregate, SeriesPoint, SeriesQuery


def plan_query(
    settings: Settings,
    device_id: str,
    *,
    start_us: int,
    stop_us: int,
    every_us: int | None,
    every_text: str | None,
    fields: list[str] | None,
    aggregate: Aggregate,
) -> SeriesQuery:
    """The store query for this range, or `ValidationFailed` saying what to change to stay
    within `query_max_range_s` and `query_max_points`."""
    if start_us >= stop_us:
        raise ValidationFailed("start must be before stop")
    max_range_us = int(settings.query_max_range_s * 1_000_000)
    if stop_us - start_us > max_range_us:
        raise ValidationFailed(
            f"the range spans {(stop_us - start_us) / 86_400e6:.1f} days; at most "
            f"{settings.query_max_range_s / 86400:.1f} days ({env_name('query_max_range_s')}): "
            "narrow start/stop"
        )
    max_points = settings.query_max_points
    if every_us is not None:
        windows = -(-(stop_us - start_us) // every_us)
        if windows * len(fields or [""]) > max_points:
            smallest = -(-(stop_us - start_us) * len(fields or [""]) // max_points)
            raise ValidationFailed(
                f"{windows} windows of {every_text} exceed the limit of {max_points} points "
                f"({env_name('query_max_points')}); use every >= {smallest // 1_000_000 + 1}s "
                "or a shorter range"
            )
    return SeriesQuery(
        device_id=device_id,
        start_us=start_us,
        stop_us=stop_us,
        fields=fields,
        every_us=every_us,
        aggregate=aggregate,
        limit=max_points + 1,  # one more tells that the range holds too many
    )


def check_point_count(settings: Settings, points: Sequence[SeriesPoint]) -> None:
    """`ValidationFailed` when a query planned by `plan_query` found too many points."""
    max_points = settings.query_max_points
    if len(points) > max_points:
        raise ValidationFailed(
            f"more than {max_points} points in this range ({env_name('query_max_points')}); "
            "add every= (e.g. every=1m) to aggregate, or narrow the range or the fields"
        )
