"""In-process ingestion counters since start, read by `/api/v1/stats`."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

from iotmeter.db.base import utcnow

RATE_WINDOW_S = 60
STORE_SINKS = ("timeseries", "archive")


@dataclass
class IngestStats:
    """Messages are MQTT messages; reading sets are what they hold (a batch holds several).

    A reading set counts as stored once both the time-series store and the archive have it.
    """

    started_at: datetime = field(default_factory=utcnow)
    messages_received: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    received_by_device: Counter[str] = field(default_factory=Counter)
    rejected_by_device: Counter[str] = field(default_factory=Counter)
    stored_by_sink: dict[str, Counter[str]] = field(
        default_factory=lambda: {sink: Counter() for sink in STORE_SINKS}
    )
    stored_total: Counter[str] = field(default_factory=Counter)
    """Reading sets each store sink made durable: the sum of `stored_by_sink`, kept as it grows
    so that neither a stored batch nor a scrape adds up a counter per device."""
    dead_letters_ingest: int = 0
    """Dead letters written for what was refused on the way in (a sink's own: its runner's
    `parked`)."""
    last_message_us: int | None = None
    """When the last message arrived (epoch microseconds; a datetime per message cost 1 µs)."""
    # Reading sets stored per whole second (monotonic clock), for the ingest rate.
    _per_second: deque[list[int]] = field(default_factory=deque, repr=False)

    def message_received(self, device_id: str | None, received_at_us: int) -> None:
        self.messages_received += 1
        self.last_message_us = received_at_us
        if device_id is not None:
            self.received_by_device[device_id] += 1

    @property
    def last_message_at(self) -> datetime | None:
        if self.last_message_us is None:
            return None
        return datetime.fromtimestamp(self.last_message_us / 1e6, UTC)

    def count_rejection(self, reason: str, device_id: str | None) -> None:
        self.rejected[reason] += 1
        if device_id is not None:
            self.rejected_by_device[device_id] += 1

    def count_stored(self, sink: str, by_device: Counter[str]) -> None:
        before = self.readings_stored
        self.stored_by_sink[sink].update(by_device)
        self.stored_total[sink] += by_device.total()
        newly = self.readings_stored - before
        if newly <= 0:
            return
        now = int(time.monotonic())
        if self._per_second and self._per_second[-1][0] == now:
            self._per_second[-1][1] += newly
        else:
            self._per_second.append([now, newly])
        while self._per_second and self._per_second[0][0] <= now - RATE_WINDOW_S:
            self._per_second.popleft()

    @property
    def readings_stored(self) -> int:
        """Reading sets in both stores (the slower store's count)."""
        return min(self.stored_total[sink] for sink in STORE_SINKS)

    def stored_by_device(self, device_id: str) -> int:
        return min(counter[device_id] for counter in self.stored_by_sink.values())

    def rate_per_second(self) -> float:
        """Reading sets stored per second over the last minute."""
        now = int(time.monotonic())
        recent = sum(count for second, count in self._per_second if second > now - RATE_WINDOW_S)
        return recent / RATE_WINDOW_S
