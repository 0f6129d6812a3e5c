"""Readings of watched devices, handed to the open event streams (`/api/v1/live`) once the
time-series store has them.

The ingest path pays a dictionary lookup per stored reading set while any stream is open, and
one truth test per batch while none is: the readings are kept by reference in each watcher's
bounded queue, and turned into JSON by the stream's own task, not by the sink. A watcher that
falls behind loses its oldest readings and is told how many (a `gap` event), so a slow browser
never holds memory or the ingest path.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Collection, Iterable

from iotmeter.errors import IotmeterError
from iotmeter.readings import ReadingSet


class TooManyStreams(IotmeterError):
    status_code = 503
    code = "too_many_streams"


class Watch:
    """One open stream's view: the readings of its devices, oldest first."""

    __slots__ = ("_pending", "_ready", "closed", "device_ids", "dropped")

    def __init__(self, device_ids: frozenset[str], max_pending: int) -> None:
        self.device_ids = device_ids
        self.dropped = 0
        self.closed = False
        self._pending: deque[ReadingSet] = deque(maxlen=max_pending)
        self._ready = asyncio.Event()

    def put(self, reading: ReadingSet) -> None:
        pending = self._pending
        if len(pending) == pending.maxlen:
            self.dropped += 1
        pending.append(reading)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def wait(self, timeout_s: float) -> None:
        """Until readings are pending, the watch is closed, or `timeout_s` passed."""
        if self._pending or self.closed:
            return
        self._ready.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._ready.wait()
        except TimeoutError:
            pass

    def take(self) -> tuple[list[ReadingSet], int]:
        """The pending readings and how many were dropped since the last take."""
        readings = list(self._pending)
        self._pending.clear()
        dropped, self.dropped = self.dropped, 0
        return readings, dropped


class LiveFeed:
    """Who watches which device; `publish` is called by the time-series sink."""

    def __init__(self, *, max_streams: int, max_pending: int = 2_000) -> None:
        self.max_streams = max_streams
        self.max_pending = max_pending
        self._by_device: dict[str, set[Watch]] = {}
        self._watches: set[Watch] = set()
        self.published = 0
        """Readings handed to watchers since start."""

    @property
    def streams(self) -> int:
        return len(self._watches)

    def watch(self, device_ids: Collection[str]) -> Watch:
        if len(self._watches) >= self.max_streams:
            raise TooManyStreams(
                f"{self.max_streams} live streams are open, the most this server keeps "
                "(IOTMETER_LIVE_MAX_STREAMS); close one or try again later",
                headers={"Retry-After": "10"},
            )
        watch = Watch(frozenset(device_ids), self.max_pending)
        self._watches.add(watch)
        for device_id in watch.device_ids:
            self._by_device.setdefault(device_id, set()).add(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        watch.close()
        self._watches.discard(watch)
        for device_id in watch.device_ids:
            watchers = self._by_device.get(device_id)
            if watchers is not None:
                watchers.discard(watch)
                if not watchers:
                    del self._by_device[device_id]

    def publish(self, readings: Iterable[ReadingSet]) -> None:
        by_device = self._by_device
        if not by_device:
            return
        handed = 0
        for reading in readings:
            watchers = by_device.get(reading.device_id)
            if watchers:
                for watch in watchers:
                    watch.put(reading)
                handed += 1
        self.published += handed

    def close_all(self) -> None:
        """End every stream (the server is shutting down: it waits for open responses)."""
        for watch in list(self._watches):
            watch.close()


Publisher = Callable[[Iterable[ReadingSet]], None]
