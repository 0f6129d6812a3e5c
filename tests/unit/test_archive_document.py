"""The archived document's `received_at`: RFC 3339 UTC with microseconds, whatever the time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
from hypothesis import given
from hypothesis import strategies as st

from iotmeter.readings import ReadingSet
from iotmeter.storage.archive.document import encode_archive_document

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@given(st.integers(min_value=0, max_value=4_102_444_800_000_000))  # 1970 .. 2100
def test_received_at_is_the_exact_microsecond_in_utc(epoch_us: int) -> None:
    document = orjson.loads(
        encode_archive_document(
            ReadingSet(
                device_id="d1",
                epoch_us=epoch_us,
                values={"t": 1.0},
                topic="iot/d1/telemetry",
                received_at_us=epoch_us,
                raw=b'{"t": 1}',
            )
        )
    )
    stamp = document["received_at"]
    assert stamp.endswith("Z")
    assert len(stamp) == len("2026-11-27T09:05:11.123456Z")
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert parsed == EPOCH + timedelta(microseconds=epoch_us)
    assert document["payload"] == {"t": 1}
