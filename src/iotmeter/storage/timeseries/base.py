"""The time-series store Protocol and the values it speaks in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from iotmeter.readings import ReadingSet
from iotmeter.storage.usage import StoreUsage

Aggregate = Literal["mean", "min", "max", "sum", "count", "first", "last"]
AGGREGATES: tuple[Aggregate, ...] = ("mean", "min", "max", "sum", "count", "first", "last")


@dataclass(frozen=True, slots=True)
class SeriesQuery:
    """Readings of one device in [start_us, stop_us), optionally aggregated per window.

    With a window, each point's time is the window's start; windows are aligned to the epoch.
    """

    device_id: str
    start_us: int
    stop_us: int
    fields: Sequence[str] | None = None
    every_us: int | None = None
    aggregate: Aggregate = "mean"
    limit: int = 100_000


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    field: str
    epoch_us: int
    value: float


class TimeSeriesStore(Protocol):
    """Where readings are kept for querying over time."""

    backend: str
    tags_device_type: bool
    """Whether the store keeps the device type with each point (then it must be stable)."""

    async def write(self, readings: Sequence[ReadingSet]) -> None:
        """Store every value of every reading set; writing the same reading twice is harmless."""
        ...

    async def query(self, query: SeriesQuery) -> list[SeriesPoint]:
        """Points ordered by field, then time; at most `query.limit` of them."""
        ...

    async def scan(
        self, device_id: str, field: str, start_us: int, stop_us: int, limit: int
    ) -> list[tuple[int, float]]:
        """(time, value) of one series in [start_us, stop_us), ordered by time, at most
        `limit`: the keyset reads of a streaming export (the next read starts after the last
        time), each served by an index in time order, however long the series."""
        ...

    async def latest(self, device_ids: Sequence[str]) -> dict[str, dict[str, SeriesPoint]]:
        """The newest point of each field of each device (devices without data are absent)."""
        ...

    async def usage(self) -> StoreUsage:
        """The oldest data kept and the space used (for `GET /api/v1/stats`)."""
        ...

    async def health(self) -> str | None:
        """A short detail when reachable; raises `BackendUnavailable` when not."""
        ...


@runtime_checkable
class MaintainedStore(Protocol):
    """A store whose data the lifecycle task keeps: partitions, retention, rollups."""

    async def prepare(self) -> None:
        """At start-up, before the first write."""
        ...

    async def maintain(self, *, budget_s: float) -> int:
        """One round of upkeep taking about `budget_s` at most; the rows expired."""
        ...
