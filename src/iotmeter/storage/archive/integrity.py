"""Checking archived objects against their content hash (`iotmeter archive verify`).

Where each object's hash is:
- A segment (`{device}/{first}_{last}_{hash16}.ndjson[.gz]`) names it: the first 16 hex digits
  of the SHA-256 of its uncompressed NDJSON (`build_segment`). Decompress, hash, compare.
- A per-message object (`{device}/{time}_{tie}.json`) cannot: its key must stay the same for a
  redelivery (that is what makes writes idempotent), while its bytes hold the delivery's
  `received_at`, and the tie is a payload hash only for messages without an id. So the SHA-256
  of the bytes is recorded alongside the object when it is written: as S3 user metadata
  (`x-amz-meta-sha256`, taken from the signature's payload hash that the PUT computes anyway)
  or as the extended attribute `user.iotmeter.sha256` of a local file (set before the file gets
  its name). This was the cheapest design that detects a changed object: no extra object,
  request or file per message (a sidecar file would double the local archive's file count, a
  manifest per device and day would add a write per device per batch on S3), and reading it
  back costs nothing beyond the GET or read of the object itself.

Verdicts: `ok`; `altered` (the bytes do not match their hash, or a segment does not decompress);
`missing` (listed, but reading it fails: gone between listing and reading, unreadable on disk,
or its data lost by the store); `unhashed` (a per-message object without a recorded hash:
rewritten by a tool that knows nothing of it, written by an older iotmeter, or onto a file
system without extended attributes; it fails the check unless `--allow-unhashed`).

What it cannot see: an object deleted outright (nothing lists it any more: that would need an
inventory of what was written), and a change by someone who also rewrites the recorded hash.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from iotmeter.errors import BackendUnavailable, NotFound
from iotmeter.storage.archive.document import key_bound
from iotmeter.storage.archive.local import segment_hash_matches
from iotmeter.storage.archive.segments import LayeredArchive, segment_bounds

Verdict = Literal["ok", "altered", "missing", "unhashed"]
PAGE = 1000
READS_IN_FLIGHT = 16


@dataclass(frozen=True, slots=True)
class Checked:
    key: str
    verdict: Verdict
    detail: str = ""


async def archived_keys(
    archive: LayeredArchive, device_id: str, start_us: int, stop_us: int
) -> AsyncIterator[str]:
    """Object keys of a device in [start, stop): per-message objects by their time, then
    segments holding any time of the range (found from `start - lookback`, as reads do)."""
    store = archive.store
    after: str | None = None
    while True:
        page = await store.list(device_id, start_us, stop_us, limit=PAGE, after=after)
        for key in page.keys:
            yield key
        if page.next_cursor is None:
            break
        after = page.next_cursor
    start_after = key_bound(device_id, max(0, start_us - archive.lookback_us))
    while True:
        keys = await store.list_objects(device_id, start_after, PAGE)
        for key in keys:
            bounds = segment_bounds(key)
            if bounds is None or bounds[1] < start_us:
                continue
            if bounds[0] >= stop_us:
                return
            yield key
        if len(keys) < PAGE:
            return
        start_after = keys[-1]


def judge(key: str, body: bytes, recorded: str | None) -> Checked:
    """The verdict on one object's bytes (see the module)."""
    if segment_bounds(key) is not None:
        if segment_hash_matches(key.partition("/")[2], body):
            return Checked(key, "ok")
        return Checked(key, "altered", "content does not match the hash in its key")
    if recorded is None:
        return Checked(key, "unhashed", "no hash recorded with it")
    if hashlib.sha256(body).hexdigest() == recorded:
        return Checked(key, "ok")
    return Checked(key, "altered", f"SHA-256 differs from the recorded {recorded[:16]}...")


async def check_object(archive: LayeredArchive, key: str) -> Checked:
    """Read one object and judge it; `BackendUnavailable` only when the store itself fails."""
    try:
        stored = await archive.store.read_object(key)
    except NotFound:
        return Checked(key, "missing", "listed, but gone when read")
    except BackendUnavailable as exc:
        # One object that cannot be read while the store answers is lost data, not an outage.
        await archive.health()
        return Checked(key, "missing", f"listed, but unreadable: {exc.message}")
    return judge(key, stored.body, stored.sha256)


async def verify_keys(archive: LayeredArchive, keys: Sequence[str]) -> list[Checked]:
    """Check `keys`, `READS_IN_FLIGHT` reads at a time, results in the keys' order."""
    gate = asyncio.Semaphore(READS_IN_FLIGHT)

    async def one(key: str) -> Checked:
        async with gate:
            return await check_object(archive, key)

    return list(await asyncio.gather(*(one(key) for key in keys)))
