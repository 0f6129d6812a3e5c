"""The live feed between the time-series sink and the event streams: who gets what, and what a
slow watcher loses (told, never silently)."""

from __future__ import annotations

import asyncio

import pytest

from iotmeter.ingest.live import LiveFeed, TooManyStreams
from iotmeter.readings import ReadingSet
from tests.fixtures.readings import SECOND_US, reading


def readings(device_id: str, count: int) -> list[ReadingSet]:
    return [reading(device_id, i * SECOND_US, {"v": float(i)}) for i in range(count)]


async def test_each_watch_gets_its_own_devices_in_order() -> None:
    feed = LiveFeed(max_streams=5)
    both = feed.watch(["a", "b"])
    only_b = feed.watch(["b"])
    feed.publish([*readings("a", 2), *readings("b", 3), *readings("c", 4)])
    got, dropped = both.take()
    assert [(r.device_id, r.values["v"]) for r in got] == [
        ("a", 0.0),
        ("a", 1.0),
        ("b", 0.0),
        ("b", 1.0),
        ("b", 2.0),
    ]
    assert dropped == 0
    assert [r.device_id for r in only_b.take()[0]] == ["b", "b", "b"]
    assert feed.published == 5  # the readings of "c" went to nobody
    assert both.take() == ([], 0)


async def test_a_slow_watcher_keeps_the_newest_and_is_told_how_many_it_lost() -> None:
    feed = LiveFeed(max_streams=5, max_pending=10)
    watch = feed.watch(["a"])
    feed.publish(readings("a", 25))
    got, dropped = watch.take()
    assert [r.values["v"] for r in got] == [float(i) for i in range(15, 25)]
    assert dropped == 15
    feed.publish(readings("a", 3))
    assert watch.take()[1] == 0


async def test_waiting_wakes_on_readings_and_on_close() -> None:
    feed = LiveFeed(max_streams=5)
    watch = feed.watch(["a"])
    waiter = asyncio.create_task(watch.wait(30))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    feed.publish(readings("a", 1))
    await asyncio.wait_for(waiter, 1)
    watch.take()
    waiter = asyncio.create_task(watch.wait(30))
    await asyncio.sleep(0.01)
    feed.close_all()
    await asyncio.wait_for(waiter, 1)
    assert watch.closed
    # A wait with nothing to come ends at its timeout.
    quiet = feed.watch(["q"])
    await asyncio.wait_for(quiet.wait(0.05), 1)


async def test_streams_are_bounded_and_give_their_place_back() -> None:
    feed = LiveFeed(max_streams=2)
    first = feed.watch(["a"])
    feed.watch(["a", "b"])
    with pytest.raises(TooManyStreams) as refused:
        feed.watch([])
    assert refused.value.status_code == 503
    assert "IOTMETER_LIVE_MAX_STREAMS" in refused.value.message
    feed.unwatch(first)
    assert first.closed
    feed.watch(["c"])
    assert feed.streams == 2


async def test_nobody_watching_costs_the_sink_nothing_and_leaves_nothing_behind() -> None:
    feed = LiveFeed(max_streams=2)
    watch = feed.watch(["a", "b"])
    feed.unwatch(watch)
    feed.publish(readings("a", 3))
    assert feed.published == 0
    assert feed.streams == 0
    assert not feed._by_device  # no empty entries left for the sink to look at
