"""The archived document's bytes and the key layout, shared by every archive backend.

A document is one JSON object per reading set:
`{"topic": ..., "received_at": ..., "batch_index": null|int, "payload": <JSON as received>}`.
For a single-object message the payload is the received bytes spliced in unchanged.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

import orjson

from iotmeter.ids import DEVICE_ID_RE
from iotmeter.readings import ReadingSet, format_key_time

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@functools.lru_cache(maxsize=1024)
def _second_prefix(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def _iso(epoch_us: int) -> str:
    """2026-11-27T09:05:11.123456Z; the date part is formatted once per second (per message
    it was a datetime and an isoformat call)."""
    second, micro = divmod(epoch_us, 1_000_000)
    return f"{_second_prefix(second)}{micro:06d}Z"


def encode_archive_document(reading: ReadingSet) -> bytes:
    head = orjson.dumps(
        {
            "topic": reading.topic,
            "received_at": _iso(reading.received_at_us),
            "batch_index": reading.batch_index,
        }
    )
    return head[:-1] + b',"payload":' + reading.raw.strip() + b"}"


def key_prefix(device_id: str) -> str:
    return f"{device_id}/"


def key_bound(device_id: str, epoch_us: int) -> str:
    """Keys of the device with time >= epoch_us sort at or after this string."""
    return f"{device_id}/{format_key_time(epoch_us)}"


def parse_key(key: str) -> tuple[str, int]:
    """(device_id, epoch_us to the millisecond) of an archive key; ValueError if malformed."""
    device_id, _, name = key.partition("/")
    if not DEVICE_ID_RE.fullmatch(device_id) or not name.endswith(".json") or "/" in name:
        raise ValueError(f"not an archive key: {key!r}")
    stamp = name.split("_", 1)[0]
    try:
        moment = datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"not an archive key: {key!r}") from None
    return device_id, (moment - _EPOCH) // timedelta(microseconds=1)
