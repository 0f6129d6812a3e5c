"""The export's merge of per-field keyset streams, and its cursors, as properties over random
data (an in-memory store with the Protocol's query semantics): every point exactly once in
(device, time, field) order whatever the chunk size, and the rows before any cursor plus the
export resumed after it are the whole export. Also the cursor's refusals and the line formats."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotmeter.api.export_format import cursor_record, encode_raw_line, encode_rows, end_record
from iotmeter.errors import ValidationFailed
from iotmeter.readings import ReadingSet
from iotmeter.services import export as service
from iotmeter.storage.archive.base import ArchivedMessage
from iotmeter.storage.timeseries.base import SeriesPoint, SeriesQuery

Point = tuple[str, str, int, float]  # device, field, time, value


class MemoryStore:
    """`query` and `scan` as every backend answers them (by field then time; by time)."""

    backend = "memory"
    tags_device_type = False

    def __init__(self, points: Sequence[Point]) -> None:
        self.points = {(d, f, t): v for d, f, t, v in points}
        self.largest_answer = 0

    async def write(self, readings: Sequence[ReadingSet]) -> None:
        raise NotImplementedError

    async def query(self, query: SeriesQuery) -> list[SeriesPoint]:
        found = sorted(
            (f, t, v)
            for (d, f, t), v in self.points.items()
            if d == query.device_id
            and query.start_us <= t < query.stop_us
            and (query.fields is None or f in query.fields)
        )[: query.limit]
        self.largest_answer = max(self.largest_answer, len(found))
        return [SeriesPoint(f, t, v) for f, t, v in found]

    async def scan(
        self, device_id: str, field: str, start_us: int, stop_us: int, limit: int
    ) -> list[tuple[int, float]]:
        points = await self.query(SeriesQuery(device_id, start_us, stop_us, [field], limit=limit))
        return [(point.epoch_us, point.value) for point in points]

    async def latest(self, device_ids: Sequence[str]) -> dict[str, dict[str, SeriesPoint]]:
        raise NotImplementedError

    async def health(self) -> str | None:
        return None


points_strategy = st.lists(
    st.tuples(
        st.sampled_from(["d1", "d2", "d3"]),
        st.sampled_from(["a", "B", "c.1", "zz"]),
        st.integers(0, 60),
        st.floats(allow_nan=False, allow_infinity=False, width=32),
    ),
    max_size=120,
)


def plan(after: str | None, chunk: int) -> service.TelemetryExport:
    return service.plan_telemetry_export(
        ["d3", "d1", "d2"],
        selection="sel",
        fields=["B", "a", "c.1", "zz"],
        start_us=5,
        stop_us=55,
        after=after,
        chunk_points=chunk,
    )


async def run(store: MemoryStore, export: service.TelemetryExport) -> list[tuple[Point, str]]:
    """Every row with the cursor that came after its batch."""
    rows = []
    async for batch in service.telemetry_batches(None, store, export):  # type: ignore[arg-type]
        rows.extend(((batch.device_id, f, t, v), batch.cursor) for t, f, v in batch.rows)
    return rows


@settings(max_examples=150, deadline=None)
@given(points=points_strategy, chunk=st.integers(1, 40), resume_at=st.integers(0, 10_000))
def test_every_point_once_in_order_and_resume_from_any_cursor(
    points: list[Point], chunk: int, resume_at: int
) -> None:
    store = MemoryStore(points)
    expected = sorted(
        ((d, f, t, v) for (d, f, t), v in store.points.items() if 5 <= t < 55),
        key=lambda point: (point[0], point[2], point[1]),
    )

    rows = asyncio.run(run(store, plan(None, chunk)))

    assert [row for row, _ in rows] == expected
    # No read holds more than a chunk per field stream (4 fields).
    assert store.largest_answer <= max(chunk, 1)
    if not rows:
        return
    # Resume after the cursor that followed row `index` (cursors come after whole batches).
    index = resume_at % len(rows)
    cursor = rows[index][1]
    done = max(i for i, (_, c) in enumerate(rows) if c == cursor) + 1
    rest = asyncio.run(run(store, plan(cursor, chunk)))
    assert [row for row, _ in rows[:done]] + [row for row, _ in rest] == expected


def test_cursor_refusals_say_what_to_do() -> None:
    good = service.TelemetryCursor("sel", 5, 55, "d1", 7, "a").encode()
    assert service.TelemetryCursor.decode(good, "sel").epoch_us == 7
    with pytest.raises(ValidationFailed, match=r"another export|other devices"):
        service.TelemetryCursor.decode(good, "other")
    for bad in ("", "!!!", base64.urlsafe_b64encode(b"[1]").decode(), good[:-3]):
        with pytest.raises(ValidationFailed, match="cursor; pass the last cursor"):
            service.TelemetryCursor.decode(bad, "sel")
    forged = base64.urlsafe_b64encode(
        orjson.dumps(
            {"v": 1, "k": "telemetry", "s": "sel", "a": 5, "b": 55, "d": "d1", "t": 99, "f": "a"}
        )
    ).decode()
    with pytest.raises(ValidationFailed, match="damaged"):
        service.TelemetryCursor.decode(forged, "sel")


def test_line_formats() -> None:
    rows = [
        (1_767_225_600_000_001, "a", 1.5),
        (1_767_225_600_000_001, "b", -2.0),
        (1_767_225_601_000_000, "a", 1e16),
    ]
    assert encode_rows("m-1", rows, "csv") == (
        "m-1,a,2026-01-01T00:00:00.000001Z,1.5\n"
        "m-1,b,2026-01-01T00:00:00.000001Z,-2.0\n"
        "m-1,a,2026-01-01T00:00:01.000000Z,1e+16\n"
    )
    lines = encode_rows("m-1", rows, "ndjson").splitlines()
    assert [orjson.loads(line) for line in lines] == [
        {"device_id": "m-1", "field": "a", "ts": "2026-01-01T00:00:00.000001Z", "value": 1.5},
        {"device_id": "m-1", "field": "b", "ts": "2026-01-01T00:00:00.000001Z", "value": -2.0},
        {"device_id": "m-1", "field": "a", "ts": "2026-01-01T00:00:01.000000Z", "value": 1e16},
    ]
    assert cursor_record("abc", "csv") == "# cursor=abc\n"
    assert orjson.loads(cursor_record("abc", "ndjson")) == {"cursor": "abc"}
    assert end_record(3, "csv") == "# end rows=3\n"


@pytest.mark.parametrize(
    ("body", "spliced"),
    [
        (b'{"topic":"t","payload":{"a":1, "s":"caf\xc3\xa9"}}', True),
        (b'{"topic":"t","payload":{\n"a":1}}', False),  # a line break
        (b'{"topic":"t","payload":{"a":1}\r}', False),
        (b'{"topic":"t","payload":{"a":"\xff"}}', False),  # not UTF-8
    ],
)
def test_raw_lines_keep_the_exact_bytes(body: bytes, spliced: bool) -> None:
    line = encode_raw_line(ArchivedMessage("d/20260101T000000.000Z_m-1.json", "d", 0, body))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    item = orjson.loads(line)
    assert item["key"] == "d/20260101T000000.000Z_m-1.json"
    if spliced:
        assert line[line.index(b'"document":') + 11 : -2] == body
    else:
        assert base64.b64decode(item["document_base64"]) == body
