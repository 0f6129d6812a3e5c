"""The streaming export routes over the SQL store, on PostgreSQL and SQLite: order, every point
once, both formats, fields, many devices and types, resume from a download cut at any byte,
the raw archive byte for byte, bad input, and that the server reads no further ahead than a
chunk while the client does not read."""

from __future__ import annotations

import asyncio
import base64
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.types import ASGIApp, Message

from iotmeter.api.timerange import format_time
from iotmeter.config import Settings
from iotmeter.db.engine import Database, build_engine
from iotmeter.services import export as service
from iotmeter.storage.archive.local import LocalArchiveStore
from iotmeter.storage.timeseries.sql import SqlTimeSeriesStore
from tests.conftest import make_settings
from tests.fixtures.readings import SECOND_US, reading

DEVICES = "/api/v1/devices"
BASE_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
RANGE = {"start": "2026-01-01T00:00:00Z", "stop": "2026-01-02T00:00:00Z"}
CHUNK = 100

Row = tuple[str, str, str, float]  # device_id, field, ts, value


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, tmp_path, export_chunk_points=CHUNK)


async def register(api: httpx.AsyncClient, device_id: str, device_type: str = "meter") -> None:
    response = await api.post(
        DEVICES, json={"id": device_id, "name": device_id, "type": device_type}
    )
    assert response.status_code == 201, response.text


async def write(database_url: str, readings: list[Any]) -> None:
    database = Database(build_engine(database_url))
    try:
        await SqlTimeSeriesStore(database).write(readings)
    finally:
        await database.close()


async def seed(api: httpx.AsyncClient, database_url: str) -> dict[str, list[Row]]:
    """Three devices (two of type meter): irregular times, fields that share times and not.
    Returns each device's rows in the export's order (time, then field)."""
    chooser = random.Random(15)
    expected: dict[str, list[Row]] = {}
    readings = []
    for device_id, device_type, count in (
        ("m-1", "meter", 260),
        ("m-2", "meter", 90),
        ("t-1", "temp", 30),
    ):
        await register(api, device_id, device_type)
        rows: list[tuple[int, str, float]] = []
        epoch_us = BASE_US
        for _ in range(count):
            epoch_us += chooser.choice([1, 999, SECOND_US])
            values = {
                name: chooser.randint(-10_000, 10_000) / 16
                for name in ("energy", "Power", "v.l1")
                if chooser.random() < 0.6
            } or {"energy": 1.0}
            readings.append(reading(device_id, epoch_us, values))
            rows.extend((epoch_us, name, value) for name, value in values.items())
        rows.sort()
        expected[device_id] = [(device_id, f, format_time(t), v) for t, f, v in rows]
    await write(database_url, readings)
    return expected


def parse_ndjson(body: bytes) -> tuple[list[Row], list[tuple[int, str]], dict[str, Any] | None]:
    """Rows, (rows before it, cursor) per cursor line, and the end line (None: no end)."""
    rows: list[Row] = []
    cursors: list[tuple[int, str]] = []
    end = None
    for line in body.splitlines():
        item = orjson.loads(line)
        if "cursor" in item:
            cursors.append((len(rows), item["cursor"]))
        elif "end" in item:
            end = item
        else:
            assert set(item) == {"device_id", "field", "ts", "value"}, item
            rows.append((item["device_id"], item["field"], item["ts"], item["value"]))
    return rows, cursors, end


def parse_csv(body: bytes) -> tuple[list[Row], list[tuple[int, str]], str | None]:
    lines = body.decode().splitlines()
    assert lines[0] == "device_id,field,ts,value"
    rows: list[Row] = []
    cursors: list[tuple[int, str]] = []
    end = None
    for line in lines[1:]:
        if line.startswith("# cursor="):
            cursors.append((len(rows), line.removeprefix("# cursor=")))
        elif line.startswith("# end"):
            end = line
        else:
            device_id, field, ts, value = line.split(",")
            rows.append((device_id, field, ts, float(value)))
    return rows, cursors, end


async def test_one_device_ndjson_every_point_once_by_time_then_field(
    api: httpx.AsyncClient, database_url: str
) -> None:
    expected = await seed(api, database_url)

    response = await api.get(f"{DEVICES}/m-1/telemetry/export", params=RANGE)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    rows, cursors, end = parse_ndjson(response.content)
    assert rows == expected["m-1"]
    assert end == {"end": True, "rows": len(rows)}
    # A cursor at least every chunk of rows (three field streams, each at most a chunk).
    gaps = [
        after - before
        for (before, _), (after, _) in zip([(0, ""), *cursors[:-1]], cursors, strict=True)
    ]
    assert max(gaps) <= CHUNK
    assert cursors[-1][0] == len(rows)


async def test_csv_holds_the_same_rows_as_ndjson(api: httpx.AsyncClient, database_url: str) -> None:
    expected = await seed(api, database_url)

    response = await api.get(f"{DEVICES}/m-1/telemetry/export", params={**RANGE, "format": "csv"})

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    rows, cursors, end = parse_csv(response.content)
    assert rows == expected["m-1"]
    assert end == f"# end rows={len(rows)}"
    assert cursors[-1][0] == len(rows)


async def test_fields_filter_and_range(api: httpx.AsyncClient, database_url: str) -> None:
    expected = await seed(api, database_url)
    stop = expected["m-1"][100][2]

    response = await api.get(
        f"{DEVICES}/m-1/telemetry/export",
        params={"start": RANGE["start"], "stop": stop, "fields": "Power,v.l1"},
    )

    rows, _, end = parse_ndjson(response.content)
    assert rows == [row for row in expected["m-1"] if row[1] in ("Power", "v.l1") and row[2] < stop]
    assert end is not None


async def test_many_devices_device_then_time(api: httpx.AsyncClient, database_url: str) -> None:
    expected = await seed(api, database_url)

    by_ids = await api.get(
        "/api/v1/telemetry/export", params={**RANGE, "device_ids": "t-1,m-2,m-1"}
    )
    by_type = await api.get(
        "/api/v1/telemetry/export", params={**RANGE, "type": "meter", "format": "csv"}
    )

    assert by_ids.status_code == 200, by_ids.text
    assert parse_ndjson(by_ids.content)[0] == expected["m-1"] + expected["m-2"] + expected["t-1"]
    assert by_type.status_code == 200, by_type.text
    assert parse_csv(by_type.content)[0] == expected["m-1"] + expected["m-2"]


@pytest.mark.parametrize("form", ["ndjson", "csv"])
async def test_resume_after_a_cut_at_any_byte_repeats_and_misses_nothing(
    api: httpx.AsyncClient, database_url: str, form: str
) -> None:
    """A client that lost its connection keeps the complete lines it has; the rows up to its
    last cursor plus the export resumed after that cursor are exactly the full export."""
    await seed(api, database_url)
    params = {**RANGE, "type": "meter", "format": form}
    parse = parse_ndjson if form == "ndjson" else parse_csv
    full = (await api.get("/api/v1/telemetry/export", params=params)).content
    full_rows = parse(full)[0]
    cursor_ends = [
        full.index(b"\n", full.index(b"cursor", at)) + 1
        for at in range(len(full))
        if full.startswith(b"cursor", at)
    ]
    chooser = random.Random(f"{form}-cuts")
    cuts = sorted(
        {0, len(full) - 1, *cursor_ends, *(end - 1 for end in cursor_ends)}
        | {chooser.randrange(len(full)) for _ in range(25)}
    )

    for cut in cuts:
        received = full[: full.rfind(b"\n", 0, cut) + 1]  # complete lines only
        rows, cursors, _ = parse(received) if received or form == "ndjson" else ([], [], None)
        if not cursors:
            kept, resume = [], {}
        else:
            kept, resume = rows[: cursors[-1][0]], {"after": cursors[-1][1]}
        # A relative stop on resume changes nothing: the cursor keeps the first request's range.
        response = await api.get(
            "/api/v1/telemetry/export", params={**params, "stop": "now", **resume}
        )
        assert response.status_code == 200, response.text
        rest, _, end = parse(response.content)
        assert end is not None
        assert kept + rest == full_rows, f"cut at byte {cut} of {len(full)}"


async def test_raw_export_gives_the_archived_bytes_exactly(
    api: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "RAW_EXPORT_PAGE", 3)
    await register(api, "r-1")
    payloads = [
        b'{"ts": 1767225601000, "energy": 1.5, "note": "caf\xc3\xa9 \\u00e9"}',
        b'{\n  "ts": 1767225602000,\n  "energy": 2.5\n}',  # pretty-printed: base64
        *(b'{"ts":%d,"energy":%d}' % (1767225603000 + n, n) for n in range(6)),
    ]
    sets = [
        replace(
            reading("r-1", BASE_US + SECOND_US + n * 1000, {"energy": 1.0}), raw=raw, msg_id=f"m{n}"
        )
        for n, raw in enumerate(payloads)
    ]
    await LocalArchiveStore(settings.archive_dir).put(sets)

    response = await api.get(f"{DEVICES}/r-1/raw/export", params=RANGE)

    assert response.status_code == 200, response.text
    lines = response.content.splitlines()
    assert orjson.loads(lines[-1]) == {"end": True, "rows": len(payloads)}
    documents = []
    cursors = []
    for line in lines[:-1]:
        item = orjson.loads(line)
        if "cursor" in item:
            cursors.append((len(documents), item["cursor"]))
            continue
        exact = (await api.get(f"/api/v1/raw/{item['key']}")).content
        if "document" in item:
            # The document's bytes are the line from after `"document":` to the last `}`.
            assert line[line.index(b'"document":') + len(b'"document":') : -1] == exact
        else:
            assert base64.b64decode(item["document_base64"]) == exact
            assert b"\n" in exact
        assert orjson.loads(exact)["payload"] == orjson.loads(payloads[len(documents)])
        documents.append(item["key"])
    assert documents == [reading_set.archive_key for reading_set in sets]
    assert [done for done, _ in cursors] == [3, 6]

    resumed = await api.get(f"{DEVICES}/r-1/raw/export", params={**RANGE, "after": cursors[0][1]})
    keys = [orjson.loads(line).get("key") for line in resumed.content.splitlines()]
    assert [key for key in keys if key] == documents[3:]


@pytest.mark.parametrize(
    ("path", "params", "status", "words"),
    [
        ("/devices/m-1/telemetry/export", {"after": "not-a-cursor"}, 400, "not an export cursor"),
        (
            "/devices/m-1/telemetry/export",
            {
                "after": base64.urlsafe_b64encode(
                    b'{"v":1,"k":"telemetry","s":"x","a":5,"b":1,"d":"m-1","t":9,"f":"a"}'
                ).decode()
            },
            400,
            "damaged export cursor",
        ),
        (
            "/devices/m-1/telemetry/export",
            {"start": "2026-01-02T00:00:00Z", "stop": "2026-01-01T00:00:00Z"},
            400,
            "start must be before stop",
        ),
        ("/devices/m-1/telemetry/export", {"start": "yesterday"}, 400, "not a time"),
        ("/devices/m-1/telemetry/export", {"fields": "_bad"}, 400, "not a field name"),
        ("/devices/nobody/telemetry/export", {}, 404, "nobody"),
        ("/telemetry/export", {}, 400, "exactly one of them"),
        ("/telemetry/export", {"device_ids": "m-1", "type": "meter"}, 400, "exactly one of them"),
        ("/telemetry/export", {"device_ids": "m-1,ghost"}, 404, "ghost"),
        ("/telemetry/export", {"type": "nothing"}, 404, "no registered device has type"),
        ("/devices/m-1/raw/export", {"after": "bm9wZQ"}, 400, "not an export cursor"),
    ],
)
async def test_bad_input_says_what_to_fix(
    api: httpx.AsyncClient, path: str, params: dict[str, str], status: int, words: str
) -> None:
    await register(api, "m-1")

    response = await api.get(f"/api/v1{path}", params=params)

    assert response.status_code == status, response.text
    assert words in response.json()["error"]["message"]


async def test_a_cursor_of_another_export_is_refused(
    api: httpx.AsyncClient, database_url: str
) -> None:
    await seed(api, database_url)
    body = (await api.get(f"{DEVICES}/m-1/telemetry/export", params=RANGE)).content
    cursor = parse_ndjson(body)[1][0][1]

    for path, params in (
        (f"{DEVICES}/m-1/telemetry/export", {"fields": "energy"}),
        (f"{DEVICES}/m-2/telemetry/export", {}),
        ("/api/v1/telemetry/export", {"type": "meter"}),
        (f"{DEVICES}/m-1/raw/export", {}),
    ):
        response = await api.get(path, params={**params, "after": cursor})
        assert response.status_code == 400, (path, response.text)
        assert "after" in response.json()["error"]["message"]


async def test_the_server_reads_no_further_than_a_chunk_ahead_of_a_client_that_stops_reading(
    asgi_app: ASGIApp, api: httpx.AsyncClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Constant memory: 30,000 points, a client that takes two body chunks and then stops
    reading. The server must have read at most a few chunks from the store by then (a server
    that built the whole answer first would have read all 30,000)."""
    await register(api, "big")
    await write(
        database_url,
        [
            reading("big", BASE_US + n * SECOND_US, {"a": float(n), "b": -float(n)})
            for n in range(15_000)
        ],
    )
    handed_out = 0
    original = SqlTimeSeriesStore.scan

    async def counting(
        self: SqlTimeSeriesStore, device_id: str, field: str, start: int, stop: int, limit: int
    ) -> list[tuple[int, float]]:
        nonlocal handed_out
        points = await original(self, device_id, field, start, stop, limit)
        handed_out += len(points)
        return points

    monkeypatch.setattr(SqlTimeSeriesStore, "scan", counting)
    chunks: list[bytes] = []
    stalled = asyncio.Event()
    disconnected = asyncio.Event()

    requested: list[bool] = []

    async def receive() -> Message:
        if not requested:
            requested.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) >= 2:
                stalled.set()
                await disconnected.wait()  # a client that reads no more

    query = f"start={RANGE['start']}&stop={RANGE['stop']}".encode()
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"{DEVICES}/big/telemetry/export",
        "raw_path": f"{DEVICES}/big/telemetry/export".encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"iotmeter")]
        + [
            (name.lower().encode(), value.encode())
            for name, value in api.headers.items()
            if name.lower() == "authorization"
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("iotmeter", 80),
    }
    task = asyncio.create_task(asgi_app(scope, receive, send))
    try:
        await asyncio.wait_for(stalled.wait(), 30)
        await asyncio.sleep(0.5)  # time to read ahead, if it would
        assert b'"cursor"' in b"".join(chunks)
        assert handed_out <= 3 * CHUNK, f"the server read {handed_out} points ahead"
    finally:
        disconnected.set()
        await asyncio.wait_for(task, 30)
