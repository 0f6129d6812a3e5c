"""The sink runner on a real spool: retries, outages, parking what a sink cannot take, and what
the spool is told is durable. The sinks here are small stand-ins that record what they get."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from iotmeter.errors import BackendUnavailable, StoreRejected
from iotmeter.ingest.batch import Batch, BatchDecoder
from iotmeter.ingest.decode import DecodeLimits
from iotmeter.ingest.runner import MAX_TRIES, SinkRunner
from iotmeter.ingest.spool import Spool
from iotmeter.readings import ReadingSet, Rejection, RejectReason
from iotmeter.retry import RETRY_AFTER_CAP_S, Backoff

SINK = "store"
TOPIC = "iot/dev-1/telemetry"
# Readings an hour old: well clear of the decoder's future-timestamp check.
BASE_MS = time.time_ns() // 1_000_000 - 3_600_000


def telemetry(value: int) -> bytes:
    return orjson.dumps({"ts": BASE_MS + value, "metrics": {"t": value}})


def value_of(reading: ReadingSet) -> int:
    return int(reading.values["t"])


def open_spool(directory: Path, **options: Any) -> Spool:
    spool = Spool(directory, [SINK], fsync=False, **options)
    spool.open()
    return spool


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = open_spool(tmp_path / "spool")
    yield spool
    spool.close()


async def append(spool: Spool, values: Iterable[int], *, group: int = 10) -> None:
    """Telemetry messages, one per value, committed `group` at a time (as the intake does)."""
    pending = 0
    for value in values:
        spool.append(TOPIC, telemetry(value), time.time_ns() // 1000)
        pending += 1
        if pending == group:
            await spool.commit()
            pending = 0
    await spool.commit()


async def append_payload(spool: Spool, payload: bytes) -> int:
    seq = spool.append(TOPIC, payload, time.time_ns() // 1000)
    await spool.commit()
    return seq


async def until(condition: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {within} s")
        await asyncio.sleep(0.002)


class RecordingSink:
    """A sink that stores reading values in a Counter, with knobs to make it fail."""

    name = SINK

    def __init__(self, *, poison: Iterable[int] = (), partial: bool = False) -> None:
        self.stored: Counter[int] = Counter()
        self.poison = set(poison)
        """Values it raises TypeError on, every time (a record it cannot handle)."""
        self.partial = partial
        """Whether it stores the readings before a poison one (no transaction)."""
        self.hiccups: set[int] = set()
        """Values it raises TypeError on once, then stores."""
        self.broken: Exception | None = None
        """Raised on every call while set (the sink itself is at fault)."""
        self.outages: list[BackendUnavailable] = []
        """Raised one per call, before anything else, until none are left."""
        self.down = False
        """Raise BackendUnavailable on every call while set."""
        self.refuse: dict[int, str] = {}
        """Values the store refuses for their content (StoreRejected), with its reason."""
        self.calls = 0
        self.call_times: list[float] = []
        self.tries: Counter[int] = Counter()
        """How many calls each reading value was part of."""

    async def store(self, batch: Batch) -> int | None:
        self.calls += 1
        self.call_times.append(time.monotonic())
        readings = batch.readings
        self.tries.update(value_of(reading) for reading in readings)
        if self.outages:
            raise self.outages.pop(0)
        if self.down:
            raise BackendUnavailable("store down")
        if self.broken is not None:
            raise self.broken
        if not self.partial:
            for reading in readings:
                self._check(reading)
        refused: list[tuple[ReadingSet, str]] = []
        for reading in readings:
            self._check(reading)
            value = value_of(reading)
            if value in self.refuse:
                refused.append((reading, self.refuse[value]))
            else:
                self.stored[value] += 1
        if refused:
            raise StoreRejected(f"{len(refused)} reading set(s) refused", refused)
        return None

    def _check(self, reading: ReadingSet) -> None:
        value = value_of(reading)
        if value in self.poison:
            raise TypeError(f"cannot store t={value}")
        if value in self.hiccups:
            self.hiccups.discard(value)
            raise TypeError(f"hiccup on t={value}")

    async def idle(self) -> int | None:
        return None


class Parked:
    """The runner's `park` callback: records what it gets; can fail like a database that is
    down."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.calls: list[tuple[str, list[Rejection]]] = []
        self.failures_left = 0
        self.confirmed_when_called: list[int] = []

    async def __call__(self, sink: str, dead: list[Rejection]) -> None:
        self.confirmed_when_called.append(self.spool.confirmed[sink])
        if self.failures_left:
            self.failures_left -= 1
            raise BackendUnavailable("database down")
        self.calls.append((sink, dead))

    @property
    def rejections(self) -> list[Rejection]:
        return [rejection for _sink, dead in self.calls for rejection in dead]


def make_runner(
    sink: Any,
    spool: Spool,
    park: Parked,
    *,
    batch_max: int = 50,
    initial: float = 0.001,
    cap: float = 0.01,
    retry_after_cap: float = RETRY_AFTER_CAP_S,
) -> SinkRunner:
    runner = SinkRunner(
        sink,
        spool,
        BatchDecoder(DecodeLimits(), consumers=1),
        park,
        batch_max=batch_max,
        batch_delay_s=0.01,
        progress=asyncio.Event(),
    )
    # Tiny delays so that the tries run in milliseconds (the policy itself: test_retry.py).
    # Nothing else keeps the delays: the runner reads its state from `backoff` on each use.
    runner.backoff = Backoff(
        f"{SINK} sink", initial=initial, cap=cap, retry_after_cap=retry_after_cap
    )
    return runner


@contextlib.asynccontextmanager
async def running(runner: SinkRunner) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(runner.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def parsed(rejection: Rejection) -> Any:
    return orjson.loads(rejection.payload)


# --- a record the sink fails on ---------------------------------------------------------------


@pytest.mark.parametrize("partial", [False, True], ids=["all-or-nothing", "partial-writes"])
async def test_a_poison_record_among_many_is_parked_and_the_rest_stored(
    spool: Spool, partial: bool
) -> None:
    sink = RecordingSink(poison={137}, partial=partial)
    park = Parked(spool)
    runner = make_runner(sink, spool, park, batch_max=50)
    await append(spool, range(200))
    async with running(runner):
        await until(lambda: spool.confirmed[SINK] == 199, "confirmed to the end")
        [rejection] = park.rejections
        assert park.calls[0][0] == SINK
        assert rejection.reason is RejectReason.SINK_FAILED
        assert f"the {SINK} sink failed on it" in rejection.detail
        assert "TypeError: cannot store t=137" in rejection.detail
        assert rejection.topic == TOPIC
        assert rejection.device_id == "dev-1"
        assert parsed(rejection)["metrics"] == {"t": 137}
        assert runner.parked == 1
        assert runner.error is None
        others = set(range(200)) - {137}
        assert set(sink.stored) == others
        # The poison record was tried more than once before it was set aside.
        assert sink.tries[137] >= MAX_TRIES
    if partial:
        # At least once: a sink that wrote part of a failing batch gets that part again.
        assert max(sink.stored.values()) > 1
    else:
        # Exactly once when the sink writes a batch all or nothing.
        assert set(sink.stored.values()) == {1}


async def test_a_poison_element_of_one_batch_message_is_parked_alone(spool: Spool) -> None:
    sink = RecordingSink(poison={13})
    park = Parked(spool)
    runner = make_runner(sink, spool, park)
    elements = [{"ts": BASE_MS + value, "metrics": {"t": value}} for value in range(40)]
    await append_payload(spool, orjson.dumps(elements))
    later = await append_payload(spool, telemetry(100))
    async with running(runner):
        await until(lambda: spool.confirmed[SINK] == later, "confirmed to the end")
        [rejection] = park.rejections
        assert rejection.reason is RejectReason.SINK_FAILED
        assert rejection.batch_index == 13
        assert parsed(rejection) == elements[13]
        assert "TypeError: cannot store t=13" in rejection.detail
        assert runner.parked == 1
        assert sink.stored == Counter({value: 1 for value in [*range(40), 100] if value != 13})


async def test_a_poison_record_alone_is_parked_and_the_sink_moves_on(spool: Spool) -> None:
    sink = RecordingSink(poison={0})
    park = Parked(spool)
    runner = make_runner(sink, spool, park)
    await append(spool, [0])
    async with running(runner):
        await until(lambda: spool.confirmed[SINK] == 0, "the poison record passed")
        assert [rejection.reason for rejection in park.rejections] == [RejectReason.SINK_FAILED]
        assert sink.tries[0] >= MAX_TRIES
        await append(spool, range(1, 6))
        await until(lambda: spool.confirmed[SINK] == 5, "later records confirmed")
        assert sink.stored == Counter({1: 1, 2: 1, 3: 1, 4: 1, 5: 1})
        assert runner.parked == 1


async def test_a_record_that_fails_fewer_times_than_the_tries_is_stored(spool: Spool) -> None:
    sink = RecordingSink()
    sink.hiccups = {3}
    park = Parked(spool)
    runner = make_runner(sink, spool, park)
    await append(spool, range(10))
    async with running(runner):
        await until(lambda: spool.confirmed[SINK] == 9, "confirmed to the end")
        assert park.calls == []
        assert runner.parked == 0
        assert sink.stored == Counter(dict.fromkeys(range(10), 1))
        assert runner.error is None


# --- the sink's own fault ---------------------------------------------------------------------


async def test_a_sink_failing_on_every_record_parks_nothing_until_it_is_repaired(
    spool: Spool,
) -> None:
    sink = RecordingSink()
    sink.broken = RuntimeError("sink broken")
    park = Parked(spool)
    runner = make_runner(sink, spool, park, batch_max=10)
    await append(spool, range(30))
    async with running(runner):
        # Several rounds of tries, each ending in a split of the batch down to single records.
        rounds = 3 * (MAX_TRIES + 2 * 10 - 1)
        await until(lambda: sink.calls >= rounds, "several rounds of tries")
        assert park.calls == []
        assert runner.parked == 0
        assert spool.confirmed[SINK] == -1
        assert runner.error is not None
        assert "RuntimeError: sink broken" in runner.error
        assert not runner.working()
        assert sink.stored == Counter()

        sink.broken = None
        await until(lambda: spool.confirmed[SINK] == 29, "confirmed once repaired")
        assert sink.stored == Counter(dict.fromkeys(range(30), 1))
        assert park.calls == []
        assert runner.error is None


# --- what the store refuses -------------------------------------------------------------------


async def test_readings_the_store_refuses_are_parked_without_retrying(spool: Spool) -> None:
    sink = RecordingSink()
    sink.refuse = {3: "field t out of range", 11: "field t out of range"}
    park = Parked(spool)
    runner = make_runner(sink, spool, park)
    await append(spool, range(20), group=20)
    async with running(runner):
        await until(lambda: spool.confirmed[SINK] == 19, "confirmed to the end")
        assert sink.calls == 1
        assert sorted(parsed(r)["metrics"]["t"] for r in park.rejections) == [3, 11]
        for rejection in park.rejections:
            assert rejection.reason is RejectReason.REFUSED_BY_STORE
            assert rejection.detail == f"the {SINK} store refused it: field t out of range"
        assert runner.parked == 2
        assert sink.stored == Counter({value: 1 for value in range(20) if value not in (3, 11)})
        assert runner.error is None


# --- outages ----------------------------------------------------------------------------------


async def test_an_outage_is_waited_out_and_nothing_is_parked(spool: Spool) -> None:
    sink = RecordingSink()
    sink.down = True
    park = Parked(spool)
    runner = make_runner(sink, spool, park)
    await append(spool, range(10))
    async with running(runner):
        await until(lambda: sink.calls >= 3 * MAX_TRIES, "many tries during the outage")
        assert runner.error == "store down"
        assert not runner.working()
        assert spool.confirmed[SINK] == -1
        sink.down = False
        await until(lambda: spool.confirmed[SINK] == 9, "confirmed after the outage")
        assert runner.error is None
        assert park.calls == []
        assert sink.stored == Counter(dict.fromkeys(range(10), 1))


async def test_retry_after_is_waited_out_before_the_next_try(spool: Spool) -> None:
    sink = RecordingSink()
    sink.outages = [BackendUnavailable("busy", retry_after=0.3)]
    runner = make_runner(sink, spool, Parked(spool))
    await append(spool, range(5))
    async with running(runner):
        await until(lambda: spool.confirmed[SINK] == 4, "confirmed after the pause", 3.0)
    first, second = sink.call_times
    # Asked for longer than the backoff's cap (0.01 s): Retry-After wins. (1 ms: clock slack.)
    assert 0.3 - 0.001 <= second - first < 1.0


async def test_retry_after_beyond_the_cap_is_not_obeyed_beyond_it(spool: Spool) -> None:
    sink = RecordingSink()
    sink.outages = [BackendUnavailable("busy for an hour", retry_after=3600)]
    runner = make_runner(sink, spool, Parked(spool), retry_after_cap=0.05)
    await append(spool, range(5))
    async with running(runner):
        await until(lambda: spool.confirmed[SINK] == 4, "confirmed after the capped pause")
    first, second = sink.call_times
    assert 0.05 - 0.001 <= second - first < 1.0
    # A runner as built for production caps it at RETRY_AFTER_CAP_S.
    default = SinkRunner(
        sink,
        spool,
        BatchDecoder(DecodeLimits(), consumers=1),
        Parked(spool),
        batch_max=10,
        batch_delay_s=0.01,
        progress=asyncio.Event(),
    )
    asked = BackendUnavailable("busy for an hour", retry_after=3600)
    assert default.backoff.next_delay(asked) == RETRY_AFTER_CAP_S == 60.0


# --- the dead letters themselves failing ------------------------------------------------------


@pytest.mark.parametrize("cause", ["refused", "poison"])
async def test_parking_waits_out_a_database_outage_before_confirming(
    spool: Spool, cause: str
) -> None:
    sink = RecordingSink(poison={2} if cause == "poison" else ())
    if cause == "refused":
        sink.refuse = {2: "field t out of range"}
    park = Parked(spool)
    park.failures_left = 3
    runner = make_runner(sink, spool, park)
    await append(spool, range(5))
    async with running(runner):
        await until(lambda: spool.confirmed[SINK] == 4, "confirmed after parking")
    assert len(park.confirmed_when_called) == 4
    # Not confirmed past the record while its dead letter was not kept.
    assert park.confirmed_when_called == [-1, -1, -1, -1]
    [rejection] = park.rejections
    assert parsed(rejection)["metrics"] == {"t": 2}
    assert runner.parked == 1
    assert sink.stored == Counter({0: 1, 1: 1, 3: 1, 4: 1})


# --- a sink that buffers ----------------------------------------------------------------------


class BufferingSink:
    """Buffers messages; makes durable all but the newest `hold` at each store, and everything at
    `idle`. Raises TypeError (buffering nothing) on a batch holding a poison value. At every
    call it notes whether the spool had been told more than it had made durable."""

    name = SINK

    def __init__(self, spool: Spool, *, hold: int, poison: Iterable[int] = ()) -> None:
        self.spool = spool
        self.hold = hold
        self.poison = set(poison)
        self.buffered: list[int] = []
        """Seqs taken, not yet durable."""
        self.durable = -1
        self.idle_calls = 0
        self.ahead: list[tuple[int, int]] = []
        """(confirmed, durable) whenever the spool's position was past what was durable."""

    async def store(self, batch: Batch) -> int | None:
        self.check_spool()
        for reading in batch.readings:
            if value_of(reading) in self.poison:
                raise TypeError(f"cannot store t={value_of(reading)}")
        for message in batch.messages:
            if message.seq not in self.buffered and message.seq > self.durable:
                self.buffered.append(message.seq)
        self._flush(len(self.buffered) - self.hold)
        return self.durable

    async def idle(self) -> int | None:
        self.check_spool()
        self.idle_calls += 1
        self._flush(len(self.buffered))
        return self.durable

    def check_spool(self) -> None:
        # Only the sink's own calls change `durable`: checking at each one misses nothing.
        if self.spool.confirmed[self.name] > self.durable:
            self.ahead.append((self.spool.confirmed[self.name], self.durable))

    def _flush(self, count: int) -> None:
        if count > 0:
            self.buffered.sort()
            self.durable = max(self.durable, self.buffered[count - 1])
            del self.buffered[:count]


async def test_a_buffering_sink_is_confirmed_only_as_far_as_it_is_durable(
    tmp_path: Path,
) -> None:
    spool = open_spool(tmp_path / "spool")
    sink = BufferingSink(spool, hold=3)
    runner = make_runner(sink, spool, Parked(spool))
    await append(spool, range(10), group=10)
    async with running(runner):
        await until(lambda: spool.confirmed[SINK] == 6, "confirmed what the store made durable")
        await asyncio.sleep(0.1)
        assert sink.idle_calls == 0
        assert spool.confirmed[SINK] == 6
        await until(lambda: spool.confirmed[SINK] == 9, "confirmed after the idle write")
        assert sink.idle_calls >= 1
    sink.check_spool()
    assert sink.ahead == []
    spool.close()
    # After a restart the spool resumes after exactly what the sink had made durable.
    reopened = open_spool(tmp_path / "spool")
    try:
        assert reopened.confirmed[SINK] == 9
    finally:
        reopened.close()


async def test_a_buffering_sink_is_not_confirmed_past_its_buffer_when_a_record_is_parked(
    spool: Spool,
) -> None:
    # The records around the poison one sit in the sink's buffer until its next idle write: the
    # spool must not be told they are durable when the poison record is parked (a restart then
    # would not replay them, and the sink would never store them).
    sink = BufferingSink(spool, hold=100, poison={5})
    park = Parked(spool)
    runner = make_runner(sink, spool, park)
    await append(spool, range(10), group=10)
    async with running(runner):
        await until(lambda: runner.parked == 1, "the poison record parked")
        await until(lambda: sink.idle_calls >= 1, "the idle write")
        await until(lambda: spool.confirmed[SINK] == 9, "confirmed after the idle write")
    assert sink.buffered == []
    assert sink.ahead == []


# --- cancelling, stalls and flow control ------------------------------------------------------


async def test_cancelling_during_an_outage_ends_the_runner_at_once(spool: Spool) -> None:
    sink = RecordingSink()
    sink.down = True
    runner = make_runner(sink, spool, Parked(spool), initial=30.0, cap=30.0)
    await append(spool, range(3))
    task = asyncio.create_task(runner.run())
    await until(lambda: runner.error is not None, "the outage seen")
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1.0)
    assert time.monotonic() - started < 1.0
    assert sink.calls == 1


class GatedSink(RecordingSink):
    """After `pass_before_gate` successful stores, each store waits for `gate`."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.pass_before_gate: int | None = None
        self.at_gate = False

    async def store(self, batch: Batch) -> int | None:
        if not self.down and self.pass_before_gate is not None:
            if self.pass_before_gate <= 0:
                self.at_gate = True
                await self.gate.wait()
                self.at_gate = False
            self.pass_before_gate -= 1
        return await super().store(batch)


async def test_stall_and_catching_up_follow_the_sinks_progress(tmp_path: Path) -> None:
    # A memory window of a few commits, so that a sink that fell behind reads from disk.
    spool = open_spool(tmp_path / "spool", memory_bytes=1000)
    sink = GatedSink()
    runner = make_runner(sink, spool, Parked(spool), batch_max=10)
    try:
        async with running(runner):
            await append(spool, [0])
            await until(lambda: spool.confirmed[SINK] == 0, "the first record stored")
            assert runner.stalled_for() == 0.0
            assert runner.working()

            sink.down = True
            await append(spool, range(1, 101), group=1)
            await until(lambda: runner.error is not None, "the outage seen")
            assert not runner.working()
            stalled = runner.stalled_for()
            await asyncio.sleep(0.1)
            assert runner.stalled_for() >= stalled + 0.09  # (timer slack)
            assert spool.memory_first_seq > 1  # the sink's records are behind the window

            # Back, but slow: one batch through, then the sink waits at the gate.
            sink.gate.clear()
            sink.pass_before_gate = 1
            sink.down = False
            await until(lambda: sink.at_gate, "the second batch at the gate")
            assert runner.error is None
            assert runner.taken + 1 < spool.memory_first_seq
            # Not failing, but catching up: the intake must not wait for it.
            assert not runner.working()

            sink.gate.set()
            await until(lambda: spool.confirmed[SINK] == 100, "caught up")
            assert runner.working()
            assert runner.stalled_for() == 0.0
            assert sink.stored == Counter(dict.fromkeys(range(101), 1))
    finally:
        spool.close()
