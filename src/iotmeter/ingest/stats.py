"""In-process ingestion counters since start, read by `/api/v1/stats`."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime

from iotmeter.db.base import utcnow

RATE_WINDOW_S = 60


@dataclass
class IngestStats:
    started_at: datetime = field(default_factory=utcnow)
    messages_received: int = 0
    readings_received: int = 0
    readings_stored: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    received_by_device: Counter[str] = field(default_factory=Counter)
    stored_by_device: Counter[str] = field(default_factory=Counter)
    rejected_by_device: Counter[str] = field(default_factory=Counter)
    last_message_at: datetime | None = None
    # Stored reading sets per whole second (monotonic clock), for the ingest rate.
    _per_second: deque[list[int]] = field(default_factory=deque, repr=False)

    def message_received(self) -> None:
        self.messages_received += 1
        self.last_message_at = utcnow()

    def count_rejection(self, reason: str, device_id: str | None) -> None:
        self.rejected[reason] += 1
        if device_id is not None:
            self.rejected_by_device[device_id] += 1

    def count_stored(self, by_device: Counter[str]) -> None:
        total = by_device.total()
        self.readings_stored += total
        self.stored_by_device.update(by_device)
        now = int(time.monotonic())
        if self._per_second and self._per_second[-1][0] == now:
            self._per_second[-1][1] += total
        else:
            self._per_second.append([now, total])
        while self._per_second and self._per_second[0][0] <= now - RATE_WINDOW_S:
            self._per_second.popleft()

    def rate_per_second(self) -> float:
        """Reading sets stored per second over the last minute."""
        now = int(time.monotonic())
        recent = sum(count for second, count in self._per_second if second > now - RATE_WINDOW_S)
        return recent / RATE_WINDOW_S
