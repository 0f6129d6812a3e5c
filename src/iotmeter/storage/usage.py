"""What a store holds: the oldest data kept and the space it takes (`GET /api/v1/stats`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StoreUsage:
    oldest_us: int | None
    """Time of the oldest data kept (reading time, microseconds); None when empty or unknown."""
    bytes_used: int | None
    """Space used, in bytes (tables and indexes, objects, files); None when the store cannot
    tell (e.g. InfluxDB through its query API)."""
    detail: str | None = None
    """How the figures were obtained, when that is worth knowing (e.g. an estimate)."""
