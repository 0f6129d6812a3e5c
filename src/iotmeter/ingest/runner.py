"""The one loop that drains the spool into a sink, written once for every sink.

Per sink: read the spool from its position, hand the decoded batch to the sink, confirm what is
durable. Around that, the runner owns what every sink needs and none should write again:
- retries with the project's backoff (`iotmeter.retry`), honouring `Retry-After`;
- what a store refuses for its content (`StoreRejected`) goes to the dead letters;
- a batch that fails again and again for another reason (not an outage) is split until the
  record the sink fails on stands alone, and that record is parked in the dead letters
  (`sink_failed`): the sink moves on. When no part of a batch can be stored at all the fault is
  the sink's, not a record's: nothing is parked, and the batch is tried again as in an outage;
- lag, "catching up" after a failure (the intake's flow control leaves such a sink alone), and
  a stall (work waiting, no progress for a set time) that `/ready` reports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from iotmeter.errors import BackendUnavailable, StoreRejected
from iotmeter.ingest.batch import Batch, BatchDecoder
from iotmeter.ingest.sinks import Sink
from iotmeter.ingest.spool import Spool
from iotmeter.observability.tracing import sink_batch_span
from iotmeter.readings import ReadingSet, Rejection, RejectReason
from iotmeter.retry import Backoff, describe

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.25
"""How often a sink with nothing to take is asked whether it has something due (`idle`)."""
MAX_TRIES = 5
"""Tries of one batch (or of one record) failing for a reason that is not an outage."""

T = TypeVar("T")

Park = Callable[[str, list[Rejection]], Awaitable[None]]
"""Keeps records in the dead letters: (sink name, dead letters); raises if it cannot."""


class BatchObserver(Protocol):
    """Told of each batch a sink wrote (the metrics' histograms)."""

    def written(self, records: int, seconds: float) -> None: ...


class _Systemic(Exception):
    """The sink failed on every part of a batch: the sink's fault, not a record's."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(describe(cause))
        self.cause = cause


class SinkRunner:
    """Drains the spool into one sink until cancelled."""

    def __init__(
        self,
        sink: Sink,
        spool: Spool,
        decoder: BatchDecoder,
        park: Park,
        *,
        batch_max: int,
        batch_delay_s: float,
        progress: asyncio.Event,
        max_tries: int = MAX_TRIES,
        observer: BatchObserver | None = None,
    ) -> None:
        self.sink = sink
        self.name = sink.name
        self.spool = spool
        self.decoder = decoder
        self.park = park
        self.batch_max = batch_max
        self.batch_delay_s = batch_delay_s
        self.progress = progress
        self.max_tries = max_tries
        self.taken = spool.confirmed[self.name]
        """The last seq the sink has taken (a buffering sink confirms it later)."""
        self.backoff = Backoff(f"{self.name} sink", log=logger, context={"sink": self.name})
        self.catching_up = False
        """Set by a failure; cleared once the sink is back within the spool's memory window.
        The intake does not wait for a sink that is catching up: the spool holds its backlog."""
        self.parked = 0
        self.readings_written = 0
        """Reading sets the sink took since start (a buffering sink's may not be durable yet)."""
        self.observer = observer
        self.last_progress = time.monotonic()

    # --- observing ----------------------------------------------------------------------------

    @property
    def error(self) -> str | None:
        """What the sink is failing on now, or None."""
        return self.backoff.last_error

    def stalled_for(self) -> float:
        """Seconds without progress while records wait for this sink (0 when none wait)."""
        if self.spool.committed_seq <= self.taken:
            return 0.0
        return time.monotonic() - self.last_progress

    def working(self) -> bool:
        """Whether the intake should wait for this sink when it lags (see `catching_up`)."""
        caught_up = self.taken + 1 >= self.spool.memory_first_seq
        if self.catching_up and not self.backoff.failing and caught_up:
            self.catching_up = False
        return not self.catching_up and not self.backoff.failing

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self.spool.wait_beyond(self.taken, within=IDLE_POLL_S)
            if self.spool.committed_seq <= self.taken:
                await self._advance(await self._retrying(self.sink.idle), self.taken)
                continue
            # A full batch goes at once; a partial one waits at most batch_delay_s to fill.
            await self.spool.wait_beyond(self.taken + self.batch_max - 1, within=self.batch_delay_s)
            chunks = await self.spool.read(self.taken, self.batch_max)
            if not chunks:
                continue
            batch = self.decoder.batch(chunks)
            durable = await self.deliver(batch)
            await self._advance(durable, batch.last_seq)

    async def _advance(self, durable: int | None, taken: int) -> None:
        moved = taken > self.taken
        self.taken = max(self.taken, taken)
        confirm = taken if durable is None else durable
        if confirm > self.spool.confirmed[self.name]:
            await self._retrying(lambda: self.spool.confirm(self.name, confirm))
            moved = True
        if moved:
            self.last_progress = time.monotonic()
            self.progress.set()

    async def deliver(self, batch: Batch) -> int | None:
        """Store the batch, however long it takes; park what the sink cannot take.

        Returns what the sink said is durable (None: all of the batch)."""
        tries = 0
        while True:
            try:
                durable = await self._store(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                tries += 1
                if tries == 1:
                    logger.exception(
                        "%s sink failed on a batch; trying again",
                        self.name,
                        extra={
                            "sink": self.name,
                            "spool_seq": batch.first_seq,
                            "spool_last_seq": batch.last_seq,
                        },
                    )
                self._failed(exc)
                if tries < self.max_tries:
                    await self.backoff.wait(exc)
                    continue
            else:
                self._succeeded()
                return durable
            try:
                durable = await self._isolate(batch)
            except _Systemic as systemic:
                logger.error(
                    "%s sink fails on every record of a batch (%s): the fault is the sink's, "
                    "not a record's; trying again as in an outage",
                    self.name,
                    describe(systemic.cause),
                )
                await self.backoff.wait(systemic.cause)
                tries = 0
                continue
            self._succeeded()
            return durable

    async def _store(self, batch: Batch) -> int | None:
        """One try at the whole batch; an outage is waited out here, for as long as it takes.
        (A sink that buffers never raises StoreRejected: what it refuses is not yet written.)"""
        while True:
            started = time.perf_counter()
            try:
                with sink_batch_span(
                    self.name, len(batch.messages), batch.first_seq, batch.last_seq
                ):
                    durable = await self.sink.store(batch)
            except BackendUnavailable as exc:
                self._failed(exc)
                await self.backoff.wait(exc)
            except StoreRejected as exc:
                await self._park_readings(exc.rejected, RejectReason.REFUSED_BY_STORE)
                await self._park_readings(exc.over_limit, RejectReason.SERIES_LIMIT)
                return None
            else:
                # Outside the try: bookkeeping can never pass for a failure of the store.
                if self.observer is not None:
                    self.observer.written(len(batch.messages), time.perf_counter() - started)
                self.readings_written += len(batch.readings)
                return durable

    async def _isolate(self, batch: Batch) -> int | None:
        """Store the batch's parts apart; a part that fails alone is parked.

        Returns what the sink last said is durable: a parked record makes nothing durable
        (a buffering sink may still hold the records around it)."""
        durable: int | None = None
        stored_any = False
        failing: list[tuple[Batch, BaseException]] = []
        parts: deque[Batch] = deque([batch])
        while parts:
            part = parts.popleft()
            try:
                durable = await self._store(part)
                stored_any = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                halves = part.halves()
                if halves is None:
                    failing.append((part, exc))
                else:
                    parts.extendleft(reversed(halves))
        if not stored_any and failing and batch.units > 1:
            raise _Systemic(failing[0][1])
        for part, error in failing:
            stored, last = await self._last_tries(part, error)
            if stored:
                durable = last
        return durable

    async def _last_tries(self, part: Batch, error: BaseException) -> tuple[bool, int | None]:
        """(True, durable) when the record was stored after all; (False, None) when parked."""
        for _ in range(self.max_tries - 1):
            await self.backoff.wait(error)
            try:
                return True, await self._store(part)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
        (message,) = part.messages
        detail = (
            f"the {self.name} sink failed on it every time it was tried ({describe(error)}); "
            "it was set aside so that the records behind it go on. The other sinks kept it."
        )
        items: list[ReadingSet | Rejection] = [*message.readings, *message.rejections]
        dead = [_dead_letter(item, RejectReason.SINK_FAILED, detail) for item in items]
        if not dead:
            return False, None
        logger.error(
            "%s sink: parked a record of %s: %s",
            self.name,
            dead[0].topic,
            detail,
            extra={"sink": self.name, "device_id": dead[0].device_id, "spool_seq": part.first_seq},
        )
        await self._retrying(lambda: self.park(self.name, dead))
        self.parked += len(dead)
        return False, None

    async def _park_readings(
        self, refused: list[tuple[ReadingSet, str]], reason: RejectReason
    ) -> None:
        if not refused:
            return
        dead = [
            _dead_letter(
                reading,
                reason,
                f"the {self.name} store refused it: {why}"
                if reason is RejectReason.REFUSED_BY_STORE
                else why,
            )
            for reading, why in refused
        ]
        await self._retrying(lambda: self.park(self.name, dead))
        self.parked += len(dead)

    async def _retrying(self, action: Callable[[], Awaitable[T]]) -> T:
        """`action` until it works (confirming, parking, a buffering sink's idle write)."""
        while True:
            try:
                result = await action()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, BackendUnavailable) and not self.backoff.failing:
                    logger.exception("%s sink: unexpected failure; trying again", self.name)
                self._failed(exc)
                await self.backoff.wait(exc)
                continue
            self._succeeded()
            return result

    def _failed(self, exc: BaseException) -> None:
        self.catching_up = True

    def _succeeded(self) -> None:
        self.backoff.succeeded()


def _dead_letter(item: ReadingSet | Rejection, reason: RejectReason, detail: str) -> Rejection:
    if isinstance(item, Rejection):
        return Rejection(
            reason,
            f"{detail} (it had been refused as {item.reason.value}: {item.detail})",
            item.topic,
            item.payload,
            item.device_id,
            item.batch_index,
            item.received_at_us,
            item.payload_size,
            item.payload_sha256,
        )
    return Rejection(
        reason,
        detail,
        item.topic,
        item.raw,
        item.device_id,
        item.batch_index,
        item.received_at_us,
    )
