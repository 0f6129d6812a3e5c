"""Paging through a device's archived messages (the layer the raw API and the dashboard read):
every message once, whatever the page size, however many share a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotmeter.readings import ReadingSet
from iotmeter.storage.archive.local import LocalArchiveStore
from iotmeter.storage.archive.segments import LayeredArchive

T0 = 1_790_000_000_000_000


def message(n: int, epoch_us: int) -> ReadingSet:
    return ReadingSet(
        device_id="pager",
        epoch_us=epoch_us,
        values={"v": float(n)},
        topic="iot/pager/telemetry",
        received_at_us=epoch_us,
        raw=b'{"v": %d}' % n,
        msg_id=f"m{n:04d}",
    )


async def pages(archive: LayeredArchive, limit: int) -> list[list[str]]:
    found: list[list[str]] = []
    after: str | None = None
    while True:
        page = await archive.list("pager", T0 - 1, T0 + 10**9, limit=limit, after=after)
        found.append(page.keys)
        if page.next_cursor is None:
            return found
        after = page.next_cursor


@pytest.mark.parametrize(
    ("count", "limit", "same_time"),
    [
        (20, 10, False),  # exactly one full page after the first cursor
        (30, 10, False),
        (25, 10, False),
        (25, 10, True),  # every message of one time (batch elements, a device's clock)
        (7, 1, True),
        (40, 7, True),
    ],
)
async def test_every_message_once_over_the_pages(
    tmp_path: Path, count: int, limit: int, same_time: bool
) -> None:
    archive = LayeredArchive(LocalArchiveStore(tmp_path / "archive"), lookback_us=3_600_000_000)
    await archive.put([message(n, T0 if same_time else T0 + n * 1_000) for n in range(count)])
    got = await pages(archive, limit)
    keys = [key for page in got for key in page]
    assert len(keys) == count
    assert len(set(keys)) == count
    assert [len(page) for page in got[:-1]] == [limit] * (len(got) - 1)
    assert len(got) == -(-count // limit)  # no empty last page, no page missing
